"""Data-parallel training on Ray Train: ``--gpus N`` for train-student and train-teacher.

The driver checks the configuration and creates the run directory, then starts N workers
with Ray Train's ``TorchTrainer`` (one per GPU with NCCL; on a machine or cluster without
GPUs, N CPU workers with gloo). Each worker runs the same stage code on its share of every
batch (``kdpipe.engine.parallel``); rank 0 writes metrics and checkpoints into the run
directory, which every worker can reach (a shared path on a cluster). Resume is kdpipe's
own: ``--resume RUN`` restarts the workers from the run's ``checkpoints/latest.pth``.

Whether workers use GPUs is decided from the Ray cluster's resources (not the driver's),
unless ``device="cpu"`` is asked for. The global batch and the learning rate are the
recipe's: each worker takes batch / N samples a step (the references train their multi-GPU
runs with one global batch and one lr, mdistiller's DataParallel).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from kdpipe.errors import KdpipeError

__all__ = ["run_data_parallel", "worker_device"]


def _use_gpus(ray, workers: int, device: str | None) -> bool:
    if device is not None and str(device).startswith("cpu"):
        return False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device is not None and str(device).startswith("cuda") and gpus < workers:
        raise KdpipeError(
            f"--gpus {workers} with --device cuda needs {workers} GPUs in the Ray cluster; it has {gpus}."
        )
    return gpus >= workers


def worker_device(use_gpu: bool):
    """The torch device of this Ray Train worker."""
    import torch

    if use_gpu:
        from ray.train.torch import get_device

        return get_device()
    return torch.device("cpu")


def _cpus_per_worker(ray, workers: int) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)


def run_data_parallel(
    entry: Callable,
    payload: dict,
    workers: int,
    run_dir: str,
    device: str | None = None,
    ray_address: str | None = None,
) -> None:
    """Run ``entry(payload)`` on ``workers`` Ray Train workers (DDP); raises one sentence
    when a worker fails, saying how to resume."""
    from kdpipe.distributed.executor import prepare_ray_import, ray_cluster

    prepare_ray_import(ray_address)  # before Ray's first import: a local Ray binds to loopback only
    try:
        import ray.train  # noqa: F401 - the extra ray[train] must be installed
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise KdpipeError(
            "--gpus needs Ray Train: pip install 'ray[train]' (kdpipe's default install has it)."
        ) from None

    with ray_cluster(ray_address) as ray:
        use_gpu = _use_gpus(ray, workers, device)
        threads = _cpus_per_worker(ray, workers)
        trainer = TorchTrainer(
            _worker_main,
            train_loop_config={"entry": entry, "payload": dict(payload, use_gpu=use_gpu, threads=threads)},
            scaling_config=ScalingConfig(
                num_workers=int(workers), use_gpu=use_gpu, resources_per_worker={"CPU": threads}
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name="ray-train", storage_path=os.path.join(os.path.abspath(run_dir), "ray")),
        )
        try:
            trainer.fit()
        except Exception as err:  # noqa: BLE001 - Ray wraps the worker's error; say it in one sentence
            raise KdpipeError(
                f"A data-parallel worker failed ({_first_line(err)}); the run directory {run_dir} "
                f"keeps every finished epoch: continue it with --resume {run_dir}."
            ) from None


def _first_line(err: BaseException) -> str:
    cause = err
    for _ in range(8):  # unwrap Ray's error chain to the worker's own exception
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None:
            break
        cause = inner
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _worker_main(config: dict) -> None:
    import torch

    payload = config["payload"]
    torch.set_num_threads(int(payload.get("threads") or 1))
    config["entry"](payload)
