"""Staged fine-tuning on Ray Train, its baselines, and the subject-wise cross-validation, on the
real BUT-PPG subset."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from biofm.cli import main
from biofm.config import ButppgConfig, ChannelsConfig, FinetuneConfig, WindowsConfig, load_config
from biofm.errors import BiofmError, ConfigError
from biofm.dataset import data_spec
from biofm.train import checkpoint, transfer
from biofm.tasks import TASKS
from biofm.train.finetune import build_classifier, class_weights, oversampling, read_split
from conftest import REAL_BUTPPG, ROOT, requires_realdata, write_pretrained

CHANNELS = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
TINY = FinetuneConfig(epochs=2, head_epochs=1, batch_size=16, lr=1e-4, cpus_per_worker=0.5)


def test_checkpoint_built_for_other_data_is_refused(tmp_path, capsys):
    spec = data_spec(CHANNELS.select(ButppgConfig().channels), WINDOWS)
    other = json.loads(json.dumps(spec))
    other["filters"]["PPG"]["band_hz"] = [0.5, 8.0]
    blob = checkpoint.load(write_pretrained(tmp_path / "a.pt"))
    bad = checkpoint.save(tmp_path / "a.pt", blob["model"], {**blob["description"], "data_spec": other})
    with pytest.raises(ConfigError, match="PPG filter"):
        build_classifier(FinetuneConfig(), bad, spec)
    with pytest.raises(ConfigError, match=r"has channels \['PPG', 'ECG'\], --pretrain-channels says \['PPG'\]"):
        build_classifier(FinetuneConfig(pretrain_channels=("PPG",)), write_pretrained(tmp_path / "b.pt"), spec)
    with pytest.raises(ConfigError, match=r"the fine-tuning channels \['RESP'\] are none of the data's"):
        build_classifier(FinetuneConfig(channels=("RESP",)), write_pretrained(tmp_path / "c.pt"), spec)
    args = ["finetune", "--config", str(ROOT / "configs/finetune_butppg.yaml"), "--pretrained", str(tmp_path / "b.pt"),
            "--data-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")]
    assert main(args + ["--finetune-channels", "PPG"]) == 2       # names, not a count: past the flags to the data
    assert "no labelled windows" in capsys.readouterr().err


def test_channels_by_name_one_rule_for_any_encoder_and_task(tmp_path):
    """The model's channels: the task's, then the encoder's it lacks (absent); a channel the encoder
    lacks is added. A PPG+ECG encoder on a PPG-only task, and a PPG-only encoder on BUT-PPG's five."""
    from biofm.model.classifier import channel_plan

    assert channel_plan(["PPG", "ECG"], ["PPG"]) == ["PPG", "ECG"]
    assert channel_plan(["PPG"], ["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"]) == ["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"]
    assert channel_plan(["PPG", "ECG"], ["ACC_X", "PPG"]) == ["ACC_X", "PPG", "ECG"]
    ppg_only = data_spec(CHANNELS.select(["PPG"]), WINDOWS)
    model, desc = build_classifier(FinetuneConfig(), write_pretrained(tmp_path / "two.pt"), ppg_only,
                                   {"name": "arrhythmia-af", "kind": "binary", "classes": ["other rhythm", "AF"]})
    assert desc["channels"] == ["PPG", "ECG"] and desc["absent"] == ["ECG"]
    assert list(desc["data_spec"]["filters"]) == ["PPG", "ECG"] and desc["data_spec"]["channels"] == ["PPG", "ECG"]
    assert model.encoder.config.num_input_channels == 2
    five = data_spec(CHANNELS.select(ButppgConfig().channels), WINDOWS)
    model, desc = build_classifier(FinetuneConfig(), write_pretrained(tmp_path / "one.pt", channels=("PPG",)), five)
    assert desc["channels"] == list(ButppgConfig().channels) and desc["absent"] == []
    assert model.encoder.config.num_input_channels == 5 and desc["pretrained_channels"] == ["PPG"]
    picked, desc = build_classifier(FinetuneConfig(channels=("PPG", "ECG")), tmp_path / "two.pt", five)
    assert desc["channels"] == ["PPG", "ECG"]                        # the data's ACC left out


def test_baselines_are_the_same_fine_tuning_with_other_settings(tmp_path, monkeypatch):
    calls = []

    def fake(cfg, pretrained, data_dir, out, address=None):
        calls.append((cfg, out))
        return {"test": {k: 0.5 for k in transfer.reported(dataclasses.asdict(TASKS["butppg-quality"]))} | {"n": 3}}

    monkeypatch.setattr(transfer, "finetune", fake)
    monkeypatch.setattr(transfer, "_data_task", lambda split_dir: dataclasses.asdict(TASKS["butppg-quality"]))
    report = transfer.compare_variants(TINY, "fm.pt", tmp_path / "data", tmp_path / "out")
    assert list(report) == ["finetuned", "scratch", "linear_probe"]
    assert [(c.init, c.unfreeze_last_n) for c, _ in calls] == [("pretrained", 2), ("scratch", 2), ("pretrained", 0)]
    assert [o.removeprefix(f"{tmp_path}/") for _, o in calls] == [
        "out", "out/baselines/scratch", "out/baselines/linear_probe"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["scratch"]["n"] == 3


@requires_realdata(REAL_BUTPPG)
def test_subject_wise_cross_validation(butppg_data, tmp_path, monkeypatch):
    """Folds of subjects: each subject tested once, never in its fold's train or val, every
    record tested once; each fold's data and one fine-tuning run per variant. (The staged
    fine-tuning run itself is checked on the smoke pipeline's output, test_pipeline.py.)"""
    runs = []

    def fake(cfg, pretrained, data_dir, out, address=None):
        runs.append((cfg, data_dir, out))
        n = len(read_split(f"{data_dir}/test")["label"])
        return {"test": {k: 0.5 for k in transfer.reported(dataclasses.asdict(TASKS["butppg-quality"]))} | {"n": n}}

    monkeypatch.setattr(transfer, "finetune", fake)
    with pytest.raises(ConfigError, match="--folds must be between 3"):
        transfer.cross_validate(TINY, "fm.pt", butppg_data, tmp_path / "cv", folds=2)
    report = transfer.cross_validate(TINY, "fm.pt", butppg_data, tmp_path / "cv", folds=3)
    assert report["folds"] == 3 and report["windows"] == 51 and report["subjects"] == 13 and report["task"] == "butppg-quality"
    tests = [set(f["subjects"]["test"]) for f in report["per_fold"]]
    assert sum(len(t) for t in tests) == 13 and len(set().union(*tests)) == 13
    for f in report["per_fold"]:
        parts = f["subjects"]
        assert not (set(parts["train"]) & set(parts["test"]) or set(parts["val"]) & set(parts["test"]))
        assert not set(parts["train"]) & set(parts["val"])
    assert sum(f["finetuned"]["n"] for f in report["per_fold"]) == 51
    assert [(c.init, c.unfreeze_last_n, o.removeprefix(f"{tmp_path}/")) for c, _, o in runs[:3]] == [
        ("pretrained", 2, "cv/fold_0/finetuned"), ("scratch", 2, "cv/fold_0/scratch"),
        ("pretrained", 0, "cv/fold_0/linear_probe")]
    assert len(runs) == 9 and report["summary"]["scratch"]["auroc"] == {"mean": 0.5, "std": 0.0}
    fold0 = pq.read_table(tmp_path / "cv" / "fold_0" / "data" / "train", columns=["subject_id"])
    assert set(fold0.column("subject_id").to_pylist()) == set(report["per_fold"][0]["subjects"]["train"])
    assert json.loads((tmp_path / "cv" / "cv_report.json").read_text())["windows"] == 51
    assert set(report["summary"]["finetuned"]) == {"auroc", "auprc", "balanced_accuracy", "f1_good", "accuracy"}


@requires_realdata(REAL_BUTPPG)
def test_sampler_balance_repeats_minority_records(butppg_data):
    from biofm.train.batches import WindowBatches, scan

    labels = read_split(butppg_data / "train")["label"]
    counts = np.bincount(labels, minlength=2)
    minority = int(np.argmin(counts))
    repeat = int(round(counts.max() / counts.min()))
    batches = WindowBatches(scan(str(butppg_data / "train")), ["label", "present"], 16, train=True,
                            cache_mb=float("inf"), repeat=oversampling("sampler", labels))
    epoch = list(batches.epoch(0))
    got = np.bincount(np.concatenate([b["label"].numpy() for b in epoch]), minlength=2)
    assert got[minority] == counts[minority] * repeat and got[1 - minority] == counts[1 - minority]
    assert epoch[0]["present"].shape == (16, 5) and epoch[0]["present"].dtype == torch.bool
    assert oversampling("weighted", labels) is None


def test_variants_differ_only_where_they_should():
    assert transfer.variant_config(TINY, "finetuned") == TINY
    assert dataclasses.replace(transfer.variant_config(TINY, "scratch"), init="pretrained") == TINY
    assert dataclasses.replace(transfer.variant_config(TINY, "linear_probe"), unfreeze_last_n=2) == TINY


def test_class_weighted_cross_entropy_is_the_default():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])        # 3 poor, 9 good
    assert FinetuneConfig().class_balance == "weighted"
    assert class_weights("weighted", labels) == pytest.approx([2.0, 2 / 3])
    assert class_weights("sampler", labels) == class_weights("none", labels) == [1.0, 1.0]
    # each class weighs as much in the loss: weights times counts are equal
    w = np.array(class_weights("weighted", labels))
    assert w[0] * 3 == pytest.approx(w[1] * 9)


def test_scratch_starts_from_random_weights_and_pretrained_from_the_checkpoint(tmp_path):
    """``--init scratch``: the checkpoint gives the architecture only; ``pretrained``: its weights."""
    spec = data_spec(CHANNELS.select(ButppgConfig().channels), WINDOWS)
    path = write_pretrained(tmp_path / "fm.pt")
    blob = checkpoint.load(path)
    source = {k.removeprefix("encoder."): v for k, v in blob["model"].items() if k.startswith("encoder.")}
    models = {init: build_classifier(dataclasses.replace(FinetuneConfig(), init=init), path, spec)
              for init in ("pretrained", "scratch")}
    random_init = [k for k, v in source.items() if v.dim() >= 2]  # LayerNorm weights start at 1 either way
    for init, (model, desc) in models.items():
        assert desc["init"] == init
        mine = model.encoder.state_dict()
        same = [k for k in random_init if mine[k].shape == source[k].shape and torch.equal(mine[k], source[k])]
        kept = [k for k in random_init if mine[k].shape == source[k].shape]
        if init == "pretrained":   # layers whose shape does not depend on the channels come over as they are
            assert len(kept) > 10 and same == kept
        else:
            assert same == []
    again, _ = build_classifier(dataclasses.replace(FinetuneConfig(), init="scratch"), path, spec)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), models["scratch"][0].state_dict().values()))


REAL_ARRHYTHMIA = REAL_BUTPPG.parent / "ppg_arrhythmia"


@requires_realdata(REAL_ARRHYTHMIA)
def test_multiclass_fine_tuning_as_the_benchmarks_row_on_the_tasks_own_split(ray_session, tmp_path, capsys):
    """Six rhythms: a softmax head of 6, the epoch kept by val macro-F1, the benchmark's
    fine-tuned row equal to the kept model's answers on the test patient; predict answers with
    the most probable rhythm by name; a Tune search judges it by val macro-F1, in the task's words.
    The encoder is PPG + ECG, the task PPG only: ECG is absent, by the one rule of channels."""
    from biofm import benchmark as bm
    from biofm.tasks import TASKS, prepare_task
    from biofm.train.finetune import load_classifier, predict_outputs
    from biofm.tune import run_search
    from biofm.config import TuneSearchConfig

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("181220181216", "190111200054", "190124211244", "191008200756"):   # every rhythm in each
        (raw / f"MPA_{name}.mat").symlink_to(REAL_ARRHYTHMIA / f"MPA_{name}.mat")
    ppg = CHANNELS.select(["PPG"])
    prepare_task(TASKS["arrhythmia-rhythm"], raw, tmp_path / "task", ppg, WINDOWS, split_ratios=(0.5, 0.25, 0.25))
    fm = write_pretrained(tmp_path / "fm.pt")
    cfg = dataclasses.replace(TINY, epochs=3, batch_size=64, lr=1e-3)
    report = bm.benchmark([f"fm={fm}"], [str(tmp_path / "task")], str(tmp_path / "bench"), resamples=50,
                          fixed_split=True, finetune=cfg)
    run = tmp_path / "bench" / "finetune" / "arrhythmia-rhythm" / "fold_0"
    model, desc = load_classifier(run / "best_model.pt")
    assert model.head.out_features == 6 and desc["task"]["kind"] == "multiclass" and "threshold" not in desc
    assert desc["channels"] == ["PPG", "ECG"] and desc["absent"] == ["ECG"]
    history = json.loads((run / "training_history.json").read_text())
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert history[metrics["best_epoch"] - 1]["val_macro_f1"] == max(h["val_macro_f1"] for h in history)
    test = read_split(tmp_path / "task" / "test", desc["channels"])
    assert test["signal"].shape[1] == 2 and not test["present"][:, 1].any()
    probs = predict_outputs(model, test["signal"], test["present"], desc)
    assert probs.shape == (len(test["label"]), 6) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert metrics["test"]["macro_f1"] == pytest.approx(bm.metrics("multiclass", test["label"], probs)["macro_f1"])
    row = report["tasks"]["arrhythmia-rhythm"]["rows"][bm.FINETUNED]
    assert row["macro_f1"]["value"] == pytest.approx(metrics["test"]["macro_f1"])
    assert "fine-tuned - random weights" in report["tasks"]["arrhythmia-rhythm"]["differences"]
    # predict answers with the rhythm's name and each rhythm's probability, in the summary too
    import scipy.io

    seg = scipy.io.loadmat(sorted(raw.glob("*.mat"))[0])["ppgseg"][:3].ravel()    # 30 s of PPG at 100 Hz
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "p.csv").write_text("Time [s],PPG\n" + "".join(f"{i / 100:.2f},{v:.5f}\n" for i, v in enumerate(seg)))
    assert main(["predict", "--model", str(run / "best_model.pt"), "--input", str(tmp_path / "new"),
                 "--output", str(tmp_path / "p")]) == 0
    answers = pq.read_table(tmp_path / "p" / "predictions.parquet").to_pylist()
    assert answers and all(a["class"] in TASKS["arrhythmia-rhythm"].classes for a in answers)
    assert all(abs(sum(a[f"p_{c.lower()}"] for c in ("sinus", "PVC", "PAC", "VT", "SVT", "AF")) - 1) < 1e-4 for a in answers)
    header = (tmp_path / "p" / "summary.csv").read_text().splitlines()[0].split(",")
    assert header == ["recording_id", "status", "windows", "share_predicted_sinus", "share_predicted_pvc",
                      "share_predicted_pac", "share_predicted_vt", "share_predicted_svt", "share_predicted_af", "reason"]
    # a search on it is judged by val macro-F1, and says so in the task's words
    search = TuneSearchConfig(num_samples=1, max_epochs=2, grace_period=1, search={"lr": {"choice": [1e-3]}})
    with pytest.raises(BiofmError, match=r"the fine-tuning channels \['RESP'\] are none of the data's \['PPG'\]"):
        run_search(search, dataclasses.replace(cfg, channels=("RESP",)), fm, tmp_path / "task", tmp_path / "tune")
    exp = Path(run_search(search, cfg, fm, tmp_path / "task", tmp_path / "tune"))
    (trial,) = list(csv.DictReader((exp / "trials.csv").read_text().splitlines()))
    ran = json.loads(next((exp / "trials").glob("*/training_history.json")).read_text())
    assert float(trial["best_val_macro_f1"]) == pytest.approx(max(h["val_macro_f1"] for h in ran))
    assert "test_macro_f1" in trial and (exp / "val_macro_f1_by_epoch.png").is_file()
    assert "val macro-F1 (sinus, PVC, PAC, VT, SVT, AF)" in (exp / "best_config.yaml").read_text().splitlines()[0]


@requires_realdata(REAL_BUTPPG)
def test_regression_fine_tuning_on_the_annotated_heart_rate(ray_session, tmp_path):
    """A head of one output on the standardised target (train mean and SD in the checkpoint), the
    epoch kept by val MAE, test MAE in beats per minute."""
    from biofm import benchmark as bm
    from biofm.tasks import TASKS, prepare_task
    from biofm.train.finetune import finetune, load_classifier, predict_outputs

    five = CHANNELS.select(list(ButppgConfig().channels))
    prepare_task(TASKS["butppg-hr"], REAL_BUTPPG, tmp_path / "task", five, WINDOWS)
    metrics = finetune(dataclasses.replace(TINY, epochs=3, lr=1e-3), write_pretrained(tmp_path / "fm.pt"),
                       tmp_path / "task", tmp_path / "out")
    model, desc = load_classifier(tmp_path / "out" / "best_model.pt")
    train = read_split(tmp_path / "task" / "train")
    assert model.head.out_features == 1 and desc["target_mean"] == pytest.approx(train["target"].mean())
    assert desc["target_std"] == pytest.approx(train["target"].std())
    history = json.loads((tmp_path / "out" / "training_history.json").read_text())
    assert history[metrics["best_epoch"] - 1]["val_mae"] == min(h["val_mae"] for h in history)
    test = read_split(tmp_path / "task" / "test")
    values = predict_outputs(model, test["signal"], test["present"], desc)
    assert metrics["test"]["mae"] == pytest.approx(np.mean(np.abs(values - test["target"])))
    assert metrics["test"]["n"] == len(test["target"]) and 40 < values.mean() < 140  # bpm, not standardised units
    assert set(metrics["test"]) == {"n", *bm.METRICS["regression"]}
