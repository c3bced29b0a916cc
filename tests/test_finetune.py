"""Staged fine-tuning on Ray Train, its baselines, and the subject-wise cross-validation, on the
real BUT-PPG subset."""

from __future__ import annotations

import dataclasses
import json

import pytest

from biofm.cli import main
from biofm.config import ButppgConfig, ChannelsConfig, FinetuneConfig, WindowsConfig, load_config
from biofm.errors import BiofmError, ConfigError
from biofm.model.ssl import MaskedSignalModel, ttm_config
from biofm.preprocess import build_butppg, data_spec, read_data_spec
from biofm.train import checkpoint
from biofm.train.finetune import build_classifier, load_classifier, predict, read_split
from biofm.train.transfer import compare_variants, cross_validate, variant_config
from conftest import REAL_BUTPPG, ROOT, requires_realdata

CHANNELS = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
TINY = FinetuneConfig(epochs=2, head_epochs=1, batch_size=16, lr=1e-4, cpus_per_worker=0.5)


def write_pretrained(path, spec=None):
    """A pretraining checkpoint in the real format (random weights, 2 mixer layers)."""
    cfg = ttm_config(2, num_layers=2)
    spec = spec or data_spec(CHANNELS.select(["PPG", "ECG"]), WINDOWS)
    desc = {"kind": "masked_signal_model", "ttm_config": json.loads(json.dumps(cfg.to_dict(), default=str)),
            "channels": ["PPG", "ECG"], "data_spec": spec}
    return checkpoint.save(path, MaskedSignalModel(cfg).state_dict(), desc)


@pytest.fixture(scope="module")
def butppg_data(ray_session, tmp_path_factory):
    if not REAL_BUTPPG.is_dir():
        pytest.skip(f"real data folder {REAL_BUTPPG} is absent")
    out = tmp_path_factory.mktemp("but_ppg")
    build_butppg(REAL_BUTPPG, out, CHANNELS.select(ButppgConfig().channels), WINDOWS, ButppgConfig())
    return out


def test_checkpoint_built_for_other_data_is_refused(tmp_path, capsys):
    spec = data_spec(CHANNELS.select(ButppgConfig().channels), WINDOWS)
    other = json.loads(json.dumps(spec))
    other["filters"]["PPG"]["band_hz"] = [0.5, 8.0]
    with pytest.raises(ConfigError, match="PPG filter"):
        build_classifier(FinetuneConfig(), write_pretrained(tmp_path / "a.pt", other), spec)
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


@requires_realdata(REAL_BUTPPG)
def test_staged_finetune_with_baselines_writes_every_artifact(butppg_data, tmp_path):
    pretrained = write_pretrained(tmp_path / "foundation.pt")
    out = tmp_path / "ft"
    report = compare_variants(TINY, pretrained, butppg_data, out, variants=("finetuned", "scratch"))
    n_test = json.loads((butppg_data / "manifest.json").read_text())["splits"]["test"]["records"]
    assert set(report) == {"finetuned", "scratch"}
    for name in ("best_model.pt", "training_history.json", "training_config.json", "test_metrics.json",
                 "roc_curve.png", "learning_curves.png", "report.json"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "training_history.json").read_text())
    assert [h["stage"] for h in history] == [1, 2]
    head = 192 * 2 + 2
    assert history[0]["trainable_params"] == head and history[1]["trainable_params"] > 10 * head
    assert 0 <= history[1]["val_auroc"] <= 1
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["test"]["n"] == n_test and sum(map(sum, metrics["test"]["confusion"])) == n_test
    model, desc = load_classifier(out / "best_model.pt")
    assert desc["channels"] == ["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"] and desc["init"] == "pretrained"
    assert desc["threshold"] == metrics["test"]["threshold"] and desc["data_spec"] == read_data_spec(butppg_data / "train")
    test = read_split(butppg_data / "test")
    predicted = (predict(model, test["signal"], test["present"]) >= desc["threshold"]).astype(int)
    assert int((predicted == test["label"]).sum()) == metrics["test"]["confusion"][0][0] + metrics["test"]["confusion"][1][1]
    scratch = json.loads((out / "baselines/scratch/training_history.json").read_text())
    assert [h["stage"] for h in scratch] == [2, 2] and scratch[0]["trainable_params"] > history[1]["trainable_params"]
    assert variant_config(TINY, "linear_probe").unfreeze_last_n == 0  # its stages: test_model_classifier
    assert json.loads((out / "training_config.json").read_text())["unfreeze_last_n"] == 2
    with pytest.raises(BiofmError, match="--resume"):
        compare_variants(TINY, pretrained, butppg_data, out, variants=("finetuned",))


@requires_realdata(REAL_BUTPPG)
def test_subject_wise_cross_validation(butppg_data, tmp_path):
    pretrained = write_pretrained(tmp_path / "foundation.pt")
    cfg = dataclasses.replace(TINY, epochs=1, head_epochs=1)
    report = cross_validate(cfg, pretrained, butppg_data, tmp_path / "cv", folds=3, variants=("finetuned",))
    assert report["folds"] == 3 and report["records"] == 51 and report["subjects"] == 13
    tests = [set(f["subjects"]["test"]) for f in report["per_fold"]]
    assert sorted(s for t in tests for s in t) == sorted({s for f in report["per_fold"] for p in f["subjects"].values() for s in p})
    assert sum(len(t) for t in tests) == 13
    for f in report["per_fold"]:
        parts = f["subjects"]
        assert not (set(parts["train"]) & set(parts["test"]) or set(parts["val"]) & set(parts["test"]))
    assert sum(f["finetuned"]["n"] for f in report["per_fold"]) == 51
    assert 0 <= report["summary"]["finetuned"]["auroc"]["mean"] <= 1
    assert (tmp_path / "cv" / "cv_report.json").is_file()
