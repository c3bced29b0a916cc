"""Window quality: the signal-quality indices, and each rule of check_windows with its reason and
its place in the order; clean pulses kept at every heart rate, signal loss rejected, on synthetic
and real recordings (no Ray)."""

import dataclasses
import importlib.util
import sys

import numpy as np
import pytest

from biofm import signals
from biofm.config import ChannelsConfig, WindowsConfig, load_config
from biofm.windows import covered_s, make_windows
from conftest import REALDATA, ROOT, heartbeat_signals, requires_realdata

CHANNELS = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
FS = 125.0
CAPNOBASE = REALDATA / "capnobase" / "data"


def bench_quality():
    """jobs/bench_quality.py as a module (its synthetic pulses, its report)."""
    if "bench_quality" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "jobs" / "bench_quality.py")
        sys.modules["bench_quality"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench_quality"])
    return sys.modules["bench_quality"]


def reasons(tracks: dict, names=("PPG",), cfg=WINDOWS) -> list[str]:
    """The reason of each window of ``tracks`` (name -> (x, fs)): '' where kept."""
    cols, why = make_windows({n: (x, fs, n) for n, (x, fs) in tracks.items()}, CHANNELS.select(names), cfg, {})
    assert cols["window_idx"].tolist() == [i for i, r in enumerate(why) if not r]
    return why


def pulse(seconds=10.0, hr=72.0, seed=0, fs=FS):
    return heartbeat_signals(seconds, fs, hr_bpm=hr, seed=seed)


def test_template_match_beat_agreement_and_band_power():
    beats = np.arange(50, 1250, 100)
    x = np.zeros(1250)
    x[beats] = 1.0
    x = np.convolve(x, np.hanning(21), "same")
    assert signals.template_match(x, beats) == pytest.approx(1.0)
    assert signals.template_match(x, beats[:2]) == 0.0          # no template from 2 beats
    assert signals.template_match(-x, beats) == pytest.approx(1.0)
    noisy = x + np.random.default_rng(0).standard_normal(1250)
    assert signals.template_match(noisy, beats) < 0.5

    a = np.array([100, 200, 300, 400])
    assert signals.beat_agreement(a, a + 18, FS) == 1.0          # 144 ms apart: within 150 ms
    assert signals.beat_agreement(a, a + 19, FS) == 0.0          # 152 ms: not
    assert signals.beat_agreement(a, np.array([100, 200, 900]), FS) == pytest.approx(2 / 5)
    assert signals.beat_agreement(a, np.array([], dtype=int), FS) == 0.0

    t = np.arange(1250) / FS
    assert signals.band_power_share(np.sin(2 * np.pi * 1.2 * t), FS, (0.5, 4), (0.5, 10)) == pytest.approx(1.0)
    assert signals.band_power_share(np.sin(2 * np.pi * 7.0 * t), FS, (0.5, 4), (0.5, 10)) < 1e-3
    mixed = np.sin(2 * np.pi * 1.2 * t) + np.sin(2 * np.pi * 7.0 * t)
    assert signals.band_power_share(mixed, FS, (0.5, 4), (0.5, 10)) == pytest.approx(0.5, abs=0.01)
    assert signals.band_power_share(np.zeros(1250), FS, (0.5, 4), (0.5, 10)) == 0.0
    rows = np.stack([mixed, mixed])                                   # one upper edge per row
    np.testing.assert_allclose(signals.band_power_share(rows, FS, (0.5, np.array([4.0, 8.0])), (0.5, 10)), [0.5, 1.0],
                               atol=0.01)
    assert signals.band_power_share(mixed, FS, (0.5, 20.0), (0.5, 10)) == pytest.approx(1.0)  # never beyond of_hz


def test_the_pulse_band_widens_with_the_rate_only_above_its_edge():
    edges = signals.pulse_band_edge_hz(np.array([40.0, 120.0, 168.0, 190.0, np.nan]), 7.0)
    np.testing.assert_allclose(edges, [7.0, 7.0, 7.0, 2.5 * 190 / 60, 7.0])
    assert signals.pulse_band_edge_hz(np.array([120.0]), 4.0)[0] == pytest.approx(5.0)   # 2.5 x 2 Hz


def test_the_checks_judge_the_pulse_band_at_the_windows_own_rate():
    """With the previous release's 4 Hz edge, a sharp 160 bpm pulse holds 22% of its power below
    4 Hz; the band the checks use reaches 2.5 x its own beat rate (6.6 Hz), which holds 86%, so
    it is kept."""
    x = bench_quality().synthetic_pulse(160, "sharpest", seconds=10.0, fs=250.0)
    cols, why = make_windows({"PPG": (x, 250.0, "p")}, CHANNELS.select(["PPG"]),
                             dataclasses.replace(WINDOWS, ppg_pulse_band_hz=4.0), {})
    window = signals.bandpass(signals.resample(x, 250.0, FS), FS, CHANNELS.channels["PPG"].band_hz)[None]
    edge = 2.5 * cols["ppg_hr_bpm"][0] / 60
    assert why == [""] and 6.5 < edge < 6.8
    assert cols["ppg_pulse_band_power"][0] == pytest.approx(signals.band_power_share(window, FS, (0.5, edge), (0.5, 10.0))[0],
                                                            rel=1e-5)
    assert signals.band_power_share(window, FS, (0.5, 4.0), (0.5, 10.0))[0] < 0.25 < 0.85 < cols["ppg_pulse_band_power"][0]


def test_signal_loss_is_the_longest_stretch_without_the_pulse():
    """Seconds where the amplitude over 1.2 beat intervals stays below the ratio of its 90th
    percentile: none in a steady pulse at 40 or 190 bpm, the stretch where it stops or fades."""
    t = np.arange(1250) / FS
    for hr in (40.0, 72.0, 190.0):
        x = np.sin(2 * np.pi * hr / 60 * t)
        assert signals.signal_loss_s(x, signals.detect_beats(x, FS, "ppg"), FS, 0.2) == 0.0, hr
    x = np.sin(2 * np.pi * 1.2 * t)
    stopped = x.copy()
    stopped[300:550] = 0.0                                             # 2 s without a pulse
    assert signals.signal_loss_s(stopped, signals.detect_beats(stopped, FS, "ppg"), FS, 0.2) == pytest.approx(2.0, abs=0.02)
    faded = x.copy()
    faded[625:] *= 0.1                                                 # the second half at a tenth
    loss = signals.signal_loss_s(faded, signals.detect_beats(faded, FS, "ppg"), FS, 0.2)
    assert 5.0 <= loss <= 5.1
    assert signals.signal_loss_s(faded, signals.detect_beats(faded, FS, "ppg"), FS, 0.05) == 0.0  # a tenth is above 5%


def test_signal_loss_counts_every_sample_of_the_stretch():
    """Exact stretches on a signal whose every span has the same amplitude (+-1 alternating) but
    where it is zero: beats 100 samples apart make spans of 120; a 250-sample stretch in the middle
    or at the end lasts 2.0 s to the sample; a stretch shorter than a span (110 samples) is no loss,
    one of 130 is 1.04 s, also where 2 beats alone give the interval; a fade to exactly the ratio is no loss."""
    x = np.where(np.arange(1250) % 2 == 0, 1.0, -1.0)
    beats = np.arange(50, 1250, 100)
    for lo, hi in ((300, 550), (1000, 1250)):
        gap = x.copy()
        gap[lo:hi] = 0.0
        assert signals.signal_loss_s(gap, beats, FS, 0.2) == pytest.approx(2.0, abs=1e-9), (lo, hi)
    short, longer = x.copy(), x.copy()
    short[300:410], longer[300:430] = 0.0, 0.0
    assert signals.signal_loss_s(short, beats, FS, 0.2) == 0.0
    assert signals.signal_loss_s(longer, beats, FS, 0.2) == pytest.approx(1.04, abs=1e-9)
    assert signals.signal_loss_s(longer, np.array([50, 150]), FS, 0.2) == pytest.approx(1.04, abs=1e-9)
    faint = x.copy()
    faint[300:550] *= 0.2                                              # peak to peak 0.4 = 0.2 x 2
    assert signals.signal_loss_s(faint, beats, FS, 0.2) == 0.0


@pytest.mark.parametrize("kind", ["ppg", "ecg"])
def test_noise_has_no_plausible_rhythm(kind):
    """Noise has 'beats' at plausible rates, but no beat looks like the others: white noise and
    noise band-passed like the channel are rejected, every window of 40, while pulses pass."""
    name = kind.upper()
    band = CHANNELS.channels[name].band_hz
    rng = np.random.default_rng(7)
    noise = rng.standard_normal(int(400 * FS))
    for x in (noise, signals.bandpass(noise, FS, band)):
        sqi = signals.beat_quality(signals.bandpass(x[:12500], FS, band).reshape(10, 1250), FS, kind, band,
                                   WINDOWS.signal_loss_ratio, WINDOWS.ppg_pulse_band_hz)
        assert (sqi["beats"] >= 3).all() and ((sqi["hr_bpm"] >= 30) & (sqi["hr_bpm"] <= 200)).all()  # what the old checks let through
        why = reasons({name: (x, FS)}, (name,))
        assert len(why) == 40 and all(why), why
        assert set(why) <= {f"{name}:low_template_match", f"{name}:low_pulse_band_power", f"{name}:detectors_disagree"}
    ppg, ecg = pulse(400.0)
    assert reasons({name: (ppg if kind == "ppg" else ecg, FS)}, (name,)) == [""] * 40


def _spikes(w):
    spikes = np.zeros(1250)
    spikes[::104] = 1.0
    w[:] = np.convolve(spikes, np.hanning(5), "same") + 0.01 * np.sin(np.arange(1250) / 3)  # a rhythm, no pulse shape


def _missing_and_noise(w):
    w[200:] = np.random.default_rng(8).standard_normal(1050)
    w[:200] = np.nan                                                 # missing and noise: missing first


def _fade(w):
    w[625:] *= 0.1                                                   # the second half at a tenth


RULE_CASES = {  # what is done to the middle window of 30 s of pulses at 72 bpm -> its reason (and the config)
    "missing": (lambda w: w.__setitem__(slice(0, 200), np.nan), "PPG:missing", {}),             # 16% NaN
    "stuck": (lambda w: w.__setitem__(slice(300, 700), w[300]), "PPG:flat", {}),                 # 32% repeats
    "constant": (lambda w: w.__setitem__(slice(None), 3.0), "PPG:flat", {}),
    "clipped": (lambda w: np.clip(w, None, np.quantile(w, 0.8), out=w), "PPG:clipped", {}),     # 20% at the max
    "7 beats": (lambda w: w.__setitem__(slice(None), pulse(10.0, hr=40.0, seed=4)[0]), "PPG:too_few_beats",
                {"min_beats": 8}),                                                             # 12 beats around it
    "25 /min": (lambda w: w.__setitem__(slice(None), pulse(10.0, hr=25.0, seed=5)[0]), "PPG:implausible_hr", {}),
    "faded": (_fade, "PPG:signal_loss", {}),
    "noise": (lambda w: w.__setitem__(slice(None), np.random.default_rng(6).standard_normal(1250)),
              "PPG:low_template_match", {}),
    "spikes": (_spikes, "PPG:low_pulse_band_power", {}),
    "missing and noise": (_missing_and_noise, "PPG:missing", {}),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_each_rule_rejects_with_its_reason_in_order(case):
    """Each rule rejects the window it is for, with its reason; the first rule failed is the one
    recorded; the windows around it are kept."""
    change, expected, overrides = RULE_CASES[case]
    x = pulse(30.0, seed=1)[0]
    change(x[1250:2500])
    assert reasons({"PPG": (x, FS)}, cfg=dataclasses.replace(WINDOWS, **overrides)) == ["", expected, ""]


def test_channels_are_checked_in_their_order():
    """A window bad in two channels records the first channel's reason."""
    ppg, ecg = pulse(20.0)
    noise = np.random.default_rng(9).standard_normal(1250)
    alone = reasons({"PPG": (np.r_[ppg[:1250], noise], FS)})
    both = {"PPG": (np.r_[ppg[:1250], noise], FS), "ECG": (np.r_[noise, noise], FS)}
    assert alone[0] == "" and alone[1].startswith("PPG:")
    assert reasons(both, ("PPG", "ECG")) == ["ECG:low_template_match", alone[1]]
    assert reasons(both, ("ECG", "PPG")) == ["ECG:low_template_match"] * 2


def test_a_channel_without_a_beat_detector_is_still_checked_for_flat_and_missing():
    """An accelerometer axis has no beat checks: a moving one is kept beside a clean PPG, one that
    is stuck for a window is ACC_X:flat, also where the whole recording is one constant (its
    band-passed window is all zeros), one of NaN ACC_X:missing."""
    ppg, _ = pulse(30.0)
    moving = np.sin(2 * np.pi * 1.5 * np.arange(3750) / FS)
    stuck, gone = moving.copy(), moving.copy()
    stuck[1250:2500], gone[2500:] = 0.25, np.nan
    assert reasons({"PPG": (ppg, FS), "ACC_X": (moving, FS)}, ("PPG", "ACC_X")) == ["", "", ""]
    assert reasons({"PPG": (ppg, FS), "ACC_X": (stuck, FS)}, ("PPG", "ACC_X")) == ["", "ACC_X:flat", ""]
    assert reasons({"PPG": (ppg, FS), "ACC_X": (gone, FS)}, ("PPG", "ACC_X")) == ["", "", "ACC_X:missing"]
    constant = np.full(1250, 0.25)                                     # band-passed: all zeros
    assert reasons({"PPG": (ppg[:1250], FS), "ACC_X": (constant, FS)}, ("PPG", "ACC_X")) == ["ACC_X:flat"]


def test_each_threshold_is_the_configured_one():
    """The rules read their thresholds from windows.yaml: loosening one lets its windows through
    to the next rule, or keeps them."""
    noise = np.random.default_rng(6).standard_normal(2500)
    assert reasons({"PPG": (noise, FS)}) == ["PPG:low_template_match", "PPG:low_pulse_band_power"]
    loose = dataclasses.replace(WINDOWS, ppg_min_template_match=-1.0)
    assert reasons({"PPG": (noise, FS)}, cfg=loose) == ["PPG:low_pulse_band_power"] * 2
    assert reasons({"PPG": (noise, FS)}, cfg=dataclasses.replace(loose, ppg_pulse_band_hz=9.9)) == ["", ""]  # all its band
    assert reasons({"PPG": (noise, FS)}, cfg=dataclasses.replace(loose, ppg_min_pulse_band_power=0.0)) == ["", ""]
    ecg_noise = {"ECG": (noise, FS)}
    assert set(reasons(ecg_noise, ("ECG",))) == {"ECG:low_template_match"}
    assert set(reasons(ecg_noise, ("ECG",), dataclasses.replace(WINDOWS, ecg_min_template_match=-1.0))) == {
        "ECG:detectors_disagree"}
    few = pulse(20.0, hr=25.0)[0]
    assert reasons({"PPG": (few, FS)}) == ["PPG:implausible_hr"] * 2
    assert reasons({"PPG": (few, FS)}, cfg=dataclasses.replace(WINDOWS, hr_bpm=(20.0, 200.0))) == ["", ""]
    assert reasons({"PPG": (few, FS)}, cfg=dataclasses.replace(WINDOWS, hr_bpm=(20.0, 200.0), min_beats=5)) == [
        "PPG:too_few_beats"] * 2
    faded = pulse(10.0)[0]
    _fade(faded)
    assert reasons({"PPG": (faded, FS)}) == ["PPG:signal_loss"]
    assert reasons({"PPG": (faded, FS)}, cfg=dataclasses.replace(WINDOWS, max_signal_loss_s=5.5)) == [""]
    assert reasons({"PPG": (faded, FS)}, cfg=dataclasses.replace(WINDOWS, signal_loss_ratio=0.05)) == [""]


def test_detectors_that_disagree_reject_an_ecg_window(monkeypatch):
    _, ecg = pulse(20.0)
    assert reasons({"ECG": (ecg, FS)}, ("ECG",)) == ["", ""]
    monkeypatch.setattr(signals, "qrs_amplitude_peaks", lambda qrs_band, fs: np.array([10, 700]))
    assert reasons({"ECG": (ecg, FS)}, ("ECG",)) == ["ECG:detectors_disagree"] * 2


def test_quality_indices_are_columns_of_the_kept_windows():
    ppg, ecg = pulse(30.0)
    cols, _ = make_windows({"PPG": (ppg, FS, "p"), "ECG": (ecg, FS, "e")}, CHANNELS.select(["PPG", "ECG"]),
                              WINDOWS, {})
    assert {k for k in cols if k.startswith(("ppg_", "ecg_"))} == {
        f"{c}_{k}" for c in ("ppg", "ecg") for k in ("nan_fraction", "flat_fraction", "clip_fraction", "beats",
                                                       "hr_bpm", "signal_loss_s", "template_match")} | {
        "ppg_pulse_band_power", "ecg_beat_agreement"}
    assert (cols["ppg_template_match"] > 0.95).all() and (cols["ecg_beat_agreement"] >= 0.9).all()
    assert (cols["ppg_pulse_band_power"] > 0.95).all()
    assert (cols["ppg_signal_loss_s"] == 0).all() and (cols["ecg_signal_loss_s"] == 0).all()


@requires_realdata(REALDATA / "ppg_arrhythmia")
def test_atrial_fibrillation_is_kept_like_sinus_rhythm():
    """Irregular rhythm is not noise: real AF segments pass about as often as sinus segments."""
    import scipy.io

    kept = {0: [], 5: []}
    for f in sorted((REALDATA / "ppg_arrhythmia").glob("MPA_*.mat"))[:12]:
        m = scipy.io.loadmat(f)
        for label in kept:
            for x in m["ppgseg"][m["labels"][:, 0] == label][:15]:
                kept[label].append(reasons({"PPG": (x.astype(float), 100.0)}) == [""])
    sinus, af = np.mean(kept[0]), np.mean(kept[5])
    assert len(kept[0]) > 60 and len(kept[5]) > 60
    assert sinus >= 0.97 and af >= sinus - 0.05, (sinus, af)


@requires_realdata(REALDATA / "vital")
def test_real_monitor_recordings_keep_their_pulses_and_lose_the_dropout():
    """The Vital Recorder files keep 49 of 62 windows; window 0 of MICUA01 ..._180000, whose pulse
    falls to near zero after 5 s, is rejected for signal loss (it was kept before the check)."""
    from biofm.sources.vitaldb import read_tracks

    kept = total = 0
    for p in sorted((REALDATA / "vital").glob("*.vital")):
        cols, why = make_windows(read_tracks(p, CHANNELS.select(["PPG", "ECG"])), CHANNELS.select(["PPG", "ECG"]),
                                 WINDOWS, {})
        kept, total = kept + len(cols["window_idx"]), total + len(why)
        if p.name.startswith("MICUA01") and "180000" in p.name:
            assert why[0] == "PPG:signal_loss"
    assert (kept, total) == (49, 62)


@requires_realdata(REALDATA / "bidmc")
def test_the_motion_artifact_in_bidmc_is_rejected():
    """BIDMC record 01's PPG is disturbed from 90 to 110 s: those two windows go (signal loss),
    the other 46 stay."""
    from biofm.sources.formats import open_source

    both = CHANNELS.select(["PPG", "ECG"])
    _, why = make_windows(open_source(str(REALDATA / "bidmc")).read("bidmc_01_Signals", both).pieces[0].tracks, both,
                          WINDOWS, {})
    assert [(10 * i, r) for i, r in enumerate(why) if r] == [(90, "PPG:signal_loss"), (100, "PPG:signal_loss")]
    assert len(why) == 48


@requires_realdata(REALDATA / "mimic2_wdb")
def test_an_8_bit_ecgs_flat_baseline_is_not_a_stuck_signal():
    """MIMIC-II's 8-bit MCL1 lead holds its isoelectric line at one value for up to 0.8 s between
    beats: 10 minutes of it keep their windows (none flat); the same record stuck for 3 s is flat."""
    from biofm.sources.formats import open_source

    ecg = CHANNELS.select(["ECG"])
    piece = next(p for p in open_source(str(REALDATA / "mimic2_wdb")).read("s00001-2896-10-10-00-31", ecg).pieces
                 if p.label == "3975656_0005")
    x, fs, name = piece.tracks["ECG"]
    assert name == "MCL1" and fs == 125.0
    _, why = make_windows({"ECG": (x[:int(600 * fs)], fs, name)}, ecg, WINDOWS, {})
    assert len(why) == 60 and "ECG:flat" not in why and why.count("") >= 50
    stuck = x[:int(10 * fs)].copy()
    stuck[300:675] = stuck[300]
    assert make_windows({"ECG": (stuck, fs, name)}, ecg, WINDOWS, {})[1] == ["ECG:flat"]


def test_a_clean_pulse_is_kept_at_every_rate():
    """Clean pulses with a dicrotic notch at 40 to 190 bpm, in the smooth and the sharpest shape of
    jobs/bench_quality.py, are kept, every window, and their rate is measured (the fixed 0.5-4 Hz
    pulse band of the previous release rejected every sharp window from 100 bpm up)."""
    bench = bench_quality()
    for shape in ("smooth", "sharpest"):
        for hr in (40, 80, 120, 160, 190):
            cols, why = make_windows({"PPG": (bench.synthetic_pulse(hr, shape, seconds=30.0), 250.0, "p")},
                                     CHANNELS.select(["PPG"]), WINDOWS, {})
            assert why == ["", "", ""], (shape, hr, why)
            np.testing.assert_allclose(cols["ppg_hr_bpm"], hr, rtol=0.05)


def test_the_accelerometer_indices_tell_an_arm_swing_from_a_pulse():
    """jobs/bench_quality.py's motion indices, on one window of 150 bpm pulse beside an arm
    swinging at 0.9 Hz (54/min: 1/2, 1 and 2 times it are 27, 54, 108 bpm, so the gap is 42 bpm)
    and one of a PPG that is the swing itself at 1.3 Hz, 0.3 rad behind the X axis (gap 0, correlation
    about 1 at a lag the search reaches)."""
    bench = bench_quality()
    t = np.arange(1250) / FS
    rng = np.random.default_rng(0)
    band = CHANNELS.channels["PPG"].band_hz
    heart = signals.bandpass(bench.synthetic_pulse(150, "smooth", seconds=10.0, fs=FS), FS, band)
    swing = np.stack([np.sin(2 * np.pi * 0.9 * t), 0.1 * rng.standard_normal(1250), 0.1 * rng.standard_normal(1250)])
    arm = np.sin(2 * np.pi * 1.3 * t - 0.3)
    follows = np.stack([np.sin(2 * np.pi * 1.3 * t), 0.1 * rng.standard_normal(1250), 0.1 * rng.standard_normal(1250)])
    gap, corr = bench.accelerometer_indices(np.stack([heart, arm]), np.stack([swing, follows]), FS)
    np.testing.assert_allclose(gap, [42.0, 0.0], atol=3.0)   # the spectrum's bins are 1.8 bpm apart; 2% beat jitter
    assert corr[0] < 0.3 and corr[1] > 0.95, corr


@requires_realdata(CAPNOBASE)
def test_real_fast_pulses_are_kept_and_a_faded_real_window_is_lost():
    """CapnoBase's three fastest cases (median 120-142 bpm, children under anaesthesia): every
    clean window at 120 bpm or more by the rater's ECG beats is kept but at most 3 of them; one
    of them with its second half cut to a tenth of its amplitude is rejected for signal loss."""
    from biofm.sources import capnobase
    from biofm.sources.formats import open_source

    source, ppg = open_source(str(CAPNOBASE)), CHANNELS.select(["PPG"])
    fast = kept = 0
    for case in ("0015_8min", "0016_8min", "0018_8min"):
        tracks = source.read(case, ppg).pieces[0].tracks
        cols, why = make_windows(tracks, ppg, WINDOWS, {})
        starts = np.arange(len(why)) * WINDOWS.stride_s
        beats = capnobase.beats_s(CAPNOBASE / f"{case}.mat", "ECG")
        rate = np.array([60 / np.median(np.diff(beats[(beats >= s) & (beats < s + 10)])) for s in starts])
        clean = covered_s(capnobase.artifacts_s(CAPNOBASE / f"{case}.mat", "PPG"), starts, 10.0) == 0
        fast += int((clean & (rate >= 120)).sum())
        kept += int((clean & (rate >= 120) & (np.array(why) == "")).sum())
    assert fast >= 100 and kept >= fast - 3, (kept, fast)
    x, fs, name = source.read("0016_8min", ppg).pieces[0].tracks["PPG"]
    window = x[:int(10 * fs)].copy()
    assert make_windows({"PPG": (window, fs, name)}, ppg, WINDOWS, {})[1] == [""]
    window[int(5 * fs):] *= 0.1
    assert make_windows({"PPG": (window, fs, name)}, ppg, WINDOWS, {})[1] == ["PPG:signal_loss"]


def _at_native_100hz(seconds=30.0):
    ppg, _ = heartbeat_signals(seconds, 100.0, seed=2)
    return ppg


def test_each_threshold_keeps_the_window_that_meets_it_exactly():
    """A window whose index equals its threshold is kept (thresholds are inclusive), for every
    rule: the raw fractions at exactly representable values, the indices at the window's own."""
    x = _at_native_100hz(10.0)
    missing, stuck, pinned = x.copy(), x.copy(), x.copy()
    missing[:125] = np.nan                                  # 125 of 1000 samples: 0.125
    stuck[300:551] = stuck[300]                             # 250 repeats of 1000: 0.25
    order = np.argsort(pinned)
    pinned[order[:64]], pinned[order[-63:]] = pinned[order[0]], pinned[order[-1]]  # 64 + 63 - 2 = 125: 0.125
    exact = dataclasses.replace(WINDOWS, max_nan_fraction=0.125, max_flat_fraction=0.25, max_clip_fraction=0.125,
                                max_signal_loss_s=5.0)   # the 2.5 s stuck stretch is also a signal loss
    for signal in (missing, stuck, pinned):
        assert reasons({"PPG": (signal, 100.0)}, cfg=exact) == [""]
    assert reasons({"PPG": (missing, 100.0)}, cfg=dataclasses.replace(exact, max_nan_fraction=0.124)) == ["PPG:missing"]

    for name, x, fs in (("PPG", _at_native_100hz(10.0), 100.0), ("ECG", pulse(10.0)[1], FS)):
        spec = CHANNELS.channels[name]
        window = signals.bandpass(signals.resample(x, fs, FS), FS, spec.band_hz)[None]
        sqi = {k: float(v[0]) for k, v in signals.beat_quality(window, FS, spec.quality, spec.band_hz,
                                                                WINDOWS.signal_loss_ratio, WINDOWS.ppg_pulse_band_hz).items()}
        key = name.lower()
        own = dataclasses.replace(WINDOWS, hr_bpm=(sqi["hr_bpm"], 200.0), min_beats=int(sqi["beats"]),
                                  **{f"{key}_min_template_match": sqi["template_match"]},
                                  **({"ppg_min_pulse_band_power": sqi["pulse_band_power"]} if name == "PPG"
                                     else {"ecg_min_beat_agreement": sqi["beat_agreement"]}))
        assert reasons({name: (x, fs)}, (name,), own) == [""], sqi
        assert reasons({name: (x, fs)}, (name,), dataclasses.replace(own, hr_bpm=(30.0, sqi["hr_bpm"]))) == [""]
    faded = _at_native_100hz(10.0)
    faded[500:] *= 0.1
    window = signals.bandpass(signals.resample(faded, 100.0, FS), FS, CHANNELS.channels["PPG"].band_hz)
    loss = signals.signal_loss_s(window, signals.detect_beats(window, FS, "ppg"), FS, WINDOWS.signal_loss_ratio)
    assert loss > WINDOWS.max_signal_loss_s
    assert reasons({"PPG": (faded, 100.0)}, cfg=dataclasses.replace(WINDOWS, max_signal_loss_s=loss)) == [""]
    assert reasons({"PPG": (faded, 100.0)}, cfg=dataclasses.replace(WINDOWS, max_signal_loss_s=loss - 0.01)) == [
        "PPG:signal_loss"]


def test_the_first_rejected_window_of_each_reason_is_its_example():
    """make_windows' examples (the data report's pictures): per reason not already there, the first
    rejected window's start (s) and z-scored signal ``[C, T]`` float32; kept windows are none."""
    from biofm.windows import filtered_windows

    x = _at_native_100hz(40.0)
    x[1000:2000], x[3000:4000] = x[1000], x[3000]          # windows 1 and 3 stuck
    x[2000:3000] = np.nan                                  # window 2 missing
    ppg = CHANNELS.select(["PPG"])
    examples = {}
    _, why = make_windows({"PPG": (x, 100.0, "p")}, ppg, WINDOWS, {}, examples)
    assert why == ["", "PPG:flat", "PPG:missing", "PPG:flat"] and sorted(examples) == ["PPG:flat", "PPG:missing"]
    windows, _ = filtered_windows({"PPG": (x, 100.0, "p")}, ppg, WINDOWS, {})
    for reason, (start, i) in {"PPG:flat": (10.0, 1), "PPG:missing": (20.0, 2)}.items():
        assert examples[reason][0] == start and examples[reason][1].dtype == np.float32
        np.testing.assert_allclose(examples[reason][1], signals.zscore(windows[i]), atol=1e-5)
    earlier = {"PPG:flat": "from an earlier case"}
    make_windows({"PPG": (x, 100.0, "p")}, ppg, WINDOWS, {}, earlier)
    assert earlier["PPG:flat"] == "from an earlier case" and earlier["PPG:missing"][0] == 20.0


def test_a_labelled_record_is_checked_not_rejected():
    """record_quality (prepare-task's check of a labelled record, whose label may be the quality
    itself): the indices of the present channels, equal to make_windows' on the same 10 s, and
    the first failure, never an exception: a clean PPG passes with the ECG absent, samples stuck
    after the window's 10 s do not count, a second half at a tenth is PPG:signal_loss."""
    from biofm.windows import record_quality

    x = _at_native_100hz(12.0)
    x[1000:] = x[1000]
    both = CHANNELS.select(["PPG", "ECG"])
    quality, reason = record_quality({"PPG": (x, 100.0)}, both, WINDOWS)
    cols, _ = make_windows({"PPG": (x[:1000], 100.0, "p")}, CHANNELS.select(["PPG"]), WINDOWS, {})
    assert reason == "" and sorted(quality) == sorted(k for k in cols if k.startswith("ppg_"))
    for k, v in quality.items():
        assert v == pytest.approx(float(cols[k][0]), rel=1e-5, abs=1e-6), k
    faded = x.copy()
    faded[500:] *= 0.1
    assert record_quality({"PPG": (faded, 100.0)}, both, WINDOWS)[1] == "PPG:signal_loss"


def test_make_windows_columns_timings_and_filters():
    from biofm.errors import CaseSkipped

    ppg, ecg = pulse(30.0)
    acc = np.random.default_rng(1).standard_normal(3750)
    channels = {**CHANNELS.select(["PPG", "ECG"]), "ACC_X": CHANNELS.channels["ACC_X"],
                "PPG": dataclasses.replace(CHANNELS.channels["PPG"], filter_order=2, stopband_db=30.0)}
    timings = {}
    cols, why = make_windows({"PPG": (ppg, FS, "p"), "ECG": (ecg, FS, "e"), "ACC_X": (acc, FS, "a")}, channels,
                             WINDOWS, timings)
    assert why == ["", "", ""] and set(timings) == {"resample", "filter", "quality"}
    assert all(0 <= v < 0.5 for v in timings.values())                   # milliseconds, counted from 0
    first = dict(timings)
    make_windows({"PPG": (ppg, FS, "p")}, CHANNELS.select(["PPG"]), WINDOWS, timings)
    assert all(timings[k] > first[k] for k in first)                      # seconds add up over calls
    assert (cols["window_idx"].dtype, cols["start_s"].dtype, cols["signal"].dtype) == (np.int32, np.float64, np.float32)
    assert cols["ppg_beats"].dtype == np.int16 and cols["ppg_hr_bpm"].dtype == np.float32
    assert cols["ppg_template_match"].dtype == np.float32
    assert cols["acc_x_beats"].tolist() == [0, 0, 0] and np.isnan(cols["acc_x_hr_bpm"]).all()  # no beat detector
    assert "acc_x_template_match" not in cols
    expected = signals.zscore(signals.cut_windows(signals.bandpass(ppg, FS, (0.5, 10.0), 2, 30.0),
                                                  np.array([0, 1250, 2500]), 1250))
    np.testing.assert_allclose(cols["signal"][:, 0], expected, atol=1e-5)   # the channel's own filter design
    with pytest.raises(CaseSkipped, match="too_short"):
        make_windows({"PPG": (ppg[:1249], FS, "p")}, CHANNELS.select(["PPG"]), WINDOWS, {})


def test_record_signal_shapes_filters_and_gaps():
    from biofm.errors import CaseSkipped
    from biofm.windows import record_signal

    five = CHANNELS.select(["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"])
    five = {**five, "PPG": dataclasses.replace(five["PPG"], filter_order=2, stopband_db=30.0)}
    ppg, ecg = pulse(10.0)
    signal, present = record_signal({"ACC_X": (np.full(1250, np.nan), FS), "PPG": (ppg, FS), "ECG": (ecg, FS)},
                                    five, WINDOWS)
    assert signal.dtype == np.float32 and present.dtype == bool and signal.shape == (5, 1250)
    assert present.tolist() == [False, False, False, True, True]          # all-NaN ACC_X: absent, PPG still read
    np.testing.assert_allclose(signal[3], signals.zscore(signals.bandpass(ppg, FS, (0.5, 10.0), 2, 30.0)), atol=1e-5)
    with pytest.raises(CaseSkipped, match="too_short"):
        record_signal({"PPG": (ppg[:1249], FS)}, five, WINDOWS)


@pytest.mark.slow
@requires_realdata(CAPNOBASE)
@requires_realdata(REALDATA / "troika")
def test_the_docs_quality_tables_are_a_fresh_run_and_meet_the_targets(tmp_path):
    """docs/data.md's window-quality tables are what jobs/bench_quality.py measures now (they
    drifted from the code once), and every target of the report part is met."""
    bench = bench_quality()
    result = bench.main(["--output", str(tmp_path)])
    doc = (ROOT / "docs" / "data.md").read_text()
    start, end = doc.index(bench.MARKERS[0]) + len(bench.MARKERS[0]), doc.index(bench.MARKERS[1])
    assert doc[start:end].strip() == (tmp_path / "bench_quality.md").read_text().strip()
    assert result["targets"] and all(result["targets"].values()), result["targets"]
    assert result["capnobase"]["PPG"]["artifact_windows"] == 25 and result["synthetic_kept"] == 1.0

    # the figures the README's window-quality paragraph and the docs' prose state are this run's
    readme = " ".join((ROOT / "README.md").read_text().split())
    prose = " ".join(doc[end:].split())
    cap, motion = result["capnobase"], result["troika_motion"]
    bins = [b["kept_share"] for name, rows in result["by_hr"].items() if name.startswith("CapnoBase") for b in rows.values()]
    noise = [r["kept_share"] for name, r in result["rows"].items() if name.startswith("noise") and "pulse-band" not in name]
    off = {row: result["troika"][row]["run"]["off"]["kept_share"] for row in ("PPG", "PPG2")}
    aurocs = [m["auroc"] for indices in motion.values() for m in indices.values()]
    caught = [m["motion_rejected"] for indices in motion.values() for m in indices.values()]
    auroc_range = f"AUROC {min(aurocs):.2f}–{max(aurocs):.2f}"
    kept_off = f"{100 * off['PPG']:.0f}% (PPG) and {100 * off['PPG2']:.0f}% (PPG2)"
    for claim in (f"kept {100 * cap['PPG']['specificity']:.1f}% (PPG) and {100 * cap['ECG']['specificity']:.1f}% (ECG)",
                  f"{100 * min(bins):.1f}% or more in every 20 bpm bin from 40 to 160 bpm",
                  *(f"{100 * cap[ch]['sensitivity']:.0f}% {'of the time ' if ch == 'PPG' else ''}({ch}, "
                    f"{round(cap[ch]['sensitivity'] * cap[ch]['artifact_windows'])} of {cap[ch]['artifact_windows']})"
                    for ch in ("PPG", "ECG")),
                  f"white and band-passed noise {100 * (1 - max(noise)):.1f}% or more",
                  f"kept {result['af_gap_points']:.1f} points less often than sinus", kept_off, auroc_range):
        assert claim in readme, claim
    for claim in (f"keep {kept_off} of them", auroc_range, f"reject only {100 * min(caught):.0f}–{100 * max(caught):.0f}%"):
        assert claim in prose, claim
