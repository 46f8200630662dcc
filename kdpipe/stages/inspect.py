"""`kdpipe inspect STORE`: what a store holds, how big it is, and pictures of it.

    inspect_store("s.zarr")                                  # manifest, arrays, shards, targets
    inspect_store("s.zarr", cams=8, png="cams.png")          # CAMs of the top classes over images
    inspect_store("s.zarr", subclasses=6, target="default", png="sub.png")   # (cluster stage)
    inspect_store("s.zarr", fidelity=True, teacher="t.pth")  # warp error vs. online (targets stage)

An incomplete store is shown too (with its done shards), so an interrupted extraction can be
looked at before it is resumed; drawing needs a complete one.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from kdpipe.errors import KdpipeError, StoreError
from kdpipe.runs.plots import picture_path
from kdpipe.runs.report import human_bytes

TOP_CLASSES = 3


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "none"
    out, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def describe(reader) -> str:
    """The text `kdpipe inspect` prints: manifest summary, arrays, shards, target sets."""
    m = reader.manifest
    t, d, v = m.teacher, m.dataset, m.views
    done = reader.done_shards()
    lines = [
        f"store       {reader.path}",
        f"status      {'complete' if m.complete else 'INCOMPLETE (resume with extract-teacher --resume)'}; "
        f"schema {m.schema_version}, kdpipe {m.kdpipe_version}, created {m.created}",
        f"teacher     {t.arch} ({t.num_classes} classes), checkpoint sha256 {str(t.sha256)[:16]}",
        f"data set    {d.name} {d.split}: {d.num_samples} images "
        f"{'x'.join(map(str, d.image_size or []))}, {d.num_classes} classes, "
        f"fingerprint {str(d.fingerprint)[:16]}",
        f"            mean {list(d.mean or [])}, std {list(d.std or [])}",
        f"views       {v.num_views} per sample (mode {v.mode}, policy {v.policy}, pad {v.pad_mode}, seed {v.seed})",
        f"layers      {', '.join(m.layers) or 'none'}",
        f"shards      {len(done)} of {m.num_shards} done (size {m.shard_size}): {_ranges(done)}",
    ]
    ex = m.extraction
    if ex:
        lines.append(
            f"extraction  {ex.get('images_processed')} images at {ex.get('img_per_s')} img/s ({ex.get('executor')})"
        )
    info = reader.array_info()
    lines.append("arrays")
    w = max([len(a["name"]) for a in info] + [5])
    lines.append(f"  {'name':<{w}}  {'shape':<24} {'dtype':<8} {'chunks':<22} {'stored':>10} {'raw':>10} ratio")
    for a in info:
        lines.append(
            f"  {a['name']:<{w}}  {str(list(a['shape'])):<24} {a['dtype']:<8} "
            f"{str(list(a['chunks'])):<22} {human_bytes(a['stored_bytes']):>10} {human_bytes(a['bytes']):>10} "
            f"{a['ratio']:.2f}x"
        )
    raw = sum(a["bytes"] for a in info)
    stored = sum(a["stored_bytes"] for a in info)
    if stored:
        lines.append(
            f"  {'total':<{w}}  {'':<24} {'':<8} {'':<22} {human_bytes(stored):>10} {human_bytes(raw):>10} "
            f"{raw / stored:.2f}x"
        )
    sets = m.targets
    if sets:
        lines.append("target sets")
        for name in sorted(sets):
            e = sets[name]
            attrs = ", ".join(f"{k}={v}" for k, v in sorted(e.attrs.items()) if not isinstance(v, (dict, list)))
            state = "" if e.complete else " (INCOMPLETE)"
            lines.append(f"  {name}{state}: {', '.join(sorted(e.arrays))}")
            if attrs:
                lines.append(
                    textwrap.fill(
                        attrs, width=110, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False
                    )
                )
    else:
        lines.append("target sets none (run `kdpipe cluster`)")
    return "\n".join(lines)


def _dataset_for(reader, data=None):
    from kdpipe.data import load_dataset

    d = reader.manifest.dataset
    spec = data or d.spec
    if not spec:
        raise KdpipeError(f"The store at {reader.path} names no data set; pass --data.")
    dataset = load_dataset(spec, d.split)
    reader.check_dataset(dataset)
    return dataset


def _cams_of(reader, dataset, idx, views, teacher):
    """CAMs [k, C, h, w] of view 0 of samples ``idx``: the stored native CAM; else the teacher
    run on the images (when given); else the largest pooled CAM the store holds."""
    import torch

    if reader.has("cam"):
        return np.asarray(reader["cam"].get_orthogonal_selection((idx, 0))).astype(np.float32), "native"
    if teacher is not None:
        from kdpipe.data import normalize

        x = normalize(
            dataset.policy.apply_images(dataset.get_batch(idx), torch.from_numpy(views)), dataset.mean, dataset.std
        )
        with torch.no_grad():
            return teacher.eval().forward_features(x)[1]["cam"].float().numpy(), "native, teacher run now"
    pooled = sorted((int(n[len("cam_r") :]), n) for n in reader.array_names() if n.startswith("cam_r"))
    if not pooled:
        raise KdpipeError(f"The store at {reader.path} holds no CAMs; pass --teacher to compute them.")
    r, name = pooled[-1]
    return np.asarray(reader[name].get_orthogonal_selection((idx, 0))).astype(np.float32), f"pooled to {r}x{r}"


def plot_cams(reader, dataset, num_images: int, png_path, top: int = TOP_CLASSES, seed: int = 0, teacher=None) -> str:
    """A grid: for `num_images` samples (seeded pick), view 0 of the image, then the CAMs of the
    teacher's `top` classes (by stored logits) upsampled and overlaid: the native CAM where the
    store holds it or ``teacher`` is given, else the largest pooled CAM. Writes `png_path`."""
    import torch

    from kdpipe.runs.plots import draw_cam_grid

    n_total = reader.num_samples
    k = max(1, min(int(num_images), n_total))
    idx = np.sort(np.random.default_rng(seed).choice(n_total, size=k, replace=False))
    views = np.asarray(reader["views"].get_orthogonal_selection((idx, 0)))
    logits = np.asarray(reader["logits"].get_orthogonal_selection((idx, 0))).astype(np.float32)
    cams, kind = _cams_of(reader, dataset, idx, views, teacher)
    images = dataset.policy.apply_images(dataset.get_batch(idx), torch.from_numpy(views))
    names = dataset.class_names or [str(c) for c in range(dataset.num_classes)]
    captions = [f"#{i} label {names[int(dataset.labels[i])]}" for i in idx]
    top = max(1, min(int(top), logits.shape[1]))
    arch = reader.manifest.teacher.arch
    title = f"Teacher {arch}: class activation maps of its top-{top} classes per image ({kind})"
    return draw_cam_grid(images, cams, logits, names, captions, title, png_path, top)


def _store_policy(reader, dataset):
    """The data set's view policy with the store's padding mode."""
    from kdpipe.views import with_pad_mode

    return with_pad_mode(dataset.policy, reader.manifest.views.pad_mode)


def verify_report(reader, verbose: bool = True) -> list:
    """Decode every chunk of every array; print and return each damaged one."""
    damage = reader.damage(decode=True)
    if verbose:
        if not reader.manifest.binding.bound:
            print(
                "digests     the older form (crc32c of each chunk, not bound to its array, position "
                "or store); re-extract the store for bound digests"
            )
        if not damage:
            place = "in place, of this store" if reader.manifest.binding.bound else "in place"
            print(
                f"verify      every chunk of {len(reader.checked_arrays())} arrays is present, {place} and "
                "decodes; array metadata as the manifest records it"
            )
        for d in damage:
            where = f"chunk {d.chunk} (samples {d.first}..{d.last})" if d.chunk is not None else "whole array"
            print(f"DAMAGED     {d.array} {where}: {d.what}")
    return damage


#: the most images one picture shows (a row each: more is unreadable and takes minutes to draw)
MAX_PICTURE_IMAGES = 64
#: the most random views --fidelity runs the teacher on (a few thousand give three digits)
MAX_FIDELITY_SAMPLES = 65536


def _check_options(cams, subclasses, png, fidelity, teacher, num_samples) -> None:
    """Refuse bad combinations before any store is opened."""
    for value, option in ((cams, "--cams"), (subclasses, "--subclasses")):
        if value is not None and not 0 <= int(value) <= MAX_PICTURE_IMAGES:
            raise KdpipeError(
                f"{option} takes a number of images from 0 to {MAX_PICTURE_IMAGES} (one picture), not {value}."
            )
    if fidelity and not 1 <= int(num_samples) <= MAX_FIDELITY_SAMPLES:
        raise KdpipeError(f"--num-samples must be from 1 to {MAX_FIDELITY_SAMPLES}, not {num_samples}.")
    if (cams or subclasses) and not png:
        raise KdpipeError("--cams and --subclasses draw a picture: pass --png PATH for it.")
    if cams and subclasses:
        raise KdpipeError("Pass either --cams or --subclasses, one picture per call.")
    if fidelity and not teacher:
        raise KdpipeError("--fidelity runs the teacher online: pass --teacher CKPT.")


def _only_target_set(reader, target: str | None) -> str:
    """The named target set, or the store's only one."""
    if target:
        return target
    sets = reader.target_sets()
    if not sets:
        raise StoreError(f"The store at {reader.path} has no target set yet; run `kdpipe cluster` first.")
    if len(sets) > 1:
        raise StoreError(f"The store at {reader.path} has target sets {', '.join(sets)}; name one with --target.")
    return sets[0]


def _draw_subclasses(reader, target, subclasses, png, data):
    from kdpipe.runs.plots import plot_subclass_maps

    name = _only_target_set(reader, target)
    return plot_subclass_maps(reader, reader.target_set(name), subclasses, png, _dataset_for(reader, data))


def _measure_fidelity(reader, teacher, data, num_samples, target, device, verbose) -> tuple[dict, str]:
    """Cached targets against the online teacher on random views; (per-target rows, mode)."""
    from kdpipe.engine.fidelity import measure_fidelity
    from kdpipe.models import load_teacher

    reader.check_teacher(teacher)
    dataset = _dataset_for(reader, data)
    t = reader.manifest.teacher
    model = load_teacher(t.arch, teacher, t.num_classes)
    # A 1-view store is trained with warp; a multi-view store replays its stored views.
    mode = "warp" if reader.num_views == 1 else "replay"
    fid = measure_fidelity(
        reader,
        model,
        dataset,
        num_samples=num_samples,
        target_set=target,
        device=device or "cpu",
        mode=mode,
        policy=_store_policy(reader, dataset),
    )
    if verbose:
        print(f"{mode} fidelity on {num_samples} random views (cosine, relative error vs. online teacher):")
        for name, row in fid.items():
            print(f"  {name:<24} cosine {row['cosine']:.4f}  rel_error {row['rel_error']:.4f}")
    return fid, mode


def inspect_store(
    store,
    cams: int = 0,
    png=None,
    subclasses: int = 0,
    target: str | None = None,
    fidelity: bool = False,
    teacher=None,
    data=None,
    num_samples: int = 256,
    device=None,
    verify: bool = False,
    verbose: bool = True,
) -> dict:
    """Print the store's description; optionally draw CAMs / sub-classes or measure the fidelity
    of its targets (warp for a 1-view store, replay otherwise) against the online teacher.

    Returns {"text": ..., "png": path or None, "fidelity": dict or None, "damage": list or None}.
    """
    from kdpipe.artifacts import open_store

    _check_options(cams, subclasses, png, fidelity, teacher, num_samples)
    png = picture_path(png) if png else None  # checked before any work
    reader = open_store(store, allow_incomplete=True)
    text = describe(reader)
    if verbose:
        print(text)
    result: dict[str, Any] = {"text": text, "png": None, "fidelity": None, "damage": None}
    if verify:
        result["damage"] = verify_report(reader, verbose)
    if cams or subclasses or fidelity:
        reader.require_complete()
    if cams:
        result["png"] = plot_cams(reader, _dataset_for(reader, data), cams, png)
    elif subclasses:
        result["png"] = _draw_subclasses(reader, target, subclasses, png, data)
    if result["png"] and verbose:
        print(f"wrote {result['png']}")
    if fidelity:
        result["fidelity"], result["fidelity_mode"] = _measure_fidelity(
            reader, teacher, data, num_samples, target, device, verbose
        )
    return result
