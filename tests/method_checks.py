"""Checks every method's test file makes the same way (imported by tests/test_method_*.py)."""

from __future__ import annotations

import pytest

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
