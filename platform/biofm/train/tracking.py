"""Experiment tracking: per-epoch scalars to TensorBoard, and to MLflow when a tracking URI is set.

Every training loop (pretraining, fine-tuning, and so every Tune trial) logs through one
:class:`Tracker` on its rank-0 worker: the epoch's numbers (losses, validation metrics, learning
rate, windows/s, data wait) as TensorBoard scalars under ``<output_dir>/tensorboard/`` (local or a
URI: the event files are uploaded after every epoch, so a running job can be watched), and, when
``MLFLOW_TRACKING_URI`` is set, as an MLflow run with the config as parameters.

    tensorboard --logdir <output_dir>          # one run, or a Tune experiment's trials side by side
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from biofm import storage
from biofm.errors import BiofmError


class Tracker:
    """Scalars of one run; ``params`` (flat, JSON-able) go to MLflow as the run's parameters."""

    def __init__(self, output_dir: str, run_name: str, params: dict):
        from tensorboardX.event_file_writer import EventsWriter  # synchronous: on disk at flush()

        self.target = storage.join(output_dir, "tensorboard")
        self._tmp = tempfile.TemporaryDirectory(prefix="biofm-tb-") if storage.is_uri(self.target) else None
        self.folder = Path(self._tmp.name if self._tmp else self.target)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = EventsWriter(str(self.folder / "events"))
        self.mlflow = _mlflow_run(run_name, params) if os.environ.get("MLFLOW_TRACKING_URI") else None

    def log(self, metrics: dict, epoch: int) -> None:
        """The numeric entries of ``metrics`` at step ``epoch``, as ``train/...``, ``val/...`` or
        their own name (lr, windows_per_s, data_wait_fraction...)."""
        scalars = {_tag(k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for tag, value in scalars.items():
            self.writer.write_event(Event(wall_time=time.time(), step=epoch, summary=scalar(tag, value)))
        self.writer.flush()
        if self._tmp:
            for f in self.folder.iterdir():
                storage.write(storage.join(self.target, f.name), lambda out, f=f: out.write(f.read_bytes()))
        if self.mlflow:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=epoch)

    def close(self) -> None:
        self.writer.close()
        if self.mlflow:
            self.mlflow.end_run()
        if self._tmp:
            self._tmp.cleanup()


def _tag(key: str) -> str:
    for split in ("train", "val"):
        if key.startswith(split + "_"):
            return f"{split}/{key.removeprefix(split + '_')}"
    return key


def _mlflow_run(run_name: str, params: dict):
    """An active MLflow run in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``biofm``)."""
    try:
        import mlflow
    except ImportError:
        raise BiofmError("MLFLOW_TRACKING_URI is set but mlflow is not installed: pip install 'biofm[mlflow]' "
                         "(or unset MLFLOW_TRACKING_URI)") from None
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "biofm"))
    mlflow.start_run(run_name=run_name)
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    return mlflow
