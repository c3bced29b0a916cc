import numpy as np
import pytest

from biofm import signals
from conftest import heartbeat_signals


def sine(freq, fs, seconds, amp=1.0):
    t = np.arange(int(fs * seconds)) / fs
    return amp * np.sin(2 * np.pi * freq * t)


@pytest.mark.parametrize("fs_in", [500.0, 300.0, 100.0, 30.0, 1000.0])
def test_resample_keeps_frequency_and_amplitude(fs_in):
    y = signals.resample(sine(1.5, fs_in, 20), fs_in, 125.0)
    assert len(y) == 2500
    spectrum = np.abs(np.fft.rfft(y[250:-250]))
    assert np.fft.rfftfreq(2000, 1 / 125)[spectrum.argmax()] == pytest.approx(1.5, abs=0.07)
    assert np.abs(y[250:-250]).max() == pytest.approx(1.0, abs=0.02)


def test_resample_keeps_an_offset_at_the_edges():
    """A PPG recorded at -254 units (BUT-PPG) must not gain a spike at each end."""
    x = -254.0 + sine(1.2, 30.0, 10)
    y = signals.resample(x, 30.0, 125.0)
    assert len(y) == 1250 and np.abs(y + 254.0).max() < 1.5


def test_resample_removes_aliases():
    # 100 Hz at 500 Hz would alias to 25 Hz at 125 Hz without the anti-aliasing filter.
    y = signals.resample(sine(100, 500, 10), 500, 125)
    assert np.abs(y[100:-100]).max() < 0.01


def test_bandpass_passes_band_and_rejects_outside():
    fs = 125.0
    def gain(f, band):
        y = signals.bandpass(sine(f, fs, 60), fs, band)
        return np.abs(y[1000:-1000]).max()
    assert gain(1.2, (0.5, 10)) == pytest.approx(1.0, abs=0.05)
    assert gain(0.05, (0.5, 10)) < 0.02        # baseline wander
    assert gain(30.0, (0.5, 10)) < 0.02        # noise above the PPG band
    assert gain(20.0, (0.5, 40)) == pytest.approx(1.0, abs=0.05)  # QRS energy kept for ECG


@pytest.mark.parametrize("band", [(0.5, 10.0), (0.5, 40.0), (0.5, 20.0)])
def test_bandpass_edges_are_the_pass_band(band):
    """``band_hz`` is the pass band: -3 dB (amplitude 0.708) at both edges of the zero-phase filter,
    within 0.5 dB from 1.4x the low edge to 0.7x the high edge, 40 dB or more down beyond the stop
    band. (scipy's cheby2 takes the stop-band edges: given (0.5, 10) it passed 1-5 Hz, 0.04 at 0.7 Hz,
    the fundamental of a 42 bpm pulse.)"""
    fs, (low, high) = 125.0, band

    def gain(f):
        y = signals.bandpass(sine(f, fs, 120), fs, band)
        return np.abs(y[3000:-3000]).max()
    for edge in band:
        assert gain(edge) == pytest.approx(10 ** (-3 / 20), abs=0.02)
    for f in (1.4 * low, 2.0, 0.7 * high):
        assert gain(f) == pytest.approx(1.0, abs=0.06)
    stop = signals.cheby2_stopband_edges(fs, band, 4, 40.0)
    assert stop[0] < low and stop[1] > high
    assert gain(stop[0] * 0.9) < 0.01 and gain(min(stop[1] * 1.1, 62.0)) < 0.01


@pytest.mark.parametrize("fs, band, order, stopband_db", [(125.0, (0.5, 10.0), 4, 40.0), (125.0, (0.5, 40.0), 4, 40.0),
                                                         (100.0, (0.5, 20.0), 4, 40.0), (125.0, (1.0, 8.0), 3, 30.0)])
def test_the_stopband_edges_put_the_pass_band_where_asked(fs, band, order, stopband_db):
    """A Chebyshev II designed with these stop-band edges has a one-pass power gain of 1/sqrt(2)
    at both ``band`` edges, so the zero-phase filter's is 1/2 (-3 dB); designed here, not through
    bandpass's cache."""
    import scipy.signal as sps

    stop = signals.cheby2_stopband_edges(fs, band, order, stopband_db)
    sos = sps.cheby2(order, stopband_db, stop, btype="bandpass", output="sos", fs=fs)
    _, h = sps.sosfreqz(sos, worN=np.array(band), fs=fs)
    np.testing.assert_allclose(np.abs(h) ** 2, 1 / np.sqrt(2), rtol=1e-9)


def test_bandpass_is_zero_phase():
    fs = 125.0
    x = sine(1.0, fs, 30)
    y = signals.bandpass(x, fs, (0.5, 10))
    core = slice(500, -500)
    assert np.argmax(y[core][:125]) == np.argmax(x[core][:125])


def test_bandpass_rejects_edge_above_nyquist():
    with pytest.raises(ValueError, match="below Nyquist"):
        signals.bandpass(np.zeros(1000), 30.0, (0.5, 20.0))


def test_fill_gaps():
    x = np.array([np.nan, 1.0, np.nan, 3.0, np.nan])
    filled, missing = signals.fill_gaps(x)
    np.testing.assert_allclose(filled, [1.0, 1.0, 2.0, 3.0, 3.0])
    assert missing.tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match="no finite samples"):
        signals.fill_gaps(np.full(4, np.nan))


def test_window_starts_and_cut():
    assert signals.window_starts(1249, 1250, 1250).size == 0
    np.testing.assert_array_equal(signals.window_starts(3999, 1250, 1250), [0, 1250, 2500])
    np.testing.assert_array_equal(signals.window_starts(2500, 1250, 625), [0, 625, 1250])
    w = signals.cut_windows(np.arange(3000.0), np.array([0, 1250]), 1250)
    assert w.shape == (2, 1250) and w[1, 0] == 1250 and w[1, -1] == 2499


def test_raw_quality_fractions():
    fs = 100.0
    x = sine(1.0, fs, 30) + 0.001 * np.arange(3000)
    x[1000:1100] = np.nan              # window 1: 10% missing
    x[2000:2300] = x[2000]             # window 2: 30% stuck (299 repeats)
    q = signals.raw_quality(x, fs, np.array([0.0, 10.0, 20.0]), 10.0)
    np.testing.assert_allclose(q["nan_fraction"], [0.0, 0.1, 0.0], atol=1e-6)
    assert q["flat_fraction"][0] == 0 and q["flat_fraction"][2] == pytest.approx(0.299, abs=1e-3)
    assert q["clip_fraction"][0] == 0
    # A start that rounds past the end of an odd-rate signal is clamped, not an error.
    odd = signals.raw_quality(np.arange(999.0), 99.9, np.array([0.0, 0.02]), 10.0)
    assert odd["nan_fraction"].tolist() == [0.0, 0.0]
    clipped = np.clip(sine(1.0, fs, 10), -0.5, 0.5)
    assert signals.raw_quality(clipped, fs, np.array([0.0]), 10.0)["clip_fraction"][0] > 0.5


@pytest.mark.parametrize("hr", [40.0, 72.0, 150.0])
def test_beats_and_heart_rate(hr):
    ppg, ecg = heartbeat_signals(10.0, 500.0, hr_bpm=hr)
    p = signals.bandpass(signals.resample(ppg, 500, 125), 125, (0.5, 10))
    e = signals.bandpass(signals.resample(ecg, 500, 125), 125, (0.5, 40))
    for kind, x in (("ppg", p), ("ecg", e), ("ecg", -e)):
        beats = signals.detect_beats(x, 125, kind)
        assert abs(len(beats) - hr / 6) <= 1.5, (kind, len(beats))
        assert signals.heart_rate_bpm(beats, 125) == pytest.approx(hr, rel=0.06)


def test_beat_detector_edge_cases():
    """Noise itself: tests/test_quality.py."""
    noise = np.random.default_rng(0).standard_normal(1250)
    assert signals.detect_beats(np.zeros(1250), 125, "ppg").size == 0
    assert np.isnan(signals.heart_rate_bpm(np.array([3]), 125))
    with pytest.raises(ValueError, match="unknown beat detector"):
        signals.detect_beats(noise, 125, "abp")


def test_zscore():
    w = np.random.default_rng(1).normal(5, 3, size=(4, 2, 1250))
    z = signals.zscore(w)
    np.testing.assert_allclose(z.mean(-1), 0, atol=1e-9)
    np.testing.assert_allclose(z.std(-1), 1, atol=1e-9)
    small = signals.zscore(0.01 * w)                      # any scale: eps only guards a constant window
    np.testing.assert_allclose(small.std(-1), 1, atol=1e-6)
    assert (signals.zscore(np.ones((2, 10))) == 0).all()


def test_edges_of_the_small_functions():
    """Boundaries and dtypes the rest of the code relies on (found by mutation testing)."""
    assert signals.fill_gaps(np.array([1, 2, 3]))[0].dtype == np.float64            # ints become float64
    assert signals.resample(np.arange(10), 125.0, 125.0).dtype == np.float64
    assert len(signals.resample(np.zeros(625), 62.5, 125.0)) == 1250                 # a ratio of exactly 2
    np.testing.assert_array_equal(signals.resample(np.arange(5.0), 125.0, 125.0), np.arange(5.0))
    x = sine(1.2, 125.0, 20) + 0.3 * sine(12.0, 125.0, 20)
    np.testing.assert_array_equal(signals.bandpass(x, 125.0, (0.5, 10)), signals.bandpass(x, 125.0, (0.5, 10), 4, 40.0))
    for starts in (signals.window_starts(1249, 1250, 1250), signals.window_starts(1251, 1250, 1)):
        assert starts.dtype == np.int64
    np.testing.assert_array_equal(signals.window_starts(1251, 1250, 1), [0, 1])   # the last full window, no more
    assert signals.heart_rate_bpm(np.array([0, 125]), 125.0) == 60.0               # two beats give a rate
    assert signals.heart_rate_bpm(np.array([0, 100, 250, 350]), 125.0) == pytest.approx(75.0)  # median interval


def test_raw_quality_of_edge_windows():
    fs = 10.0
    x = np.r_[np.linspace(0, 1, 100), np.full(100, np.nan), np.full(100, 2.0),
              np.r_[np.nan, 5.0, np.full(98, np.nan)], np.r_[np.linspace(0, 1, 90), np.full(10, np.nan)]]
    q = signals.raw_quality(x, fs, np.array([0.0, 10.0, 20.0, 30.0, 40.0]), 10.0)
    assert all(v.dtype == np.float32 for v in q.values())
    np.testing.assert_allclose(q["nan_fraction"], [0.0, 1.0, 0.0, 0.99, 0.1], atol=1e-6)
    np.testing.assert_allclose(q["flat_fraction"], [0.0, 1.0, 0.99, 0.0, 0.0], atol=1e-6)  # all-NaN: 1
    # a constant window is flat, not clipped; the ends of a ramp are one sample each, NaNs ignored
    np.testing.assert_allclose(q["clip_fraction"], [0.0, 1.0, 0.0, 0.0, 0.0], atol=1e-6)
    ramp_with_nan_and_ends = np.r_[0.0, 0.0, np.linspace(0.1, 0.9, 96), np.nan, 1.0]
    assert signals.raw_quality(ramp_with_nan_and_ends, fs, np.array([0.0]), 10.0)["clip_fraction"][0] == (
        pytest.approx(1 / 99))  # two samples at the minimum: one more than an unclipped end


def test_template_match_edges():
    beats = np.arange(50, 1250, 100)
    x = np.zeros(1250)
    x[beats] = 1.0
    x = np.convolve(x, np.hanning(21), "same")
    assert signals.template_match(x, beats[:3]) == pytest.approx(1.0)                # three beats suffice
    offsets = x + (np.arange(1250) // 100) * 5.0                                    # steps between beats
    assert signals.template_match(offsets, beats) == pytest.approx(1.0, abs=1e-6)    # each beat's offset removed
    assert signals.template_match(x, np.array([50, 150, 1200])) == 0.0                 # one whole beat: no template
    edge = np.array([50, 150, 250])                                                    # half = 50: 50 is whole
    assert signals.template_match(x, edge) == pytest.approx(1.0)
    assert signals.template_match(x[:300], np.array([50, 150, 250])) == pytest.approx(1.0)  # 250 + 50 = 300 fits
    assert signals.template_match(x, np.array([10, 11, 12, 13])) == 0.0                 # half a sample: none
    assert signals.template_match(x, np.array([0, 100, 200, 1240])) == pytest.approx(1.0)  # two whole beats: a template
    wide = np.convolve(np.eye(1, 100, 50)[0], np.hanning(41), "same")                  # a beat unlike the others
    last, first = x[:1200].copy(), x.copy()
    last[1100:1200], first[0:100] = wide, wide
    assert signals.template_match(last, beats) < 0.999    # the beat at 1150 ends at the window's end: it counts
    assert signals.template_match(first, beats) < 0.999   # the beat at 50 starts at sample 0: it counts
    assert signals.beat_agreement(np.array([100]), np.array([100]), 125.0) == 1.0
    assert signals.beat_agreement(np.array([100, 200]), np.array([115, 216]), 100.0) == pytest.approx(1 / 3)  # 15 in, 16 out


def test_band_power_share_edges_and_batches():
    fs, t = 125.0, np.arange(1250) / 125.0
    for f in (0.5, 4.0):  # the band's edges count
        assert signals.band_power_share(np.sin(2 * np.pi * f * t), fs, (0.5, 4.0), (0.5, 10.0)) == pytest.approx(1.0)
    assert signals.band_power_share(np.sin(2 * np.pi * 10.0 * t), fs, (0.5, 4.0), (0.5, 10.0)) == pytest.approx(0.0)
    assert signals.band_power_share(1e-4 * np.sin(2 * np.pi * 2 * t), fs, (0.5, 4.0), (0.5, 10.0)) == pytest.approx(1.0)
    rows = np.stack([np.sin(2 * np.pi * 2 * t), np.sin(2 * np.pi * 2 * t) + np.sin(2 * np.pi * 7 * t) + 3.0])
    np.testing.assert_allclose(signals.band_power_share(rows, fs, (0.5, 4.0), (0.5, 10.0)), [1.0, 0.5], atol=1e-9)
