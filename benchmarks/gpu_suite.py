"""Every CUDA code path of kdpipe run once and checked, and every GPU figure of issue 25
measured as a ratio within one run, on one GPU in at most about 8 minutes.

    python benchmarks/gpu_suite.py --out bench-out/gpu_suite.json [--md bench-out/gpu_suite.md]
        [--budget-s 480] [--device cuda] [--no-ray] [--only PART,...] [--set KEY=VALUE ...]
    python benchmarks/gpu_suite.py --device cpu --smoke --out bench-out/gpu_suite_smoke.json

``--smoke`` runs every part at toy size (tests/test_gpu_suite.py runs it on the CPU, so the
suite cannot rot before a GPU is lent). The data is synthetic and CIFAR-100-shaped
(``synthetic:n=N,classes=100,size=32``, made on the machine); teachers have random weights with
BN statistics calibrated on it (speed does not depend on the weights).

Parts, in order (gpu_suite_stage_one.py, gpu_suite_stage_two.py; each timed, skipped with a note when the budget left
would not cover its estimate, recorded with its error sentence when it fails; the suite goes
on):

- ``extract``: the training store (resnet32x4 teacher, every one of the 162 views, CAMs 2x2,
  identity features; extract_teacher, inline executor); bare teacher inference before and
  after on the same images: extraction img/s over bare (bar 0.95).
- ``cluster``: letKD's fit (K-means 4,096 centres: faiss-gpu or torch) and assignment pass:
  its img/s, and over the bare teacher's.
- ``train_methods``: cached KD / DKD / CAT-KD / letKD-2 step over the CE step (bar 0.98 for
  CAT-KD and KD); online CAT-KD and KD over cached against the ideal (t_CE + t_teacher) / t_CE.
- ``train_tiers``: cached CAT-KD and letKD-2 with targets on each ``--resident`` tier
  (device, host pinned, stream; the shared copy where this tree has it), each over device.
- ``amp``: CE and cached CAT-KD with and without AMP.
- ``cli_training``: ``kdpipe train-student`` end to end: each tier, --online-teacher, --amp,
  --gpus 1.
- ``kmeans``: K-means 4,096 centres on 3.2M x 256 vectors, torch on the GPU and faiss-gpu
  where it imports (goal under 10 s).
- ``sweep``: 4 trials sharing one GPU (--gpus-per-trial 0.25, Ray Tune) over one trial: total
  img/s; without Ray, 4 concurrent train-student processes instead.
- ``extract_ray``: extraction with Ray actors on the GPU (needs Ray).
- ``ray_train``: a student trained through Ray Train with one GPU worker (needs Ray).

Writes one JSON (every figure, per-part seconds and status, device, torch/CUDA versions, date)
and, with ``--md``, a Markdown section for docs/BENCHMARKS.md's GPU section.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite_context as C  # noqa: E402
import gpu_suite_stage_one as S1  # noqa: E402
import gpu_suite_stage_two as S2  # noqa: E402
import torch  # noqa: E402
from common import machine, write_json  # noqa: E402


@dataclass(frozen=True)
class Part:
    """One part of the suite: a function of the shared context returning its figures."""

    name: str
    run: Callable[[C.Ctx], dict]
    estimate_s: tuple[float, float]  # (one H100, full sizes; CPU smoke), seconds
    needs: tuple[str, ...] = ()  # what earlier parts made that it uses: "store" (extract), "targets" (cluster)
    ray: bool = False  # needs Ray (skipped with a note without it)
    what: str = ""


# Estimates: one H100 for the full sizes (a guess until the first GPU run calibrates them),
# 2 loaded CPU cores for the smoke sizes.
PARTS = [
    Part("extract", S1.part_extract, (60, 8), what="extraction (inline) over bare teacher inference"),
    Part("cluster", S1.part_cluster, (45, 6), ("store",), what="letKD fit + assignment pass img/s"),
    Part("train_methods", S2.part_train_methods, (40, 8), ("targets",), what="cached KD/DKD/CAT-KD/letKD-2 over CE"),
    Part("train_tiers", S2.part_train_tiers, (40, 8), ("targets",), what="each --resident tier over device"),
    Part("amp", S2.part_amp, (20, 5), ("targets",), what="AMP steps: CE and cached CAT-KD"),
    Part("cli_training", S2.part_cli_training, (45, 20), ("targets",), what="train-student end to end"),
    Part("kmeans", S1.part_kmeans, (40, 3), what="K-means 4096 centres, 3.2M x 256"),
    Part("sweep", S2.part_sweep, (70, 40), ("targets",), what="4 trials on one GPU over one trial"),
    Part("extract_ray", S1.part_extract_ray, (40, 20), ray=True, what="extraction with Ray actors"),
    Part("ray_train", S2.part_ray_train, (60, 25), ("targets",), ray=True, what="Ray Train, one worker"),
]
PART_NAMES = [p.name for p in PARTS]
MADE_BY = {"store": "store (extract part)", "targets": "letKD target set (cluster part)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-out/gpu_suite.json", help="the JSON written")
    p.add_argument("--md", default=None, help="also write the Markdown section here")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for all parts (default 480)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--smoke", action="store_true", help="toy sizes (the CPU test)")
    p.add_argument("--no-ray", action="store_true", help="as on a machine without Ray: its parts skip or fall back")
    p.add_argument("--only", default=None, help="comma-separated parts to run (with what they need)")
    p.add_argument("--workdir", default=None, help="stores and runs (default: a folder beside --out, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="change one size (Sizes field)"
    )
    return p.parse_args(argv)


def chosen_sizes(smoke: bool, sets: list[str]) -> C.Sizes:
    """FULL or SMOKE with ``--set KEY=VALUE`` changes (e.g. samples=1024 where a GPU is slow)."""
    sizes = C.SMOKE if smoke else C.FULL
    fields = {f.name: f for f in dataclasses.fields(C.Sizes)}
    changes = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            sys.exit(f"gpu_suite: --set takes KEY=VALUE with KEY among {', '.join(fields)}; got {item!r}.")
        kind = type(getattr(sizes, key))
        try:
            changes[key] = kind(value)
        except ValueError:
            sys.exit(f"gpu_suite: --set {key} takes a value of type {kind.__name__}, not {value!r}.")
    return dataclasses.replace(sizes, **changes)


class PartTimeout(Exception):
    """A part ran past its time limit (the SIGALRM handler raises it)."""


def _alarm(seconds: float):
    """Interrupt a part that runs far past its estimate (SIGALRM, main thread, POSIX)."""
    if not hasattr(signal, "SIGALRM"):
        return lambda: None

    def raise_timeout(signum, frame):
        raise PartTimeout(f"stopped after {seconds:.0f} s (past its estimate and the budget)")

    old = signal.signal(signal.SIGALRM, raise_timeout)
    signal.alarm(max(1, int(seconds)))

    def cancel():
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)

    return cancel


def error_sentence(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return (first if isinstance(err, C.CheckFailed) else f"{type(err).__name__}: {first}".rstrip(": "))[:500]


class Suite:
    """Runs the parts in order against one budget, recording each one's status, seconds and
    figures (or its skip note, or its error sentence and traceback tail)."""

    def __init__(self, ctx: C.Ctx, budget_s: float, only: set | None):
        self.ctx = ctx
        self.budget_s = budget_s
        self.only = only
        self.t0 = time.perf_counter()
        self.results: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def skip_reason(self, part: Part) -> str | None:
        if self.only is not None and part.name not in self.only:
            return "not asked for (--only)"
        missing = [n for n in part.needs if n not in self.ctx.made]
        if missing:
            return f"needs the {' and the '.join(MADE_BY[n] for n in missing)}, which no earlier part made"
        if part.ray and not self.ctx.ray:
            return "Ray is not importable here (or --no-ray): the Ray path is not checked"
        estimate = part.estimate_s[1 if self.ctx.smoke else 0]
        if estimate > self.left():
            return f"about {estimate:.0f} s needed, {max(self.left(), 0):.0f} s of the budget left"
        return None

    def run(self, part: Part) -> dict:
        reason = self.skip_reason(part)
        if reason is not None:
            entry = {"status": "skipped", "seconds": 0.0, "note": reason, "what": part.what}
        else:
            entry = self._run(part)
        self.results[part.name] = entry
        print(
            f"[gpu_suite] {part.name}: {entry['status']} ({entry['seconds']:.1f} s)"
            + (f": {entry.get('error') or entry.get('note')}" if entry.get("error") or entry.get("note") else ""),
            flush=True,
        )
        return entry

    def _run(self, part: Part) -> dict:
        estimate = part.estimate_s[1 if self.ctx.smoke else 0]
        cancel = _alarm(max(3 * estimate, self.left() + 60))
        t = time.perf_counter()
        entry: dict = {"what": part.what}
        try:
            figures = part.run(self.ctx)
            note, errors = figures.pop("note", None), figures.pop("errors", None)
            entry.update(status="failed" if errors else "ok", figures=figures)
            if errors:
                entry["error"] = "; ".join(errors)
            if note:
                entry["note"] = note
        except BaseException as err:  # noqa: BLE001 - a part's failure is recorded; the suite goes on
            if isinstance(err, KeyboardInterrupt):
                raise
            entry.update(status="failed", error=error_sentence(err))
            entry["traceback"] = traceback.format_exc().strip().splitlines()[-12:]
        finally:
            cancel()
            gc.collect()
            if self.ctx.cuda:  # give the part's cached blocks back: later parts start processes
                torch.cuda.empty_cache()
        entry["seconds"] = time.perf_counter() - t
        return entry


def package_versions() -> dict:
    out = {}
    for name in ("ray", "zarr", "numcodecs", "faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "click", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(dev: torch.device) -> dict:
    info = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["driver_free_gib"] = round(torch.cuda.mem_get_info(dev)[0] / 2**30, 1)
    return info


# Headline figures: (part, key path, label, bar or None)
HEADLINES = [
    ("train_methods", "cached_cat_kd_over_ce", "cached CAT-KD step / CE step", ">= 0.98"),
    ("train_methods", "cached_kd_over_ce", "cached KD step / CE step", ">= 0.98"),
    ("train_methods", "cached_dkd_over_ce", "cached DKD step / CE step", None),
    ("train_methods", "cached_letkd2_over_ce", "cached letKD-2 step / CE step", None),
    ("train_methods", "ideal_speedup", "ideal cached-over-online speed-up (t_CE + t_teacher) / t_CE", None),
    ("train_methods", "speedup_fraction_of_ideal_cat_kd", "CAT-KD: cached-over-online speed-up / ideal", None),
    ("train_methods", "speedup_fraction_of_ideal_kd", "KD: cached-over-online speed-up / ideal", None),
    ("train_tiers", "host_over_device_cat_kd", "CAT-KD: host (pinned) tier / device", None),
    ("train_tiers", "stream_over_device_cat_kd", "CAT-KD: stream tier / device", None),
    ("train_tiers", "shared_over_device_cat_kd", "CAT-KD: shared-copy tier / device", None),
    ("train_tiers", "host_over_device_letkd2", "letKD-2: host (pinned) tier / device", None),
    ("train_tiers", "stream_over_device_letkd2", "letKD-2: stream tier / device", None),
    ("train_tiers", "shared_over_device_letkd2", "letKD-2: shared-copy tier / device", None),
    ("amp", "amp_cached_cat_kd_over_ce", "AMP: cached CAT-KD step / CE step", None),
    ("amp", "amp_over_fp32_ce", "AMP over fp32: CE step", None),
    ("extract", "extract_over_bare", "extraction (inline) / bare teacher inference", ">= 0.95"),
    ("extract_ray", "extract_over_bare", "extraction (Ray actors) / bare teacher inference", ">= 0.95"),
    ("cluster", "assign_img_per_s", "assignment pass, img/s", None),
    ("cluster", "assign_over_bare", "assignment pass / bare teacher inference", None),
    ("kmeans", "seconds", "K-means 4,096 centres on 3.2M x 256, 20 iterations (s)", "< 10 s"),
    ("sweep", "total_over_one", "concurrent trials on one GPU (4; smoke: 2): total img/s / one trial's", None),
]


def headline_figures(results: dict) -> dict:
    out = {}
    for part, key, _label, _bar in HEADLINES:
        value = results.get(part, {}).get("figures", {}).get(key)
        if value is not None:
            out[f"{part}.{key}"] = value
    return out


def _fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown(res: dict) -> str:
    """The section for docs/BENCHMARKS.md's GPU section."""
    parts = res["parts"]
    lines = [
        f"### GPU suite: {res['device_name']}, {res['date'][:10]}",
        "",
        f"`{res['command']}` ({res['mode']} sizes; torch {res['torch']}, CUDA {res['cuda']}; "
        f"{res['total_seconds']:.0f} s of a {res['budget_s']:.0f} s budget; "
        f"JSON: `docs/results/{Path(res['out']).name}`).",
        "",
        "| figure | value | bar |",
        "| --- | --- | --- |",
    ]
    for part, key, label, bar in HEADLINES:
        value = parts.get(part, {}).get("figures", {}).get(key)
        if value is None:
            status = parts.get(part, {}).get("status", "absent")
            value = "not measured" + (f" (part {status})" if status != "ok" else " (see the part's note)")
        lines.append(f"| {label} | {_fmt(value)} | {bar or ''} |")
    lines += ["", "| part | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name in PART_NAMES:
        e = parts.get(name, {})
        note = (e.get("error") or e.get("note") or "").replace("|", "/")
        lines.append(f"| {name} | {e.get('status')} | {e.get('seconds', 0):.1f} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    from kdpipe.engine.device import resolve_device
    from kdpipe.errors import KdpipeError

    try:
        dev = resolve_device(args.device)
    except KdpipeError as err:
        sys.exit(f"gpu_suite: {err}")
    only = None
    if args.only:
        only = {x.strip() for x in args.only.split(",") if x.strip()}
        unknown = only - set(PART_NAMES)
        if unknown:
            sys.exit(f"gpu_suite: --only takes parts among {', '.join(PART_NAMES)}; unknown: {', '.join(unknown)}.")
        needed = set().union(*(p.needs for p in PARTS if p.name in only))
        only |= {"extract"} if needed else set()
        only |= {"cluster"} if "targets" in needed else set()
    import shutil
    import tempfile

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-suite-", dir=out.parent))
    work.mkdir(parents=True, exist_ok=True)
    sizes = chosen_sizes(args.smoke, args.sets)
    ctx = C.Ctx(dev=dev, sizes=sizes, work=work, smoke=args.smoke, ray=C.ray_importable() and not args.no_ray)
    suite = Suite(ctx, args.budget_s, only)
    print(
        f"[gpu_suite] {dev} ({device_info(dev)['device_name']}), {'smoke' if args.smoke else 'full'} sizes, "
        f"budget {args.budget_s:.0f} s, Ray {'yes' if ctx.ray else 'no'}",
        flush=True,
    )
    try:
        for part in PARTS:
            suite.run(part)
            report(suite, args, argv, out, complete=False)  # what ran so far survives a kill
    finally:
        ctx.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res = report(suite, args, argv, out, complete=True)
    print(
        f"[gpu_suite] {len(res['ok'])} ok, {len(res['skipped'])} skipped, {len(res['failed'])} failed "
        f"in {res['total_seconds']:.0f} s; wrote {out}" + (f" and {args.md}" if args.md else ""),
        flush=True,
    )
    return res


def report(suite: Suite, args, argv, out: Path, complete: bool) -> dict:
    """The JSON (and the Markdown section with --md) of the parts run so far."""
    ctx = suite.ctx
    res = {
        "benchmark": "gpu_suite",
        "complete": complete,
        "mode": "smoke" if ctx.smoke else "full",
        **device_info(ctx.dev),
        "packages": package_versions(),
        "ray_used": ctx.ray,
        "machine": machine(),
        "budget_s": args.budget_s,
        "total_seconds": time.perf_counter() - suite.t0,
        "sizes": dataclasses.asdict(ctx.sizes),
        "figures": headline_figures(suite.results),
        "parts": suite.results,
        "ok": [n for n, e in suite.results.items() if e["status"] == "ok"],
        "skipped": [n for n, e in suite.results.items() if e["status"] == "skipped"],
        "failed": [n for n, e in suite.results.items() if e["status"] == "failed"],
        "out": str(out),
    }
    write_json(out, res, argv, "gpu_suite.py")
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
