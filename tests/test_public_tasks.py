"""The built-in tasks of the public datasets (PPG-BP, TROIKA, CapnoBase, CinC 2017) on small
subsets of the real files: window counts, labels aligned with the published files, subject-disjoint
splits; TROIKA's test-part layout on files the test writes."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io

from biofm.config import ChannelsConfig, WindowsConfig, load_config
from biofm.sources import capnobase, cinc2017, ppgbp, troika
from biofm.tasks import TASKS, prepare_task
from biofm.windows import record_signal
from conftest import REALDATA, ROOT, heartbeat_signals, requires_realdata

CHANNELS = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
PPGBP, TROIKA = REALDATA / "ppg_bp", REALDATA / "troika" / "Training_data"
CAPNOBASE, CINC = REALDATA / "capnobase" / "data", REALDATA / "cinc2017"


def windows_of(outdir) -> dict:
    """Every split's rows: column -> values, plus the split of each row."""
    parts = [(s, pq.read_table(outdir / s)) for s in ("train", "val", "test") if (outdir / s).is_dir()]
    out = {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for _, t in parts])
           for c in parts[0][1].column_names if c not in ("signal", "present")}
    out["split"] = np.concatenate([[s] * t.num_rows for s, t in parts])
    out["signal"] = np.concatenate([t.column("signal").combine_chunks().to_numpy_ndarray() for _, t in parts])
    return out


def disjoint(w: dict) -> bool:
    return all(len(set(w["split"][w["subject_id"] == s])) == 1 for s in set(w["subject_id"]))


def linked(tmp_path, folder, names):
    out = tmp_path / "raw"
    out.mkdir(parents=True)
    for name in names:
        (out / name).symlink_to(folder / name)
    return out


@requires_realdata(PPGBP)
def test_ppgbp_pressure_and_hypertension_from_the_subjects_table(ray_session, tmp_path):
    """Ten subjects: three windows each (a segment held at its last value to 10 s, the default fit;
    tile repeats it), the subject's systolic pressure from the xlsx; hypertension is the table's
    stage 1 or 2; concat gives one window."""
    table = ppgbp.subjects(PPGBP)
    ids = sorted(table, key=int)[:10]
    raw = tmp_path / "raw"
    (raw / "0_subject").mkdir(parents=True)
    (raw / ppgbp.TABLE).symlink_to(PPGBP / ppgbp.TABLE)
    for sid in ids:
        for f in (PPGBP / "0_subject").glob(f"{sid}_*.txt"):
            (raw / "0_subject" / f.name).symlink_to(f)
    ppg = CHANNELS.select(["PPG"])
    m = prepare_task(TASKS["ppgbp-sbp"], raw, tmp_path / "sbp", ppg, WINDOWS, split_ratios=(0.6, 0.2, 0.2))
    assert m["config"]["fit"] == "pad" and m["records_in"] == 219 and m["records_ok"] == 10 and m["skip_reasons"] == {"missing_file": 209}
    w = windows_of(tmp_path / "sbp")
    assert len(w["target"]) == 30 and sorted(set(w["subject_id"])) == sorted(ids) and disjoint(w)
    assert all(w["target"][w["subject_id"] == s][0] == table[s]["sbp"] for s in ids)
    first = sorted((raw / "0_subject").glob(f"{ids[0]}_1.txt"))[0]
    x = np.array(first.read_text().split(), dtype=float)
    row = np.flatnonzero((w["case_id"] == ids[0]) & (w["window_idx"] == 0))[0]
    held = np.concatenate([x, np.full(10000 - len(x), x[-1])])
    expected, _ = record_signal({"PPG": (held, 1000.0)}, ppg, WINDOWS)
    np.testing.assert_allclose(w["signal"][row], expected, atol=1e-5)
    prepare_task(TASKS["ppgbp-sbp"], raw, tmp_path / "tiled", ppg, WINDOWS, split_ratios=(0.6, 0.2, 0.2), fit="tile")
    tiled = windows_of(tmp_path / "tiled")
    row = np.flatnonzero((tiled["case_id"] == ids[0]) & (tiled["window_idx"] == 0))[0]
    expected, _ = record_signal({"PPG": (np.resize(x, 10000), 1000.0)}, ppg, WINDOWS)
    np.testing.assert_allclose(tiled["signal"][row], expected, atol=1e-5)
    m = prepare_task(TASKS["ppgbp-hypertension"], raw, tmp_path / "ht", ppg, WINDOWS, split_ratios=(1.0, 0.0, 0.0),
                     fit="concat")
    w = windows_of(tmp_path / "ht")
    assert len(w["label"]) == 10 and set(w["window_idx"]) == {0}
    assert {s: int(v) for s, v in zip(w["subject_id"], w["label"])} == {
        s: int(table[s]["class"] in ("Stage 1 hypertension", "Stage 2 hypertension")) for s in ids}


@requires_realdata(TROIKA)
def test_troika_heart_rate_per_reference_window_without_the_ecg(ray_session, tmp_path):
    """Two recordings: one 10 s window centred on each 8 s reference window that fits, the target
    its BPM0; the default channels are ACC and PPG, not the ECG the target comes from. With the
    ECG asked for, its beat rate agrees with the target: the labels sit on the windows' clock."""
    names = ["DATA_01_TYPE01.mat", "DATA_01_TYPE01_BPMtrace.mat", "DATA_02_TYPE02.mat", "DATA_02_TYPE02_BPMtrace.mat"]
    raw = linked(tmp_path, TROIKA, names)
    assert TASKS["troika-hr"].channels == ("ACC_X", "ACC_Y", "ACC_Z", "PPG")
    channels = CHANNELS.select([*TASKS["troika-hr"].channels, "ECG"])
    m = prepare_task(TASKS["troika-hr"], raw, tmp_path / "out", channels, WINDOWS, split_ratios=(0.5, 0.5, 0.0))
    w = windows_of(tmp_path / "out")
    starts, bpm = troika.heart_rate(raw / "DATA_01_TYPE01.mat")
    inside = (starts - 1 >= 0) & (starts - 1 + 10 <= 37937 / 125)
    mine = w["case_id"] == "DATA_01_TYPE01"
    assert mine.sum() == inside.sum() == 147 and set(m["windows_skipped"]) == {"outside_recording"}
    assert m["windows"] + m["windows_skipped"]["outside_recording"] == 148 + len(troika.heart_rate(raw / "DATA_02_TYPE02.mat")[1])
    order = np.argsort(w["window_idx"][mine])
    np.testing.assert_allclose(w["target"][mine][order], bpm[inside], atol=1e-4)
    np.testing.assert_allclose(w["start_s"][mine][order], starts[inside] - 1.0)
    assert sorted(set(w["subject_id"])) == ["train_01", "train_02"] and disjoint(w)
    rate_ok = np.abs(w["ecg_hr_bpm"] - w["target"]) <= 5
    assert rate_ok.mean() >= 0.9, rate_ok.mean()


def test_troika_test_part_layout_on_written_files(ray_session, tmp_path):
    """TEST_S<nn>_T<mm>.mat (sig [5, N]: PPG, PPG, ACC x/y/z; no ECG) with its True_S<nn>_T<mm>.mat:
    the subject is S<nn>, the second PPG is --ppg-signal 1."""
    raw = tmp_path / "test_part"
    raw.mkdir()
    for name, hr in (("S01_T01", 70.0), ("S01_T02", 90.0), ("S02_T01", 120.0)):
        ppg, _ = heartbeat_signals(40.0, 125.0, hr_bpm=hr, seed=int(hr))
        acc = np.random.default_rng(1).standard_normal((3, ppg.size)) * 0.01
        scipy.io.savemat(raw / f"TEST_{name}.mat", {"sig": np.vstack([ppg, 2 * ppg, acc])})
        scipy.io.savemat(raw / f"True_{name}.mat", {"BPM0": np.full((17, 1), hr)})   # windows at 0, 2, ..., 32 s
    task = TASKS["troika-hr"]
    m = prepare_task(task, raw, tmp_path / "out", CHANNELS.select(task.channels), WINDOWS, split_ratios=(1.0, 0.0, 0.0))
    w = windows_of(tmp_path / "out")
    assert m["records_in"] == 3 and m["windows"] == 3 * 15 and m["windows_skipped"] == {"outside_recording": 6}
    assert sorted(set(w["subject_id"])) == ["test_S01", "test_S02"]
    assert {c: float(t) for c, t in zip(w["case_id"], w["target"])} == {"TEST_S01_T01": 70.0, "TEST_S01_T02": 90.0,
                                                                        "TEST_S02_T01": 120.0}
    np.testing.assert_allclose(w["ppg_hr_bpm"], w["target"], rtol=0.06)
    m2 = prepare_task(task, raw, tmp_path / "two", CHANNELS.select(task.channels), WINDOWS, split_ratios=(1.0, 0.0, 0.0),
                      ppg_signal=1)
    assert m2["windows"] == m["windows"] and m2["config"]["ppg_signal"] == 1


@requires_realdata(CAPNOBASE)
def test_capnobase_respiratory_rate_at_each_windows_centre(ray_session, tmp_path):
    names = ["0009_8min.mat", "0028_8min.mat"]
    raw = linked(tmp_path, CAPNOBASE, names)
    task = TASKS["capnobase-rr"]
    m = prepare_task(task, raw, tmp_path / "out", CHANNELS.select(task.channels), WINDOWS, split_ratios=(0.5, 0.5, 0.0))
    w = windows_of(tmp_path / "out")
    t, rr = capnobase.reference(raw / "0009_8min.mat", "rr/co2")
    mine = w["case_id"] == "0009_8min"
    centres = w["start_s"][mine] + 5.0
    assert ((centres >= t[0]) & (centres <= t[-1])).all() and m["windows"] + sum(m["windows_skipped"].values()) == 96
    np.testing.assert_allclose(w["target"][mine], np.interp(centres, t, rr), rtol=1e-5)
    assert set(m["windows_skipped"]) == {"no_target"} and disjoint(w)
    assert 5 < w["target"].min() and w["target"].max() < 60                  # breaths/min


@requires_realdata(CINC)
def test_cinc2017_rhythm_per_record_window(ray_session, tmp_path):
    """Six records (a subject each), every whole 10 s window labelled with the record's class."""
    refs = dict(csv.reader((CINC / "REFERENCE.csv").read_text().splitlines()))
    chosen = sorted({next(r for r, c in refs.items() if c == k and r not in ("A00001", "A00003")) for k in "NAO~"}
                    | {"A00001", "A00003"})
    raw = linked(tmp_path, CINC, [f"{r}.{e}" for r in chosen for e in ("mat", "hea")])
    (raw / "REFERENCE.csv").write_text("".join(f"{r},{refs[r]}\n" for r in chosen))
    task = TASKS["cinc2017-rhythm"]
    m = prepare_task(task, raw, tmp_path / "out", CHANNELS.select(task.channels), WINDOWS, split_ratios=(1.0, 0.0, 0.0))
    w = windows_of(tmp_path / "out")
    lengths = {r: scipy.io.loadmat(raw / f"{r}.mat")["val"].shape[1] / 300.0 for r in chosen}
    assert m["windows"] == sum(int(n // 10) for n in lengths.values())
    assert task.classes == ("normal", "AF", "other", "noisy")
    assert {c: cinc2017.CLASSES[int(k)] for c, k in zip(w["case_id"], w["label"])} == {
        r: refs[r] for r in chosen if lengths[r] >= 10}
    assert set(w["subject_id"]) == set(w["case_id"])
