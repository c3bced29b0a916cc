"""MATLAB and NumPy recordings (biofm.sources.arrays): files the tests write in each version and
layout, the bad ones skipped with their reasons, and the real CapnoBase and TROIKA files with their
labels on the windows' clock."""

import numpy as np
import pytest

from biofm import signals
from biofm.config import ChannelsConfig, WindowsConfig, load_config
from biofm.errors import CaseSkipped, ConfigError
from biofm.sources import arrays, capnobase, troika
from biofm.sources.formats import open_source
from biofm.windows import covered_s, filtered_windows, make_windows
from conftest import REALDATA, ROOT, heartbeat_signals, requires_realdata

CONFIG = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
CHANNELS = CONFIG.select(["PPG", "ECG"])
FIVE = CONFIG.select(["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"])
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
CAPNOBASE, TROIKA = REALDATA / "capnobase" / "data", REALDATA / "troika" / "Training_data"


def write_mat73(path, variables: dict):
    """A MATLAB 7.3 file as MATLAB writes it: HDF5 after a 512-byte header, each array stored with
    its axes reversed (column-major), structs as groups (``a/b``)."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in variables.items():
            f.create_dataset(name, data=np.asarray(value, dtype=np.float64).T)
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, written by the biofm tests".ljust(116))


def tracks_of(source, rid, channels=CHANNELS):
    return {c: (len(x), fs, name) for c, (x, fs, name) in source.read(rid, channels).pieces[0].tracks.items()}


def test_each_version_and_layout_reads_its_signals(tmp_path, monkeypatch):
    """Generic variables matched by channels.yaml's aliases (MATLAB v5, .npz), a TROIKA-layout v5
    file beside its label file, a CapnoBase-layout 7.3 file with its struct paths, TROIKA's test
    layout in 7.3 (rows in MATLAB's orientation), and a .npy with a layout of the user's."""
    import scipy.io

    ppg, ecg = heartbeat_signals(20.0, 125.0, seed=1)
    scipy.io.savemat(tmp_path / "generic.mat", {"PPG": ppg, "ECG": ecg[None, :], "fs": 125.0, "notes": np.ones((2, 3))})
    np.savez(tmp_path / "watch.npz", PLETH=ppg, II=ecg, sample_rate=np.array([125.0]))
    acc = np.random.default_rng(0).standard_normal((3, ppg.size))
    rows = np.stack([ecg, ppg, 2 * ppg, acc[0], acc[1] + 1, acc[2]])
    scipy.io.savemat(tmp_path / "DATA_01_TYPE01.mat", {"sig": rows})
    scipy.io.savemat(tmp_path / "DATA_01_TYPE01_BPMtrace.mat", {"BPM0": np.full((6, 1), 72.0)})
    write_mat73(tmp_path / "0001_8min.mat", {"signal/pleth/y": ppg[:, None], "signal/ecg/y": ecg[:, None],
                                            "param/samplingrate/pleth": [[125.0]]})
    write_mat73(tmp_path / "TEST_S01_T01.mat", {"sig": np.stack([ppg, 3 * ppg, ppg, ppg, ppg])})

    source = open_source(str(tmp_path))
    assert (source.fmt, source.ids()) == ("array", ["0001_8min", "DATA_01_TYPE01", "TEST_S01_T01", "generic", "watch"])
    assert tracks_of(source, "generic") == {"PPG": (2500, 125.0, "PPG"), "ECG": (2500, 125.0, "ECG")}
    assert source.read("generic", CHANNELS).found == ["ECG", "PPG", "fs", "notes"]
    assert tracks_of(source, "watch") == {"PPG": (2500, 125.0, "PLETH"), "ECG": (2500, 125.0, "II")}
    assert tracks_of(source, "0001_8min") == {"PPG": (2500, 125.0, "PLETH"), "ECG": (2500, 125.0, "ECG")}
    five = source.read("DATA_01_TYPE01", FIVE)
    assert five.found == ["ECG", "PPG", "PPG2", "ACC_X", "ACC_Y", "ACC_Z"]
    np.testing.assert_array_equal(five.pieces[0].tracks["PPG"][0], ppg)         # row 1, not PPG2's row 2
    np.testing.assert_array_equal(five.pieces[0].tracks["ACC_Y"][0], acc[1] + 1)
    test_part = source.read("TEST_S01_T01", CONFIG.select(["PPG"])).pieces[0].tracks["PPG"]
    np.testing.assert_allclose(test_part[0], ppg) and test_part[1] == 125.0      # row 0 of [5, N], read back

    own = tmp_path / "own"
    (own / "configs").mkdir(parents=True)
    np.save(own / "watch_0001.npy", np.stack([ppg, ecg]))
    (own / "configs" / "layouts.yaml").write_text(
        'layouts:\n  watch: {files: "watch_*.npy", signals: {BVP: "arr_0[0]", EKG: "arr_0[1]"}, rate_hz: 125}\n')
    monkeypatch.chdir(own)                                  # configs/layouts.yaml of the working folder wins
    assert tracks_of(open_source(str(own)), "watch_0001") == {"PPG": (2500, 125.0, "BVP"), "ECG": (2500, 125.0, "EKG")}


def test_bad_array_files_are_skipped_with_their_reasons(tmp_path):
    import scipy.io

    ppg, _ = heartbeat_signals(20.0, 100.0)
    (tmp_path / "garbage.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(range(256)) * 4)
    scipy.io.savemat(tmp_path / "no_rate.mat", {"PPG": ppg})
    scipy.io.savemat(tmp_path / "bad_rate.mat", {"PPG": ppg, "fs": -1.0})
    scipy.io.savemat(tmp_path / "other.mat", {"temperature": ppg, "fs": 100.0})
    scipy.io.savemat(tmp_path / "DATA_02_TYPE02.mat", {"sig": np.stack([ppg, ppg])})   # TROIKA names 6 rows
    np.save(tmp_path / "flat.npy", np.zeros(2000))
    source = open_source(str(tmp_path))
    expected = {"garbage": "corrupt_file: garbage.mat is not a readable .mat file",
                "no_rate": "no_sample_rate: no_rate.mat names no rate (a variable fs, fs_hz, srate, sample_rate, "
                           "sampling_rate, rate_hz): pass --rate-hz",
                "bad_rate": "no_sample_rate: bad_rate.mat: the rate -1.0 Hz is not a positive number",
                "other": "no_matching_channel: no PPG signal among fs, temperature",
                "flat": "no_matching_channel: no PPG signal among arr_0"}
    for rid, message in expected.items():
        with pytest.raises(CaseSkipped) as e:
            source.read(rid, CONFIG.select(["PPG"])).require(CONFIG.select(["PPG"]))
        assert str(e.value).startswith(message), (rid, str(e.value))
    with pytest.raises(CaseSkipped, match=r"corrupt_file: DATA_02_TYPE02.mat: sig\[3\] asks for row 3 of sig, an "
                                          r"array of shape \[2, 2000\]"):
        source.read("DATA_02_TYPE02", FIVE)                          # PPG alone is in its row 1
    assert tracks_of(source, "DATA_02_TYPE02", CONFIG.select(["PPG"])) == {"PPG": (2000, 125.0, "PPG")}
    assert tracks_of(open_source(str(tmp_path), rate_hz=100.0), "no_rate", CONFIG.select(["PPG"])) == {
        "PPG": (2000, 100.0, "PPG")}
    (tmp_path / "x.edf").write_bytes(b"0")
    with pytest.raises(ConfigError, match="2 formats"):
        open_source(str(tmp_path))
    with pytest.raises(ConfigError, match="--rate-hz only applies to CSV and MATLAB/NumPy"):
        open_source(f"edf:{tmp_path}", rate_hz=100.0)


@requires_realdata(CAPNOBASE)
def test_capnobase_channels_rates_and_labels_on_the_windows_clock():
    """42 cases of 8 min (144,001 samples at 300 Hz); the rater's PPG beats fall on the systolic
    peaks of the windows build-windows cuts (within 60 ms), and a rater artifact at sample s
    lands in the window that holds s."""
    source = open_source(str(CAPNOBASE))
    assert len(source.ids()) == 42 and source.ids()[0] == "0009_8min"
    rec = source.read("0009_8min", CHANNELS)
    assert rec.found == ["PLETH", "ECG", "CO2"] and rec.names() == {"PPG": "PLETH", "ECG": "ECG"}
    assert {c: (len(x), fs) for c, (x, fs, _) in rec.pieces[0].tracks.items()} == {"PPG": (144001, 300.0),
                                                                                  "ECG": (144001, 300.0)}
    path = CAPNOBASE / "0009_8min.mat"
    ppg = CONFIG.select(["PPG"])
    windows, starts = filtered_windows(rec.require(ppg).pieces[0].tracks, ppg, WINDOWS, {})
    assert len(starts) == 48
    rater = capnobase.beats_s(path, "PPG")
    matched = total = 0
    for w, start in zip(windows[:, 0], starts):
        found = signals.detect_beats(w, WINDOWS.sample_rate_hz, "ppg") / WINDOWS.sample_rate_hz + start
        marked = rater[(rater >= start + 0.5) & (rater < start + WINDOWS.window_s - 0.5)]
        matched += int((np.abs(marked[:, None] - found[None, :]).min(axis=1) <= 0.06).sum())
        total += len(marked)
    assert total > 700 and matched >= 0.97 * total, (matched, total)

    artifacts = capnobase.artifacts_s(CAPNOBASE / "0030_8min.mat", "PPG")   # [80086, 80776] and [140366, 140686]
    np.testing.assert_allclose(artifacts * 300.0, [[80086, 80776], [140366, 140686]])
    assert capnobase.artifacts_s(path, "PPG").shape == (0, 2)               # none marked
    covered = covered_s(artifacts, starts, WINDOWS.window_s)
    assert np.flatnonzero(covered).tolist() == [26, 46]                      # 267.0-269.3 s and 467.9-468.95 s
    np.testing.assert_allclose(covered[[26, 46]], [690 / 300, 320 / 300])
    t_rr, rr = capnobase.reference(path, "rr/co2")
    assert len(t_rr) == len(rr) == 151 and 10 < np.median(rr) < 30            # breaths/min


@requires_realdata(TROIKA)
def test_troika_channels_rates_and_reference_heart_rate_on_the_windows_clock():
    """12 recordings of about 5 min at 125 Hz, their label files not counted as recordings; the
    ECG beat rate of each 10 s window agrees with the mean BPM0 of the 8 s windows inside it."""
    source = open_source(str(TROIKA))
    assert source.ids() == [f"DATA_{k:02d}_TYPE0{1 if k == 1 else 2}" for k in range(1, 13)]
    rec = source.read("DATA_01_TYPE01", FIVE)
    assert rec.found == ["ECG", "PPG", "PPG2", "ACC_X", "ACC_Y", "ACC_Z"]
    assert {c: (len(x), fs) for c, (x, fs, _) in rec.pieces[0].tracks.items()} == {
        c: (37937, 125.0) for c in ("ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG")}
    t_ref, bpm = troika.heart_rate(TROIKA / "DATA_01_TYPE01.mat")
    assert len(bpm) == 148 and t_ref[-1] + troika.WINDOW_S <= 37937 / 125.0        # 2 s steps inside the recording
    ecg = CONFIG.select(["ECG"])
    cols, why = make_windows(rec.require(ecg).pieces[0].tracks, ecg, WINDOWS, {})
    agree = []
    for start, hr in zip(cols["start_s"], cols["ecg_hr_bpm"]):
        inside = (t_ref >= start) & (t_ref + troika.WINDOW_S <= start + WINDOWS.window_s)
        agree.append(abs(hr - bpm[inside].mean()) <= 5.0)
    assert len(agree) >= 25 and np.mean(agree) >= 0.9, np.mean(agree)
    with pytest.raises(CaseSkipped, match="missing_file: x.mat has no x_BPMtrace.mat beside it"):
        troika.heart_rate(TROIKA / "x.mat")
