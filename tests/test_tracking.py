"""Experiment tracking: TensorBoard scalars per epoch under the output folder (local or a URI),
and MLflow when a tracking URI is set."""

from __future__ import annotations

import pytest

from biofm import storage
from biofm.errors import BiofmError
from biofm.train.tracking import Tracker
from conftest import tensorboard_scalars

EPOCHS = [{"epoch": 1, "train_loss": 2.5, "val_loss": 2.25, "lr": 1e-3, "windows_per_s": 400.0,
           "data_wait_fraction": 0.01, "workers": 1, "amp": True},
          {"epoch": 2, "train_loss": 2.0, "val_loss": 1.75, "lr": 5e-4, "windows_per_s": 410.0,
           "data_wait_fraction": 0.02, "workers": 1, "amp": True}]


def test_tensorboard_scalars_per_epoch(tmp_path):
    tracker = Tracker(str(tmp_path / "run"), "pretrain", {"lr": 1e-3})
    for m in EPOCHS:
        tracker.log(m, m["epoch"])
    tracker.close()
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert set(scalars) == {"train/loss", "val/loss", "lr", "windows_per_s", "data_wait_fraction", "workers"}
    assert scalars["val/loss"] == [(1, 2.25), (2, 1.75)] and scalars["train/loss"] == [(1, 2.5), (2, 2.0)]


def test_tensorboard_to_a_uri_is_uploaded_every_epoch(s3, tmp_path):
    out = "s3://biofm/tracking/run"
    tracker = Tracker(out, "finetune", {})
    tracker.log(EPOCHS[0], 1)
    files = storage.list_files(storage.join(out, "tensorboard"))
    assert len(files) == 1 and next(iter(files.values())) > 0  # watchable while the run goes on
    tracker.log(EPOCHS[1], 2)
    tracker.close()
    local = tmp_path / "copy"
    local.mkdir()
    for f in storage.list_files(storage.join(out, "tensorboard")):
        (local / storage.name(f)).write_bytes(storage.read_bytes(f))
    assert tensorboard_scalars(local)["val/loss"] == [(1, 2.25), (2, 1.75)]


def test_mlflow_when_a_tracking_uri_is_set(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store for the test; servers are the usual URI
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "biofm-test")
    tracker = Tracker(str(tmp_path / "run"), "pretrain-test", {"lr": 1e-3, "channels": ["PPG", "ECG"]})
    for m in EPOCHS:
        tracker.log(m, m["epoch"])
    tracker.close()
    client = mlflow.tracking.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("biofm-test").experiment_id])[0]
    assert run.info.run_name == "pretrain-test" and run.data.params == {"lr": "0.001", "channels": "['PPG', 'ECG']"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")] == [(1, 2.25), (2, 1.75)]


def test_mlflow_uri_without_mlflow_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "mlflow" else real_import(name, *a, **k))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    with pytest.raises(BiofmError, match=r"MLFLOW_TRACKING_URI is set but mlflow is not installed"):
        Tracker(str(tmp_path / "run"), "x", {})
