"""A pretraining corpus built from a corpus YAML (``biofm build-corpus``), on files the test writes
in the real formats: the arrhythmia set's MATLAB layout read as a task (labels kept), Vital
Recorder files as recordings; then the floors of evaluate-ssl per source and per rhythm."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from biofm.cli import main
from biofm.config import ChannelsConfig, WindowsConfig, load_config
from biofm.corpus import build_corpus
from biofm.errors import ConfigError
from biofm.train.pretrain import corpus_sources
from conftest import ROOT, heartbeat_signals, write_case, write_pretrained

CHANNELS = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
YAML = """sources:
  - {name: mpa, path: arrhythmia, raw: mpa, task: arrhythmia-rhythm, channels: [PPG], val_share: 0.5,
     cases: [MPA_1, MPA_2]}
  - {name: vital, path: vital, raw: vital, weight: 2.0, val_share: 0.34}
"""


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Three arrhythmia-layout patients (12 segments of 10 s at 100 Hz; the third not in the corpus)
    and three Vital Recorder cases of 40 s."""
    root = tmp_path_factory.mktemp("raw")
    (root / "mpa").mkdir()
    for k, labels in enumerate(([0] * 6 + [5] * 6, [0] * 8 + [1] * 4, [2] * 12), start=1):
        segments = np.stack([heartbeat_signals(10.0, 100.0, hr_bpm=60 + 5 * i, seed=10 * k + i)[0]
                             for i in range(len(labels))]).astype(np.float32)
        scipy.io.savemat(root / "mpa" / f"MPA_{k}.mat", {"ppgseg": segments, "labels": np.array(labels, np.uint8)[:, None]})
    for k in range(3):
        write_case(root / "vital", str(k + 1), duration_s=40.0, seed=k)
    return root


def test_a_corpus_yaml_builds_each_source_and_pretraining_reads_it(ray_session, raw, tmp_path):
    (tmp_path / "corpus.yaml").write_text(YAML)
    counts = build_corpus(tmp_path / "corpus.yaml", raw, tmp_path / "out", CHANNELS, WINDOWS)
    # the two listed patients, one each for train and val (12 windows each); 1 of 3 Vital cases for val
    assert counts["mpa"] == {"train": 12, "val": 12}
    assert counts["vital"] == {"train": 8, "val": 4}
    assert (tmp_path / "out" / "corpus.yaml").read_text() == YAML
    dirs, names, weights = corpus_sources(str(tmp_path / "out" / "corpus.yaml"))
    assert names == ["mpa", "vital"] and weights == [1.0, 2.0]
    assert dirs == [str(tmp_path / "out" / "arrhythmia"), str(tmp_path / "out" / "vital")]
    assert sorted(p.name for p in (tmp_path / "out" / "_raw" / "arrhythmia").iterdir()) == ["MPA_1.mat", "MPA_2.mat"]

    # the floors per source and per rhythm, on a checkpoint of random weights
    from biofm.train.evaluate import evaluate_ssl

    ckpt = write_pretrained(tmp_path / "fm.pt")
    result = evaluate_ssl(ckpt, str(tmp_path / "out" / "corpus.yaml"), "val")
    assert result["windows"] == 16 and set(result["by_source"]) == {"mpa", "vital"}
    assert result["by_source"]["mpa"]["windows"] == 12 and "ECG" not in result["by_source"]["mpa"]   # absent
    assert result["by_class"] == {}   # only one source has classes
    one = evaluate_ssl(ckpt, str(tmp_path / "out" / "arrhythmia"), "val")
    assert set(one["by_class"]) <= {"sinus", "PVC", "PAC", "VT", "SVT", "AF"} and len(one["by_class"]) == 2
    floors = one["masked_mse"]["overall"]
    assert floors["zero"] == pytest.approx(1.0, abs=0.2) and floors["period_copy"] < floors["linear_interp"]
    assert main(["evaluate-ssl", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "out" / "corpus.yaml"),
                 "--output", str(tmp_path / "eval.json")]) == 0


def test_a_corpus_source_that_cannot_be_built_is_refused(ray_session, raw, tmp_path):
    cases = [("sources:\n  - {path: x}\n", r"sources \['x'\] name no recordings"),
             ("sources:\n  - {path: x, raw: nowhere}\n", r"lacks \['nowhere'\]"),
             ("sources:\n  - {path: x, raw: vital, cases: ['9']}\n", r"no recording \['9'\] in"),
             ("sources:\n  - {path: x, raw: mpa, task: arrhythmia-rhythm, channels: [PPG], cases: [MPA_9]}\n",
              "no recording MPA_9 in"),
             ("sources:\n  - {path: x, raw: vital, val_share: 1.0}\n", r"val_share must be in \[0, 1\), got 1.0")]
    for k, (text, message) in enumerate(cases):
        (tmp_path / f"c{k}.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            build_corpus(tmp_path / f"c{k}.yaml", raw, tmp_path / f"out{k}", CHANNELS, WINDOWS)
