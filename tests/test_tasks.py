"""Labelled tasks: the built-in tasks on the real files, a label table over .vital recordings, and
what is refused."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io

from biofm.config import ChannelsConfig, WindowsConfig, load_config
from biofm.errors import ConfigError
from biofm.sources.butppg import read_annotations
from biofm.tasks import TASKS, check_labels, prepare_task, read_task, table_task
from biofm.windows import record_signal
from conftest import REAL_BUTPPG, REALDATA, ROOT, heartbeat_signals, requires_realdata, write_vital

REAL_ARRHYTHMIA = REALDATA / "ppg_arrhythmia"
CHANNELS = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
PPG = CHANNELS.select(["PPG"])


def windows_of(outdir) -> dict:
    """Every split's rows, pooled: column -> values (signal [N, C, T])."""
    tables = [pq.read_table(outdir / s) for s in ("train", "val", "test") if (outdir / s).is_dir()]
    out = {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables])
           for c in tables[0].column_names if c not in ("signal", "present")}
    out["signal"] = np.concatenate([t.column("signal").combine_chunks().to_numpy_ndarray() for t in tables])
    return out


def subset(tmp_path, n):
    """The first ``n`` arrhythmia patients, as links in a folder of their own."""
    folder = tmp_path / "raw"
    folder.mkdir()
    for f in sorted(REAL_ARRHYTHMIA.glob("MPA_*.mat"))[:n]:
        (folder / f.name).symlink_to(f)
    return folder


@requires_realdata(REAL_ARRHYTHMIA)
def test_arrhythmia_rhythm_holds_every_segment_of_the_real_files(ray_session, tmp_path):
    m = prepare_task(TASKS["arrhythmia-rhythm"], REAL_ARRHYTHMIA, tmp_path, PPG, WINDOWS)
    files = sorted(REAL_ARRHYTHMIA.glob("MPA_*.mat"))
    labels = {f.stem: scipy.io.loadmat(f, variable_names=["labels"])["labels"].ravel() for f in files}
    counts = np.bincount(np.concatenate(list(labels.values())), minlength=6)
    assert (m["records_in"], m["records_ok"], m["windows"]) == (35, 35, 12290) == (len(files), 35, counts.sum())
    w = windows_of(tmp_path)
    assert len(w["label"]) == 12290 and sorted(set(w["subject_id"])) == sorted(labels)  # a patient is a subject
    assert np.bincount(w["label"], minlength=6).tolist() == counts.tolist()
    for pid in (files[0].stem, files[-1].stem):  # each window keeps its segment's label, in order
        mine = w["case_id"] == pid
        order = np.argsort(w["window_idx"][mine])
        assert w["label"][mine][order].tolist() == labels[pid].tolist()
        assert w["start_s"][mine][order].tolist() == [10.0 * i for i in range(len(labels[pid]))]
    split_subjects = [set(v["subjects"]) for v in m["splits"].values()]
    assert sum(map(len, split_subjects)) == 35 and not (split_subjects[0] & split_subjects[2])
    assert w["signal"].shape == (12290, 1, 1250) and w["signal"].dtype == np.float32
    # labelled windows are kept whatever their quality, and say how they fare
    assert sum(m["quality_failed"].values()) == int((w["quality_reason"] != "").sum()) > 0
    assert np.isfinite(w["ppg_template_match"]).all()
    assert read_task(str(tmp_path / "train")) == TASKS["arrhythmia-rhythm"]


@requires_realdata(REAL_ARRHYTHMIA)
def test_arrhythmia_af_is_af_against_every_other_rhythm(ray_session, tmp_path):
    raw = subset(tmp_path, 3)
    m = prepare_task(TASKS["arrhythmia-af"], raw, tmp_path / "out", PPG, WINDOWS, split_ratios=(1.0, 0.0, 0.0))
    rhythm = np.concatenate([scipy.io.loadmat(f)["labels"].ravel() for f in sorted(raw.glob("*.mat"))])
    w = windows_of(tmp_path / "out")
    assert m["windows"] == len(rhythm) and int(w["label"].sum()) == int((rhythm == 5).sum()) > 0
    first = sorted(raw.glob("*.mat"))[0]
    seg = scipy.io.loadmat(first)["ppgseg"][4].astype(np.float64)
    row = np.flatnonzero((w["case_id"] == first.stem) & (w["window_idx"] == 4))[0]
    expected, _ = record_signal({"PPG": (seg, 100.0)}, PPG, WINDOWS)  # the training preprocessing, 100 -> 125 Hz
    np.testing.assert_allclose(w["signal"][row], expected, atol=1e-6)


@requires_realdata(REAL_BUTPPG)
def test_butppg_heart_rate_is_the_annotated_one(ray_session, tmp_path, butppg_data):
    five = CHANNELS.select(["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"])
    m = prepare_task(TASKS["butppg-hr"], REAL_BUTPPG, tmp_path, five, WINDOWS)
    ann = read_annotations(REAL_BUTPPG)
    w = windows_of(tmp_path)
    assert m["windows"] == 51 and len(set(w["subject_id"])) == 13
    assert dict(zip(w["case_id"], w["target"].tolist())) == pytest.approx({r: ann[r].ref_hr for r in w["case_id"]})
    quality = windows_of(butppg_data)  # the butppg-quality task, which prepare-butppg writes
    assert dict(zip(quality["case_id"], quality["label"].tolist())) == {r: ann[r].label for r in quality["case_id"]}
    assert read_task(str(butppg_data / "train")).name == "butppg-quality"


def _recordings(folder):
    """Two .vital recordings of 60 s (PPG + ECG at 500 Hz), heart rates 60 and 90."""
    folder.mkdir()
    for i, hr in enumerate((60.0, 90.0)):
        ppg, ecg = heartbeat_signals(60.0, 500.0, hr_bpm=hr, seed=i)
        write_vital(folder / f"rec{i}.vital", {"SNUADC/PLETH": (ppg, 500.0), "SNUADC/ECG_II": (ecg, 500.0)})
    return folder


def test_a_label_table_over_vital_recordings(ray_session, tmp_path):
    raw = _recordings(tmp_path / "raw")
    (tmp_path / "labels.csv").write_text(
        "recording,start_s,subject_id,label\nrec0,0,a,rest\nrec0,20,a,rest\nrec0,30,a,exercise\n"
        "rec1.vital,5,b,exercise\nrec1,55,b,rest\nmissing,0,c,rest\n")
    task, rows = table_task("activity", tmp_path / "labels.csv", ["rest", "exercise"])
    assert task.kind == "binary" and task.classes == ("rest", "exercise")
    both = CHANNELS.select(["PPG", "ECG"])
    m = prepare_task(task, raw, tmp_path / "out", both, WINDOWS, split_ratios=(1.0, 0.0, 0.0), label_rows=rows)
    w = windows_of(tmp_path / "out")
    # rec1 at 55 s has 5 s left: too short; "missing" is no file: skipped with its reason
    assert m["windows"] == 4 and m["windows_skipped"] == {"too_short": 1}
    assert m["records"]["missing"]["code"] == "not_found" and m["records_ok"] == 2
    got = {(c, s): lab for c, s, lab in zip(w["case_id"], w["start_s"], w["label"])}
    assert got == {("rec0", 0.0): 0, ("rec0", 20.0): 0, ("rec0", 30.0): 1, ("rec1", 5.0): 1}
    from biofm.sources.vitaldb import read_tracks

    (ppg, _, _), (ecg, _, _) = read_tracks(raw / "rec0.vital", both).values()
    expected, _ = record_signal({"PPG": (ppg[10000:15000], 500.0), "ECG": (ecg[10000:15000], 500.0)}, both, WINDOWS)
    row = np.flatnonzero((w["case_id"] == "rec0") & (w["start_s"] == 20.0))[0]
    np.testing.assert_allclose(w["signal"][row], expected, atol=1e-5)


@requires_realdata(REALDATA / "mimic3_wdb" / "p000878")
def test_a_label_table_over_a_multi_segment_wfdb_record(ray_session, tmp_path):
    """Labels at seconds from a MIMIC record's start land in the segment that holds them: 30 s is
    segment 1's first sample, 46 s segment 2's; 40 s runs past segment 1's end; 10 s is in the gap."""
    raw = REALDATA / "mimic3_wdb" / "p000878"
    rid = "p000878-2137-10-26-16-57"
    (tmp_path / "labels.csv").write_text("recording,start_s,subject_id,label\n" + "".join(
        f"{rid},{t},{subject},{lab}\n" for t, subject, lab in ((30, "s1", "a"), (46, "s2", "b"), (40, "s1", "a"),
                                                             (10, "s2", "b"))) + "x,0,q,a\n")  # two subjects: a task needs them
    task, rows = table_task("mimic", tmp_path / "labels.csv", ["a", "b"])
    m = prepare_task(task, raw, tmp_path / "out", PPG, WINDOWS, split_ratios=(1.0, 0.0, 0.0), label_rows=rows)
    assert m["windows"] == 2 and m["windows_skipped"] == {"too_short": 1, "outside_recording": 1}
    assert m["records"]["x"]["code"] == "not_found"
    w = windows_of(tmp_path / "out")
    assert sorted(zip(w["start_s"], w["label"])) == [(30.0, 0), (46.0, 1)]


def test_a_regression_table_skips_and_counts_nan_targets(ray_session, tmp_path):
    raw = _recordings(tmp_path / "raw")
    (tmp_path / "t.csv").write_text("recording,start_s,subject_id,target\nrec0,0,a,61.5\nrec0,10,a,\n"
                                    "rec1,0,b,88\nrec1,10,b,nan\n")
    task, rows = table_task("hr", tmp_path / "t.csv")
    m = prepare_task(task, raw, tmp_path / "out", PPG, WINDOWS, split_ratios=(0.5, 0.0, 0.5), label_rows=rows)
    assert task.kind == "regression" and m["windows"] == 2 and m["windows_skipped"] == {"no_target": 2}
    assert sorted(windows_of(tmp_path / "out")["target"].tolist()) == [61.5, 88.0]


def test_a_task_with_one_subject_or_one_class_is_refused(ray_session, tmp_path):
    task = TASKS["arrhythmia-rhythm"]
    with pytest.raises(ConfigError, match=r"all 3 windows come from one subject \(p1\)"):
        check_labels(task, [0, 5, 5], ["p1"] * 3, "here")
    with pytest.raises(ConfigError, match=r"only one class has windows \(\{'sinus': 0, 'PVC': 0, 'PAC': 0, 'VT': 0, "
                                          r"'SVT': 0, 'AF': 3\}\)"):
        check_labels(task, [5, 5, 5], ["p1", "p2", "p2"], "here")
    raw = _recordings(tmp_path / "raw")
    (tmp_path / "one.csv").write_text("recording,start_s,subject_id,label\nrec0,0,a,x\nrec0,10,a,y\n")
    task, rows = table_task("one", tmp_path / "one.csv")
    with pytest.raises(ConfigError, match="task one: all 2 windows come from one subject"):
        prepare_task(task, raw, tmp_path / "out", PPG, WINDOWS, label_rows=rows)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_split_without_subjects_or_without_a_class_is_refused(ray_session, tmp_path):
    """The guard against degenerate splits: a split given a share that gets no subject, or that
    lacks a class, is refused with the counts and what to change; a share of 0 is meant empty."""
    raw = _recordings(tmp_path / "raw")
    (tmp_path / "l.csv").write_text("recording,start_s,subject_id,label\n" + "".join(
        f"rec{i % 2},{10 * (i // 2)},s{i},{'rare' if i == 0 else 'common'}\n" for i in range(5)))
    task, rows = table_task("rare", tmp_path / "l.csv")
    assert task.classes == ("common", "rare")
    with pytest.raises(ConfigError, match=r"task rare: the val split gets none of the 5 subjects with --split-ratios "
                                          r"0.9 0.05 0.05: raise its share, or add subjects"):
        prepare_task(task, raw, tmp_path / "a", PPG, WINDOWS, split_ratios=(0.9, 0.05, 0.05), label_rows=rows)
    with pytest.raises(ConfigError, match=r"task rare: the (val|test) split \(1 subjects\) has no window of rare "
                                          r"\(subjects with each class: (common: 4, rare: 1|rare: 1, common: 4); seed 0\): "
                                          r"change --seed or --split-ratios, or add subjects \(at least 5 per class"):
        prepare_task(task, raw, tmp_path / "b", PPG, WINDOWS, split_ratios=(0.6, 0.2, 0.2), label_rows=rows)
    assert not (tmp_path / "a" / "manifest.json").exists() and not (tmp_path / "b" / "manifest.json").exists()
    m = prepare_task(task, raw, tmp_path / "c", PPG, WINDOWS, split_ratios=(1.0, 0.0, 0.0), label_rows=rows)
    assert [len(s["subjects"]) for s in m["splits"].values()] == [5, 0, 0]
