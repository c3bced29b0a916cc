"""The WFDB, EDF and CSV readers on the real files of shared/realdata, and build-windows on each
format: the Vital Recorder files rewritten by the test as EDF (NSRR names) and as WFDB, BIDMC's and
NeuroKit's CSVs, the MIMIC-III record with its absent segments, the arrhythmia PPG as a PPG-only
source, CapnoBase and TROIKA as MATLAB files; and the bad inputs each format has, skipped with
their reasons."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from biofm.config import ChannelsConfig, WindowsConfig, load_config
from biofm.errors import CaseSkipped, ConfigError, NothingProduced
from biofm.preprocess import build_windows
from biofm.sources.formats import open_source
from biofm.sources.vitaldb import read_tracks
from conftest import REAL_VITAL, REALDATA, ROOT, heartbeat_signals, requires_realdata, tensorboard_scalars

CONFIG = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
CHANNELS = CONFIG.select(["PPG", "ECG"])
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
BIDMC, NEUROKIT = REALDATA / "bidmc", REALDATA / "neurokit"
MIMIC, ARRHYTHMIA = REALDATA / "mimic3_wdb" / "p000878", REALDATA / "ppg_arrhythmia"
CAPNOBASE, TROIKA = REALDATA / "capnobase" / "data", REALDATA / "troika" / "Training_data"


def write_edf(path, signals: dict[str, tuple[np.ndarray, float]]):
    """``signals``: label -> (samples, Hz), cut to whole seconds (EDF's 1 s data records); NaN gaps
    become the signal's median (EDF has no gap value)."""
    import edfio

    out = []
    for label, (x, fs) in signals.items():
        x = x[:int(len(x) // fs * fs)]
        out.append(edfio.EdfSignal(np.where(np.isfinite(x), x, np.nanmedian(x)), sampling_frequency=fs, label=label))
    seconds = min(len(s.data) / s.sampling_frequency for s in out)
    edfio.Edf([edfio.EdfSignal(s.data[:int(seconds * s.sampling_frequency)], s.sampling_frequency, label=s.label)
               for s in out]).write(path)


def write_wfdb(folder, name, signals: dict[str, tuple[np.ndarray, float]]):
    """One multi-frequency WFDB record (``samps_per_frame``), NaN written as WFDB's invalid sample."""
    import wfdb

    base = min(fs for _, fs in signals.values())
    frames = min(int(len(x) / fs * base) for x, fs in signals.values())
    per = [int(fs // base) for _, fs in signals.values()]
    wfdb.wrsamp(name, fs=base, units=["NU"] * len(signals), sig_name=list(signals), samps_per_frame=per,
                e_p_signal=[x[:frames * k] for (x, _), k in zip(signals.values(), per)], fmt=["16"] * len(signals),
                write_dir=str(folder))


def vital_tracks():
    """The six Vital Recorder files: name -> {channel: (samples, Hz)}."""
    return {p.stem: {c: (x, fs) for c, (x, fs, _) in read_tracks(p, CHANNELS).items()}
            for p in sorted(REAL_VITAL.glob("*.vital"))}


def build(tmp_path, source, channels=CHANNELS, name="out"):
    ids = source.ids()
    return build_windows(ids, source, channels, WINDOWS, tmp_path / name, "train")


@requires_realdata(BIDMC)
@requires_realdata(NEUROKIT)
@requires_realdata(MIMIC)
def test_readers_on_the_real_files():
    bidmc = open_source(str(BIDMC))
    rec = bidmc.read("bidmc_01_Signals", CHANNELS)
    assert (bidmc.fmt, bidmc.ids(), rec.names()) == ("csv", ["bidmc_01_Signals"], {"PPG": "PLETH", "ECG": "II"})
    assert [(len(x), fs) for x, fs, _ in rec.pieces[0].tracks.values()] == [(60001, 125.0)] * 2  # 8 min at 125 Hz
    assert rec.found == ["RESP", "PLETH", "V", "AVR", "II"]

    with pytest.raises(CaseSkipped, match="no_sample_rate: bio_resting_5min_100hz.csv has no time column "
                                          r"\(columns: ECG, PPG, RSP\): pass --rate-hz"):
        open_source(str(NEUROKIT)).read("bio_resting_5min_100hz", CHANNELS)
    rec = open_source(str(NEUROKIT), rate_hz=100).read("bio_resting_5min_100hz", CHANNELS)
    assert [(len(x), fs, n) for x, fs, n in rec.pieces[0].tracks.values()] == [(30000, 100.0, "PPG"), (30000, 100.0, "ECG")]

    mimic = open_source(str(MIMIC))
    assert mimic.ids() == ["p000878-2137-10-26-16-57"]  # segments and the layout header are not records
    rec = mimic.read("p000878-2137-10-26-16-57", CHANNELS)
    assert [(p.label, p.start_s, sorted(p.tracks)) for p in rec.pieces] == [
        ("3269321_0001", 30.0, ["PPG"]), ("3269321_0002", 46.0, ["ECG", "PPG"])]  # after the 3,750-sample gap
    assert len(rec.absent) == 30 and rec.absent[0] == "3269321_0003 (no header)"
    both = rec.require(CHANNELS)
    assert [p.label for p in both.pieces] == ["3269321_0002"] and both.incomplete == {"3269321_0001": ["ECG"]}
    assert both.names() == {"PPG": "PLETH", "ECG": "II"} and len(both.pieces[0].tracks["PPG"][0]) == 1750


@requires_realdata(REAL_VITAL)
def test_vital_files_as_edf_and_wfdb_give_the_windows_of_the_vital_files(ray_session, tmp_path):
    """The same recordings through three readers: NSRR's EDF labels (Pleth, EKG) and MIMIC's WFDB
    names (PLETH, II) map to PPG and ECG, rates stay native (100 Hz PPG, 300 Hz ECG)."""
    edf_dir, wfdb_dir = tmp_path / "edf", tmp_path / "wfdb"
    edf_dir.mkdir(), wfdb_dir.mkdir()
    tracks = vital_tracks()
    for name, t in tracks.items():
        write_edf(edf_dir / f"{name}.edf", {"Pleth": t["PPG"], "EKG": t["ECG"]})
        write_wfdb(wfdb_dir, name, {"PLETH": t["PPG"], "II": t["ECG"]})
    vital = build(tmp_path, open_source(str(REAL_VITAL)), name="vital")
    edf = build(tmp_path, open_source(str(edf_dir)), name="edf")
    wf = build(tmp_path, open_source(str(wfdb_dir)), name="wfdb")
    for m in (edf, wf):
        assert m["cases_ok"] == 6 and m["source"].split(":")[0] in ("edf", "wfdb")
    assert edf["cases"]["MICUA01_240724_180000_first100s"]["tracks"] == {"PPG": "Pleth", "ECG": "EKG"}
    assert wf["cases"]["MICUA01_240724_180000_first100s"]["tracks"] == {"PPG": "PLETH", "ECG": "II"}
    assert wf["cases"]["MICUA01_240724_180000_first100s"]["rates_hz"] == {"PPG": 100.0, "ECG": 300.0}
    # WFDB keeps the gaps (invalid samples), so its windows are the .vital file's, window for window
    assert wf["windows_kept"] == vital["windows_kept"] and wf["windows_rejected"] == vital["windows_rejected"]
    a = pq.read_table(tmp_path / "vital" / "train").sort_by([("case_id", "ascending"), ("window_idx", "ascending")])
    b = pq.read_table(tmp_path / "wfdb" / "train").sort_by([("case_id", "ascending"), ("window_idx", "ascending")])
    assert a["window_idx"].to_pylist() == b["window_idx"].to_pylist()
    np.testing.assert_allclose(np.stack(b["signal"].to_numpy(zero_copy_only=False)).astype(float).ravel(),
                               np.stack(a["signal"].to_numpy(zero_copy_only=False)).astype(float).ravel(), atol=0.05)
    # EDF has no gap value: the filled gaps are flat, not missing, and every window of the rest is kept alike
    assert abs(edf["windows_kept"] - vital["windows_kept"]) <= 4


@requires_realdata(BIDMC)
@requires_realdata(NEUROKIT)
@requires_realdata(MIMIC)
@requires_realdata(ARRHYTHMIA)
@requires_realdata(CAPNOBASE)
@requires_realdata(TROIKA)
def test_csv_mimic_matlab_and_a_ppg_only_source_build_windows(ray_session, tmp_path):
    from biofm.sources.arrhythmia import RATE_HZ, read_patient

    bidmc = build(tmp_path, open_source(str(BIDMC)), name="bidmc")
    assert (bidmc["cases_ok"], bidmc["cases"]["bidmc_01_Signals"]["windows_total"]) == (1, 48)  # 480 s
    assert bidmc["cases"]["bidmc_01_Signals"]["rates_hz"] == {"PPG": 125.0, "ECG": 125.0}
    assert bidmc["windows_kept"] >= 40
    neurokit = build_windows(["bio_resting_5min_100hz"], open_source(f"csv:{NEUROKIT}", rate_hz=100), CHANNELS,
                             WINDOWS, tmp_path / "neurokit", "train")
    assert neurokit["cases"]["bio_resting_5min_100hz"]["windows_total"] == 30 and neurokit["windows_kept"] >= 25

    with pytest.raises(NothingProduced, match=r"all 1 windows failed quality checks \(ECG:missing x1\)"):
        build(tmp_path, open_source(str(MIMIC)), name="mimic2")  # its one PLETH+II window: 137 of II's samples NaN
    ppg = CONFIG.select(["PPG"])
    mimic = build(tmp_path, open_source(str(MIMIC)), channels=ppg, name="mimic")
    case = mimic["cases"]["p000878-2137-10-26-16-57"]
    assert (case["status"], case["windows_total"], case["windows_kept"], case["tracks"]) == ("ok", 2, 2, {"PPG": "PLETH"})
    assert case["partial_record"]["pieces"] == 2 and len(case["partial_record"]["absent"]) == 30
    assert case["partial_record"]["absent"][-1].endswith("(no header)") and mimic["partial_records"] == 1
    table = pq.read_table(tmp_path / "mimic" / "train").sort_by("window_idx")
    assert table["window_idx"].to_pylist() == [0, 1]
    assert table["start_s"].to_pylist() == [30.0, 46.0]  # from the record's start: after the gap, then segment 2

    # one arrhythmia patient's 10 s segments end to end, as a PPG-only CSV at 100 Hz
    segments, _ = read_patient(ARRHYTHMIA, sorted(p.stem for p in ARRHYTHMIA.glob("MPA_*.mat"))[0])
    x = segments[:6].ravel()
    (tmp_path / "ppg_only").mkdir()
    (tmp_path / "ppg_only" / "patient.csv").write_text(
        "Time (ms),BVP\n" + "".join(f"{i * 1000 / RATE_HZ:g},{v:.6f}\n" for i, v in enumerate(x)))
    only = build(tmp_path, open_source(str(tmp_path / "ppg_only")), channels=ppg, name="only")
    assert only["cases"]["patient"]["tracks"] == {"PPG": "BVP"} and only["cases"]["patient"]["windows_total"] == 6
    assert only["data_spec"]["channels"] == ["PPG"] and only["windows_kept"] >= 1
    with pytest.raises(Exception, match=r"no ECG signal among Time \(ms\), BVP|no_matching_channel"):
        build(tmp_path, open_source(str(tmp_path / "ppg_only")), name="both")

    # MATLAB 7.3 (CapnoBase, 300 Hz) and a TROIKA recording with its five channels (125 Hz)
    capno = build_windows(["0009_8min", "0016_8min"], open_source(str(CAPNOBASE)), CHANNELS, WINDOWS,
                          tmp_path / "capno", "train")
    case = capno["cases"]["0016_8min"]
    assert (capno["cases_ok"], case["windows_total"], case["tracks"], case["rates_hz"]) == (
        2, 48, {"PPG": "PLETH", "ECG": "ECG"}, {"PPG": 300.0, "ECG": 300.0})
    assert capno["source"].startswith("array:") and capno["cases"]["0016_8min"]["windows_kept"] >= 45
    assert capno["windows_rejected"].get("PPG:clipped", 0) >= 10   # 0009's PPG troughs sit on the rail at -10.16
    five = CONFIG.select(["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"])
    run = build_windows(["DATA_01_TYPE01"], open_source(str(TROIKA)), five, WINDOWS, tmp_path / "troika", "train")
    assert run["cases"]["DATA_01_TYPE01"]["windows_total"] == 30 and run["data_spec"]["channels"] == list(five)
    assert run["cases"]["DATA_01_TYPE01"]["tracks"]["ACC_Z"] == "ACC_Z" and run["windows_kept"] >= 20
    rates = next(line for line in (tmp_path / "troika" / "report.md").read_text().splitlines()
                 if line.startswith("Heart rate of the kept windows"))   # the channels with beats only
    assert "PPG median" in rates and "ECG median" in rates and "ACC" not in rates


def test_bad_files_of_each_format_are_skipped_with_their_reasons(ray_session, tmp_path):
    """One good and one bad recording per format: the bad one skipped with its reason, the good
    one's windows all there."""
    ppg, ecg = heartbeat_signals(40.0, 125.0, seed=2)
    good = {"Pleth": (ppg, 125.0), "EKG": (ecg, 125.0)}
    edf_dir, csv_dir, wfdb_dir = (tmp_path / n for n in ("edf", "csv", "wfdb"))
    for d in (edf_dir, csv_dir, wfdb_dir):
        d.mkdir()
    write_edf(edf_dir / "good.edf", good)
    write_edf(edf_dir / "eeg.edf", {"EEG C3-A2": (ppg, 125.0), "EOG(L)": (ecg, 125.0)})
    whole = (edf_dir / "good.edf").read_bytes()
    (edf_dir / "cut.edf").write_bytes(whole[:len(whole) // 2])
    (edf_dir / "gaps.edf").write_bytes(whole[:192] + b"EDF+D" + whole[197:])
    rows = "".join(f"{i / 125:.3f},{p:.5f},{e:.5f}\n" for i, (p, e) in enumerate(zip(ppg, ecg)))
    (csv_dir / "good.csv").write_text("Time [s],PLETH,II\n" + rows)
    lines = rows.splitlines()
    lines[700] = lines[700].rsplit(",", 1)[0] + ",lead off"
    (csv_dir / "text.csv").write_text("Time [s],PLETH,II\n" + "\n".join(lines) + "\n")
    write_wfdb(wfdb_dir, "good", {"PLETH": (ppg, 125.0), "II": (ecg, 125.0)})
    write_wfdb(wfdb_dir, "nodat", {"PLETH": (ppg, 125.0), "II": (ecg, 125.0)})
    (wfdb_dir / "nodat.dat").unlink()

    expected = {
        "edf": {"eeg": ("no_matching_channel", "no PPG or ECG signal among EEG C3-A2, EOG(L) (channels.yaml: "
                        "tracks and aliases)"),
                "cut": ("corrupt_file", f"cut.edf is truncated: its header promises 40 data records ({len(whole)} "
                        f"bytes), the file holds {len(whole) // 2} bytes"),
                "gaps": ("unsupported_format", "gaps.edf is EDF+D (discontinuous: its data records are not contiguous "
                         "in time), which is not read yet; convert it to continuous EDF+C files")},
        "csv": {"text": ("corrupt_file", "text.csv: column 'II' holds text at row 702 ('lead off') and 0 more")},
        "wfdb": {"nodat": ("missing_file", "nodat.hea is there but its signal file is not (no nodat.dat)")},
    }
    for fmt, bad in expected.items():
        m = build(tmp_path, open_source(str(tmp_path / fmt)), name=f"out_{fmt}")
        got = {c: (o["code"], o["reason"]) for c, o in m["cases"].items() if o["status"] != "ok"}
        assert got == bad, fmt
        assert m["cases"]["good"]["windows_total"] == 4 and m["cases_ok"] == 1, fmt
        assert pq.read_table(tmp_path / f"out_{fmt}" / "train" / "good.parquet").num_rows == m["windows_kept"]

    (tmp_path / "wfdb" / "extra.edf").write_bytes(whole)
    with pytest.raises(ConfigError, match=r"holds recordings in 2 formats \(2 wfdb, 1 edf files\): name one with a "
                                          r"prefix, e.g. --source wfdb:"):
        open_source(str(tmp_path / "wfdb"))
    assert open_source(f"edf:{tmp_path / 'wfdb'}").ids() == ["extra"]


def test_each_format_reads_from_cloud_storage(ray_session, s3, tmp_path):
    """EDF, CSV and a multi-folder WFDB layout (RECORDS listing p00/) under an s3:// prefix."""
    import uuid

    from biofm import storage

    ppg, ecg = heartbeat_signals(30.0, 125.0, seed=4)
    local = tmp_path / "up"
    (local / "p00" / "p000001").mkdir(parents=True)
    write_wfdb(local / "p00" / "p000001", "p000001-01", {"PLETH": (ppg, 125.0), "II": (ecg, 125.0)})
    (local / "RECORDS").write_text("p00/\n")
    (local / "p00" / "RECORDS").write_text("p000001/\n")
    (local / "p00" / "p000001" / "RECORDS").write_text("p000001-01\n")
    write_edf(tmp_path / "r.edf", {"PPG": (ppg, 125.0), "ECG": (ecg, 125.0)})
    uri = f"s3://biofm/{uuid.uuid4().hex[:8]}"
    for path in local.rglob("*"):
        if path.is_file():
            storage.write(f"{uri}/wfdb/{path.relative_to(local)}", lambda f, p=path: f.write(p.read_bytes()))
    storage.write(f"{uri}/edf/r.edf", lambda f: f.write((tmp_path / "r.edf").read_bytes()))
    storage.write_text(f"{uri}/csv/r.csv", "t,PPG,ECG\n" + "".join(f"{i / 125:.3f},{p},{e}\n"
                                                              for i, (p, e) in enumerate(zip(ppg, ecg))))
    for fmt, rid in (("wfdb", "p000001-01"), ("edf", "r"), ("csv", "r")):
        source = open_source(f"{uri}/{fmt}")
        assert source.ids() == [rid], fmt
        m = build_windows([rid], source, CHANNELS, WINDOWS, tmp_path / f"out_{fmt}", "train")
        assert (m["cases_ok"], m["cases"][rid]["windows_total"]) == (1, 3), fmt
    assert open_source(f"{uri}/wfdb").records == {"p000001-01": "p00/p000001/p000001-01"}


@requires_realdata(REAL_VITAL)
@requires_realdata(BIDMC)
@requires_realdata(MIMIC)
@requires_realdata(ARRHYTHMIA)
@pytest.mark.timeout(600)
def test_every_format_pretrains_together_as_one_corpus(ray_session, tmp_path):
    """Vital files as EDF (PPG+ECG, train and val), BIDMC's CSV (PPG+ECG), the MIMIC record and two
    arrhythmia patients (PPG only: ECG absent, zeros, out of the loss): one pretraining run whose
    history counts each source's windows per epoch."""
    import dataclasses
    import json

    from biofm.config import PretrainConfig
    from biofm.sources.arrhythmia import RATE_HZ, read_patient
    from biofm.train.pretrain import pretrain

    edf_dir = tmp_path / "raw_edf"
    edf_dir.mkdir()
    for name, t in vital_tracks().items():
        write_edf(edf_dir / f"{name}.edf", {"Pleth": t["PPG"], "EKG": t["ECG"]})
    ids = sorted(p.stem for p in edf_dir.glob("*.edf"))
    built = {}
    for split, cases in (("train", ids[:4]), ("val", ids[4:])):
        built[("nsrr_edf", split)] = build_windows(cases, open_source(str(edf_dir)), CHANNELS, WINDOWS,
                                                   tmp_path / "nsrr_edf", split)
    built[("bidmc", "train")] = build(tmp_path, open_source(str(BIDMC)), name="bidmc")
    ppg = CONFIG.select(["PPG"])
    built[("mimic", "train")] = build(tmp_path, open_source(str(MIMIC)), channels=ppg, name="mimic")
    raw = tmp_path / "raw_arrhythmia"
    raw.mkdir()
    for patient in sorted(p.stem for p in ARRHYTHMIA.glob("MPA_*.mat"))[:2]:
        x = read_patient(ARRHYTHMIA, patient)[0][:8].ravel()
        (raw / f"{patient}.csv").write_text("BVP\n" + "\n".join(f"{v:.6f}" for v in x) + "\n")
    patients = open_source(str(raw), rate_hz=RATE_HZ).ids()
    for split, cases in (("train", patients[:1]), ("val", patients[1:])):
        built[("arrhythmia", split)] = build_windows(cases, open_source(str(raw), rate_hz=RATE_HZ), ppg, WINDOWS,
                                                     tmp_path / "arrhythmia", split)
    sources = ["nsrr_edf", "bidmc", "mimic", "arrhythmia"]
    cfg = PretrainConfig(num_layers=2, epochs=2, batch_size=32, lr=1e-3, warmup_epochs=1, cpus_per_worker=0.5,
                         max_failures=0, channels=("PPG", "ECG"))
    final = pretrain(cfg, [str(tmp_path / s) for s in sources], tmp_path / "fm")
    history = json.loads((tmp_path / "fm" / "training_history.json").read_text())
    for epoch in history:  # every train window of every source, each epoch
        assert {s: epoch[f"train_windows_{s}"] for s in sources} == {
            s: built[(s, "train")]["windows_kept"] for s in sources}
    assert all(built[(s, "train")]["windows_kept"] > 0 for s in sources) and np.isfinite(final["val_loss"])
    logged = tensorboard_scalars(tmp_path / "fm" / "tensorboard")
    assert logged["train/windows_mimic"] == [(1, 2.0), (2, 2.0)]  # its two PPG windows, in both epochs
    description = load_pretrained_description(tmp_path / "fm" / "best_model.pt")
    assert description["data_spec"]["channels"] == ["PPG", "ECG"] and list(description["data_spec"]["sources"]) == sources
    with pytest.raises(ConfigError, match=r"has channels \['PPG'\], not \['ECG'\]"):  # one source: every channel
        pretrain(dataclasses.replace(cfg, epochs=1), str(tmp_path / "mimic"), tmp_path / "fm2")
    # a PPG-only corpus YAML (paths from its folder, a weight per source): a one-channel model
    (tmp_path / "corpus.yaml").write_text("sources:\n  - {path: mimic, weight: 3}\n"
                                          "  - {path: arrhythmia, weight: 0.5, name: mpa}\n")
    # ... trained with the learning rate scaled for its batch: 32 against a base of 16, linear: twice lr,
    # reached at the warm-up's end (the epoch's last step)
    one = pretrain(dataclasses.replace(cfg, epochs=1, channels=("PPG",), lr_scaling="linear", base_batch_size=16),
                   str(tmp_path / "corpus.yaml"), tmp_path / "fm_ppg")
    assert one["lr"] == pytest.approx(2 * cfg.lr)
    assert load_pretrained_description(tmp_path / "fm_ppg" / "best_model.pt")["data_spec"]["channels"] == ["PPG"]
    n_mpa = built[("arrhythmia", "train")]["windows_kept"]
    assert (one["train_windows_mimic"], one["train_windows_mpa"]) == (3 * 2, round(n_mpa / 2))  # 1 worker: none left out
    (tmp_path / "bad.yaml").write_text("sources:\n  - {path: mimic, weight: 0}\n")
    with pytest.raises(ConfigError, match="weight must be > 0, got 0"):
        pretrain(cfg, str(tmp_path / "bad.yaml"), tmp_path / "fm3")


def load_pretrained_description(path):
    from biofm.train import checkpoint

    return checkpoint.load(path)["description"]
