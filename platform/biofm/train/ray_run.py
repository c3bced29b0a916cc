"""One way to run a training loop on Ray Train, shared by pretraining and fine-tuning.

A run lives in ``<output_dir>/ray/ray_train`` (local, shared or a URI: Ray Train uploads there): Ray keeps the best checkpoint by a metric and the
last one there; a failed worker restarts from the last; rerunning with ``resume`` continues it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zlib
from pathlib import Path

from biofm import storage
from biofm.errors import BiofmError
from biofm.train import checkpoint

RUN_NAME = "ray_train"
POLL_INTERVAL_S = 0.25


def check_run_dir(output_dir: str, resume: bool, what: str, name: str = RUN_NAME) -> str:
    """The Ray storage folder of ``output_dir``; refuses to overwrite a run, or to resume none."""
    ray_dir = storage.join(output_dir, "ray")
    started = storage.exists(storage.join(ray_dir, name))
    if started and not resume:
        raise BiofmError(f"{output_dir} already holds a {what} run: pass --resume to continue it, "
                         "or choose another --output-dir")
    if resume and not started:
        raise BiofmError(f"nothing to resume in {output_dir}")
    return ray_dir


def worker_print(line: str) -> None:
    """Print a progress line once from a Ray Train worker. Ray Train patches ``print`` to log the
    line and, on a worker whose stdout Ray has wrapped, to print it too: every line came out twice."""
    print(line, file=sys.__stdout__, flush=True)


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed torch (masks, dropout; CPU and every GPU) from ``seed``, the worker's ``rank`` and the
    0-based ``epoch``, so an epoch run again after a restart draws what it drew the first time."""
    import torch

    torch.manual_seed(zlib.crc32(f"{seed}:{rank}:{epoch}".encode()))


def restored_training() -> dict | None:
    """The checkpoint blob a restarted worker continues from (Ray Train's latest committed
    checkpoint: after a worker or node failure, or for a run resumed with ``--resume``), or None."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if not restored:
        return None
    with restored.as_directory() as d:
        return checkpoint.load(d)


def report_epoch(metrics: dict, rank: int, save, commit_timeout_s: float = 120.0) -> None:
    """Report an epoch's ``metrics`` with a checkpoint that rank 0 writes by ``save(path)``, and
    wait until Ray Train has committed it. Ray's controller collects reports when it next polls
    the workers (every ``POLL_INTERVAL_S``; Ray's default is 2 s): a worker lost before then took
    its report with it, and the restart began one epoch earlier, or from scratch after the first.
    Once this returns, a failure redoes at most the epoch after it."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            save(Path(d) / checkpoint.FILENAME)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)
    ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=commit_timeout_s)


def mixed_precision(amp: bool, device):
    """AMP on a CUDA ``device`` when ``amp``: bf16 where the GPU supports it, else fp16 with
    gradient scaling; off on the CPU. Returns ``(autocast, scaler)``: ``with autocast():``
    around the forward pass, and ``scaler`` (a no-op when disabled) for the backward pass."""
    import functools

    import torch

    on = amp and device.type == "cuda"
    dtype = torch.bfloat16 if on and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=on and dtype == torch.float16)
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=on), scaler


def worker_cpus(requested: float, num_workers: int, cluster_cpus: float) -> float:
    """CPUs per training worker: ``requested``, lowered so the workers fit the cluster's CPUs
    (each worker reads its own batches, so no CPU needs to stay free for data loading)."""
    if cluster_cpus <= 0:
        raise BiofmError("training needs CPUs in the Ray cluster, it has none")
    return min(requested, cluster_cpus / num_workers)


def scaling_config(cfg, cluster: dict):
    """Ray Train's ``ScalingConfig`` for ``cfg`` (``num_workers``, ``cpus_per_worker``,
    ``gpus_per_worker`` when it has one, ``use_gpu``: None means when ``cluster`` has GPUs) on a
    cluster with the resources ``cluster`` (``{"CPU": n, "GPU": n}``)."""
    from ray.train import ScalingConfig

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster.get("GPU", 0) > 0
    cpus = worker_cpus(cfg.cpus_per_worker, cfg.num_workers, cluster.get("CPU", 0))
    gpus = getattr(cfg, "gpus_per_worker", 1)
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                         resources_per_worker={"CPU": cpus, **({"GPU": gpus} if use_gpu else {})})


def _reported_failure(error) -> str | None:
    """The message of a worker failure meant for people (a :class:`BiofmError`, or the
    FloatingPointError of too many NaN/Inf steps), unwrapped from Ray's exceptions; None for
    any other failure (its traceback is what a person needs then)."""
    for failure in error.worker_failures.values():
        seen = set()
        while failure is not None and id(failure) not in seen:
            seen.add(id(failure))
            if isinstance(failure, (BiofmError, FloatingPointError)):
                return str(failure)
            failure = getattr(failure, "cause", None) or failure.__cause__
    return None


def fit(train_loop, loop_config: dict, cfg, storage_path: str, metric: str, mode: str,
        name: str = RUN_NAME, callbacks=()) -> tuple[dict, list[dict]]:
    """Run ``train_loop`` on a ``TorchTrainer`` scaled by :func:`scaling_config`, with ``cfg``'s
    ``max_failures``, as run ``name`` under ``storage_path`` (the same name resumes it). Returns the
    best checkpoint by ``metric`` (``mode`` ``min`` or ``max``) as a loaded blob, and the
    per-epoch history of the last checkpoint. ``callbacks``: Ray Train callbacks (Tune's)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from biofm import output

    # how often Train's controller polls the workers (Ray: 2 s); each epoch waits for the poll that
    # commits its checkpoint (report_epoch), and a lost worker is noticed at the next one
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(POLL_INTERVAL_S))

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "quiet": output.quiet()},
        scaling_config=scaling_config(cfg, ray.cluster_resources()),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                             logging_config=output.train_logging_config(),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                                checkpoint_score_order=mode)),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as e:
        reported = _reported_failure(e)
        if reported is None:
            raise
        raise BiofmError(f"training stopped: {reported}") from None
    pick = min if mode == "min" else max
    best_ckpt = pick(result.best_checkpoints, key=lambda cm: cm[1][metric])[0]
    with best_ckpt.as_directory() as d:
        best = checkpoint.load(d)
    with result.checkpoint.as_directory() as d:
        history = checkpoint.load(d)["training"]["history"]
    return best, history
