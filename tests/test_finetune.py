"""Staged fine-tuning on Ray Train, its baselines, and the subject-wise cross-validation, on the
real BUT-PPG subset."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from biofm.cli import main
from biofm.config import ButppgConfig, ChannelsConfig, FinetuneConfig, WindowsConfig, load_config
from biofm.errors import ConfigError
from biofm.preprocess import data_spec
from biofm.train import checkpoint, transfer
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
    with pytest.raises(ConfigError, match="has 2 channels"):
        build_classifier(FinetuneConfig(pretrain_channels=3), write_pretrained(tmp_path / "b.pt"), spec)
    with pytest.raises(ConfigError, match="channels"):
        build_classifier(FinetuneConfig(channels=("PPG", "ECG")), write_pretrained(tmp_path / "c.pt"), spec)
    args = ["finetune", "--config", str(ROOT / "configs/finetune_butppg.yaml"), "--pretrained", str(tmp_path / "b.pt"),
            "--data-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")]
    assert main(args + ["--finetune-channels", "4"]) == 2
    assert "--finetune-channels 4, but the config lists 5" in capsys.readouterr().err
    assert main(args) == 2
    assert "no BUT-PPG records" in capsys.readouterr().err


def test_baselines_are_the_same_fine_tuning_with_other_settings(tmp_path, monkeypatch):
    calls = []

    def fake(cfg, pretrained, data_dir, out, address=None):
        calls.append((cfg, out))
        return {"test": {k: 0.5 for k in transfer.REPORTED} | {"n": 3}}

    monkeypatch.setattr(transfer, "finetune", fake)
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
        return {"test": {k: 0.5 for k in transfer.REPORTED} | {"n": n}}

    monkeypatch.setattr(transfer, "finetune", fake)
    with pytest.raises(ConfigError, match="--folds must be between 3"):
        transfer.cross_validate(TINY, "fm.pt", butppg_data, tmp_path / "cv", folds=2)
    report = transfer.cross_validate(TINY, "fm.pt", butppg_data, tmp_path / "cv", folds=3)
    assert report["folds"] == 3 and report["records"] == 51 and report["subjects"] == 13
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
    assert json.loads((tmp_path / "cv" / "cv_report.json").read_text())["records"] == 51


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
    spec = data_spec(CHANNELS.select(FinetuneConfig().channels), WINDOWS)
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
