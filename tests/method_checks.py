"""Checks every method's test file makes the same way (imported by tests/test_method_*.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import yaml

from kdpipe.config.configs import ExtractConfig, StudentConfig


def method_store(tiny_store: dict, tmp_path_factory, method: str) -> dict:
    """The session's tiny teacher extracted (inline, every view, no CAMs or features) into a
    store of ``method``'s arrays: the ``tiny_store`` record with this store's path."""
    from kdpipe.stages.extract import extract_teacher

    path = tmp_path_factory.mktemp(method) / "store.zarr"
    extract_teacher(
        ExtractConfig(
            teacher=tiny_store["teacher"],
            arch="resnet8",
            data=tiny_store["data"],
            out=str(path),
            cam_res=(),
            features=(),
            methods=(method,),
            shard_size=16,
            executor="inline",
        ),
        progress=False,
        verbose=False,
    )
    return dict(tiny_store, path=str(path))


def stored_kind(store: dict, make_kind: Callable[[], Any]) -> Any:
    """``make_kind()`` bound to ``store`` as a cached source binds it (its stored stages or
    sizes read from the store)."""
    from kdpipe.artifacts import open_store
    from kdpipe.engine.sources import kind_context

    kind = make_kind()
    return kind.bind(kind_context(open_store(store["path"]), [kind], None, "cpu"))


def replayed_targets(store: dict, make_kind: Callable[[], Any]) -> Iterator[tuple[Any, dict, dict]]:
    """Every batch of 16 of one replay plan (seed 3, epoch 1) over ``store``'s samples: the
    batch, the targets of ``make_kind()`` read from the store, and the online teacher's on
    the same (replayed) views."""
    from kdpipe.artifacts import open_store
    from kdpipe.data import load_dataset, normalize
    from kdpipe.engine.sources import CachedTargets, OnlineTargets
    from kdpipe.models import load_teacher

    reader, dataset = open_store(store["path"]), load_dataset(store["data"])
    teacher = load_teacher("resnet8", store["teacher"], dataset.num_classes)
    policy = dataset.policy
    cached = CachedTargets(reader, [make_kind()], device="cpu", policy=policy)
    online = OnlineTargets(teacher, [make_kind()], reader=reader, policy=policy, views="replay")
    plan = cached.plan(torch.arange(reader.num_samples), 3, 1)
    cached.begin_epoch(plan, 16)
    try:
        for batch in plan.batches(16):
            images = policy.apply_images(dataset.get_batch(batch.indices.numpy()), batch.params)
            x = normalize(images, dataset.mean, dataset.std)
            yield batch, cached.targets(batch, x), online.targets(batch, x)
    finally:
        cached.close()


def trains_one_epoch_and_evaluates(store: dict, tmp_path, method: str, source: str, **fields) -> None:
    """One epoch of ``method`` from ``store`` (cached targets, or the online teacher), and
    evaluate's rebuild of the student scores as the run did. ``fields``: further
    ``StudentConfig`` fields (or another ``epochs``)."""
    from kdpipe.stages.evaluate import evaluate
    from kdpipe.stages.train import train_student

    online = {"online_teacher": store["teacher"]} if source == "online" else {}
    settings = {"epochs": 1, **fields}
    s = train_student(
        StudentConfig(store=store["path"], student="resnet8", method=method, batch_size=16, **online, **settings),
        out=tmp_path,
        progress=False,
        plot=False,
    )
    assert s["target_source"] == source and s["final_top1"] is not None
    assert evaluate(s["run_dir"])["top1"] == pytest.approx(s["best_top1"])  # the student rebuilt as trained


def mdistiller_cifar100_doc(distiller: str) -> dict:
    """The keys and values of mdistiller configs/cifar100/<distiller>.yaml for resnet32x4 ->
    resnet8x4 (the method's own section left at cfg.py's defaults, as those files do)."""
    return {
        "EXPERIMENT": {"NAME": "", "TAG": f"{distiller.lower()},res32x4,res8x4", "PROJECT": "cifar100_baselines"},
        "DISTILLER": {"TYPE": distiller, "TEACHER": "resnet32x4", "STUDENT": "resnet8x4"},
        "SOLVER": {
            "BATCH_SIZE": 64,
            "EPOCHS": 240,
            "LR": 0.05,
            "LR_DECAY_STAGES": [150, 180, 210],
            "LR_DECAY_RATE": 0.1,
            "WEIGHT_DECAY": 0.0005,
            "MOMENTUM": 0.9,
            "TYPE": "SGD",
        },
    }


def read_mdistiller_cifar100_yaml(tmp_path, distiller: str, sections: dict | None = None) -> StudentConfig:
    """mdistiller configs/cifar100/<distiller>.yaml (``mdistiller_cifar100_doc``, with
    ``sections`` replacing or adding top-level sections) read as ``train-student --config``
    reads it; checks the method, pair and solver it gives, and returns the config."""
    from kdpipe.config.config_files import student_from_file

    path = tmp_path / f"{distiller.lower()}.yaml"
    path.write_text(yaml.safe_dump({**mdistiller_cifar100_doc(distiller), **(sections or {})}))
    cfg, _ = student_from_file(path)
    solver = (cfg.method, cfg.student, cfg.lr, cfg.weight_decay, cfg.epochs)
    assert solver == (distiller.lower(), "resnet8x4", 0.05, 5e-4, 240)
    return cfg
