import dataclasses
import json
import struct
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from tsfm_public.models.tinytimemixer import TinyTimeMixerForPrediction

from biofm.cli import main
from biofm.config import ChannelsConfig, PretrainConfig, WindowsConfig, load_config
from biofm.errors import BiofmError
from biofm.preprocess import build_windows
from biofm.dataset import read_manifest
from biofm.sources.vitaldb import DirectorySource
from biofm.train import checkpoint
from biofm.train.evaluate import FLOORS, evaluate_ssl, load_pretrained, smoke
from biofm.train.pretrain import pretrain
from conftest import REAL_VITAL, ROOT, requires_realdata, tensorboard_scalars

pytestmark = [requires_realdata(REAL_VITAL), pytest.mark.timeout(600)]  # the shared run takes ~4 min

# 5 epochs at lr 2e-3 (then one resumed) beat the baselines on these six recordings
TINY = PretrainConfig(num_layers=2, epochs=5, batch_size=16, lr=2e-3, warmup_epochs=1, cpus_per_worker=0.5,
                      max_failures=1)


HELD_OUT = ["MICUA01_240724_190000_first100s",  # a patient seen in training, another recording
            "MICUB08_240520_230000_first100s"]  # a patient never seen in training


@pytest.fixture(scope="module")
def windows(ray_session, tmp_path_factory):
    """Windows of the real recordings (1 s stride), split by recording: 4 train, 2 held out."""
    out = tmp_path_factory.mktemp("windows")
    ids = sorted(p.stem for p in REAL_VITAL.glob("*.vital"))
    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
    cfg = dataclasses.replace(load_config(WindowsConfig, ROOT / "configs/windows.yaml"), stride_s=1.0)
    for split, cases in (("train", [i for i in ids if i not in HELD_OUT]), ("val", HELD_OUT)):
        build_windows(cases, DirectorySource(str(REAL_VITAL)), channels, cfg, out, split)
    return out


def _kill_a_worker_after_first_checkpoint(out, deadline_s=240):
    """SIGKILL the training worker once epoch 1 is in TensorBoard, which the worker writes after
    Ray Train has committed the epoch's checkpoint. The worker is a descendant of this process
    (the session's local Ray is started from it)."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        try:
            logged = tensorboard_scalars(out / "tensorboard").get("val/loss")
        except (OSError, struct.error):  # not written yet, or an event being written
            logged = None
        if logged:
            for p in psutil.Process().children(recursive=True):   # this session's Ray only, not another job's
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        p.kill()
                        return p.pid
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.5)
    return None


@pytest.fixture(scope="module")
def interrupted_run(windows, tmp_path_factory):
    """Pretraining on the real windows whose worker is killed after the first checkpoint, then
    resumed with one more epoch: the run directory, the history before and after resuming."""
    out = tmp_path_factory.mktemp("pretrain") / "fm"
    result = {}
    thread = threading.Thread(target=lambda: result.update(final=pretrain(TINY, windows, out)))
    thread.start()
    killed = _kill_a_worker_after_first_checkpoint(out)
    thread.join(timeout=600)
    assert killed and not thread.is_alive()
    history = json.loads((out / "training_history.json").read_text())
    assert result["final"] == history[-1]
    with pytest.raises(BiofmError, match="--resume"):
        pretrain(TINY, windows, out)
    resumed = pretrain(dataclasses.replace(TINY, epochs=TINY.epochs + 1), windows, out, resume=True)
    return out, history, resumed


@pytest.mark.slow  # the shared pretraining run
def test_pretrain_survives_a_killed_worker_and_writes_artifacts(interrupted_run, windows):
    out, history, _ = interrupted_run
    assert [h["epoch"] for h in history] == list(range(1, TINY.epochs + 1))
    # the worker's own record: the restarted worker began at epoch 2, from epoch 1's checkpoint
    assert [h["attempt"] for h in history] == [1] + [2] * (TINY.epochs - 1)
    # what a restart continues from (the fixture has resumed once more): optimizer, learning-rate step, AMP scaler
    last = max((checkpoint.load(p) for p in (out / "ray").rglob("checkpoint_*/model.pt")),
               key=lambda b: b["training"]["epoch"])["training"]
    assert {"optimizer", "scaler", "global_step", "epoch", "attempts", "history"} <= set(last)
    assert last["epoch"] == TINY.epochs + 1 and last["attempts"] == 3 and last["global_step"] > 0  # after --resume
    assert last["optimizer"]["state"]
    for key in ("train_loss", "train_mse", "train_stft", "val_loss", "val_masked_mse", "windows_per_s", "lr"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in history), key
    assert history[0]["bad_steps"] == 0 and history[0]["windows_per_s"] > 0
    assert 0 <= history[-1]["data_wait_fraction"] <= 1 and history[-1]["first_batch_wait_s"] <= history[-1]["train_s"]
    logged = tensorboard_scalars(out / "tensorboard")["val/loss"]  # every epoch once: none was run twice
    assert sorted((e, round(v, 5)) for e, v in logged) == [(h["epoch"], round(h["val_loss"], 5)) for h in history + [
        json.loads((out / "training_history.json").read_text())[-1]]]
    n_train = read_manifest(windows, "train")["windows_kept"]  # every window once per epoch
    assert all(round(h["windows_per_s"] * h["train_s"]) == n_train for h in history)
    config = json.loads((out / "training_config.json").read_text())
    assert config["mask_ratio"] == 0.4 and config["num_layers"] == 2
    everything = json.loads((out / "training_history.json").read_text())  # after the resumed epoch too
    assert config["best_epoch"] == min(everything, key=lambda h: h["val_loss"])["epoch"]  # Ray kept the best
    blob = checkpoint.load(out / "best_model.pt")
    assert blob["description"]["channels"] == ["PPG", "ECG"]
    assert blob["description"]["data_spec"]["sample_rate_hz"] == 125
    assert "training" not in blob  # the artifact holds the model, not the optimizer
    assert load_pretrained(out / "best_model.pt").encoder(torch.zeros(1, 2, 1250)).shape == (1, 2, 10, 192)
    assert TinyTimeMixerForPrediction.from_pretrained(out / "encoder").backbone.config.d_model == 192
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert (out / "reconstruction.png").stat().st_size > 10_000


@pytest.mark.slow  # the shared pretraining run
def test_resume_continues_from_the_last_checkpoint(interrupted_run):
    out, history, resumed = interrupted_run
    again = json.loads((out / "training_history.json").read_text())
    assert [h["epoch"] for h in again] == list(range(1, TINY.epochs + 2)) and again[:-1] == history
    assert resumed["epoch"] == TINY.epochs + 1 and resumed["attempt"] == 3


def test_smoke_on_real_windows(windows, tmp_path, capsys):
    m = smoke(windows, tmp_path / "smoke")
    assert m["passed"], m["checks"]
    assert m["shapes"] == {"input": [8, 2, 1250], "tokens": [8, 10, 192], "output": [8, 2, 1250]}
    n_train = read_manifest(windows, "train")["windows_kept"]  # fewer than 64 in this small set
    assert m["windows"] == min(64, n_train) and len(m["step_losses"]) == m["windows"] // 8
    assert json.loads((tmp_path / "smoke" / "smoke_metrics.json").read_text())["passed"] is True
    assert checkpoint.load(tmp_path / "smoke" / "best_model.pt")["description"]["kind"] == "masked_signal_model"
    assert main(["smoke", "--data-dir", str(windows), "--output-dir", str(tmp_path / "cli")]) == 0
    assert "[smoke] loss_decreased  ok" in capsys.readouterr().out


@pytest.mark.slow  # the shared pretraining run
def test_pretrained_model_against_baselines_on_held_out_recordings(interrupted_run, windows, tmp_path):
    """On recordings it never saw, the pretrained model beats predicting zero and linear
    interpolation on PPG, and interpolation on ECG. (Beating zero on ECG, whose sharp QRS
    complexes punish mistimed predictions, needs more data than these six recordings.)"""
    best = interrupted_run[0] / "best_model.pt"
    result = evaluate_ssl(best, windows, "val")
    assert result["windows"] == read_manifest(windows, "val")["windows_kept"]
    ppg, ecg = result["masked_mse"]["PPG"], result["masked_mse"]["ECG"]
    assert ppg["model"] < ppg["zero"] and ppg["model"] < ppg["linear_interp"], ppg
    assert ecg["model"] < ecg["linear_interp"], ecg
    assert 0 < ppg["period_copy"] < 10 and 0 < ecg["period_copy"] < 10, (ppg, ecg)   # the third floor, same masks
    not_beaten = [f"{ch}: the model (masked MSE {v['model']:.4f}) does not beat {floor} ({v[floor]:.4f})"
                  for ch, v in (("PPG", ppg), ("ECG", ecg)) for floor in FLOORS if v["model"] >= v[floor]]
    assert [w for w in result["warnings"] if "does not beat" in w] == not_beaten
    assert main(["evaluate-ssl", "--checkpoint", str(best), "--data-dir", str(windows),
                 "--output", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["masked_mse"] == result["masked_mse"]


@pytest.mark.slow
def test_a_non_finite_loss_skips_the_step_on_every_worker_and_too_many_stop_the_run(windows, tmp_path):
    """Two DDP workers; one train window is NaN, so in each epoch one worker's batch gives a NaN
    loss. Both workers skip that step together (a worker stepping alone would leave DDP's
    gradient all-reduce without its partner), the epoch completes with one bad step counted, and
    the second epoch's bad step, one more than max_bad_steps allows, stops the run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "val").mkdir()
    for f in (windows / "val").glob("*.parquet"):
        (data / "val" / f.name).write_bytes(f.read_bytes())
        (data / "train" / f.name).write_bytes(f.read_bytes())
    table = pq.read_table(next((windows / "val").glob("*.parquet")))
    signal = table.column("signal").combine_chunks().to_numpy_ndarray()[:3].copy()
    signal[0, 0, 100:200] = np.nan
    poisoned = table.slice(0, 3).set_column(table.schema.get_field_index("case_id"), "case_id",
                                            pa.array(["poisoned"] * 3))
    poisoned = poisoned.set_column(poisoned.schema.get_field_index("signal"), "signal",
                                   pa.FixedShapeTensorArray.from_numpy_ndarray(signal))
    pq.write_table(poisoned.replace_schema_metadata(table.schema.metadata), data / "train" / "poisoned.parquet")

    cfg = dataclasses.replace(TINY, num_workers=2, epochs=2, max_bad_steps=1, max_failures=0)
    with pytest.raises(BiofmError, match=r"NaN/Inf loss or gradient in 2 steps by the end of epoch 2 \(max_bad_steps=1\)"):
        pretrain(cfg, data, tmp_path / "fm")
    epoch1 = checkpoint.load(next((tmp_path / "fm" / "ray").rglob("checkpoint_*/model.pt")))["training"]["history"]
    assert [(h["epoch"], h["bad_steps"], h["workers"]) for h in epoch1] == [(1, 1, 2)]
    assert np.isfinite(epoch1[0]["train_loss"]) and np.isfinite(epoch1[0]["val_loss"])
