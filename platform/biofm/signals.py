"""Signal processing: resampling, Chebyshev II band-pass, windowing, beats, window quality.

Window quality has two parts: :func:`raw_quality` (missing, stuck and saturated samples of the
recording) and :func:`beat_quality` (signal-quality indices that tell a pulse from noise).

Pure numpy/scipy (no Ray, no torch). Signals are 1-D float arrays at a stated rate in Hz;
windows are ``[N, T]`` arrays, ``T`` samples each.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import signal as sps


def fill_gaps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linearly interpolate across NaNs (edges take the nearest valid value).

    Returns ``(filled, missing)``: float64 ``[T]`` and the bool mask ``[T]`` of the NaNs.
    All-NaN input raises ``ValueError``.
    """
    x = np.asarray(x, dtype=np.float64)
    missing = ~np.isfinite(x)
    if missing.all():
        raise ValueError("signal has no finite samples")
    if not missing.any():
        return x, missing
    idx = np.arange(x.size)
    filled = x.copy()
    filled[missing] = np.interp(idx[missing], idx[~missing], x[~missing])
    return filled, missing


def resample(x: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Resample ``x`` from ``fs_in`` to ``fs_out`` Hz by polyphase filtering (anti-aliased).

    Output length is ``ceil(len(x) * fs_out / fs_in)``. ``x`` must be finite (see :func:`fill_gaps`).
    The edges are extended along the signal's linear trend, not with zeros: zero padding turns a
    DC offset (a PPG at -254 units) into a spike at each end.
    """
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    if ratio == 1:
        return np.asarray(x, dtype=np.float64)
    return sps.resample_poly(x, ratio.numerator, ratio.denominator, padtype="line")


PASS_BAND = "pass band, -3 dB"  # what band_hz means; the data spec records it (earlier biofm gave scipy stop-band edges)


def cheby2_stopband_edges(fs: float, band_hz: tuple[float, float], order: int, stopband_db: float) -> tuple[float, float]:
    """The stop-band edges (Hz) of the order-``order`` Chebyshev II band-pass whose zero-phase
    (forward-backward) gain is -3 dB at ``band_hz``.

    ``scipy.signal.cheby2`` takes the stop-band edges, where the gain first reaches
    ``-stopband_db``, not the pass band: given ``(0.5, 10)`` at 125 Hz its zero-phase gain is
    -27 dB at 0.7 Hz (the fundamental of 42 bpm) and -24 dB at 7 Hz. The pass band is placed
    exactly: in the analog prototype (stop band at 1 rad/s), the one-pass power gain
    ``1 / (1 + 1 / (eps^2 T_N(1/w)^2))`` equals ``1/sqrt(2)`` at ``w_p`` below; the band-pass
    transform maps ``w`` to frequencies whose product is the squared centre and whose difference
    is ``w`` times the bandwidth, on the bilinear transform's pre-warped axis.
    """
    eps = 1.0 / np.sqrt(10.0 ** (stopband_db / 10.0) - 1.0)
    w_p = 1.0 / np.cosh(np.arccosh(1.0 / (eps * np.sqrt(np.sqrt(2.0) - 1.0))) / order)
    p1, p2 = (2 * fs * np.tan(np.pi * f / fs) for f in band_hz)        # pre-warped, rad/s
    centre_sq, width = p1 * p2, (p2 - p1) / w_p
    s1 = (np.sqrt(width ** 2 + 4 * centre_sq) - width) / 2
    return tuple(float(fs / np.pi * np.arctan(s / (2 * fs))) for s in (s1, s1 + width))


@lru_cache(maxsize=64)
def _cheby2_sos(fs: float, low: float, high: float, order: int, stopband_db: float) -> np.ndarray:
    if high >= fs / 2:
        raise ValueError(f"band-pass high edge {high} Hz must be below Nyquist ({fs / 2} Hz)")
    edges = cheby2_stopband_edges(fs, (low, high), order, stopband_db)  # below Nyquist: the bilinear map keeps it there
    return sps.cheby2(order, stopband_db, edges, btype="bandpass", output="sos", fs=fs)


def bandpass(x: np.ndarray, fs: float, band_hz: tuple[float, float], order: int = 4,
             stopband_db: float = 40.0) -> np.ndarray:
    """Zero-phase Chebyshev II band-pass of ``x`` (``[..., T]`` at ``fs`` Hz) along the last axis:
    -3 dB at the edges of ``band_hz`` (Hz), flat between them, ``-2 x stopband_db`` dB or less
    beyond the stop-band edges of :func:`cheby2_stopband_edges`."""
    sos = _cheby2_sos(float(fs), float(band_hz[0]), float(band_hz[1]), int(order), float(stopband_db))
    return sps.sosfiltfilt(sos, x, axis=-1)


def window_starts(n_samples: int, window: int, stride: int) -> np.ndarray:
    """Start indices of every full window of ``window`` samples, ``stride`` apart."""
    if n_samples < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_samples - window + 1, stride, dtype=np.int64)


def cut_windows(x: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """Windows ``[N, window]`` of ``x`` starting at ``starts`` (a copy)."""
    return x[starts[:, None] + np.arange(window)[None, :]]


FLAT_RUN_S = 1.0  # equal samples for this long is a stuck signal (an 8-bit ECG's baseline stays put up to ~0.8 s)


def raw_quality(raw: np.ndarray, fs: float, starts_s: np.ndarray, window_s: float) -> dict:
    """Per-window quality of a raw native-rate signal (NaNs mark missing samples).

    For each window starting at ``starts_s`` (seconds): ``nan_fraction`` (missing samples),
    ``flat_fraction`` (samples equal to their predecessor in a run of at least
    :data:`FLAT_RUN_S`: a stuck signal, not the repeats of a coarse ADC, such as MIMIC's 8-bit
    PLETH, where 44% of samples repeat their predecessor, or MIMIC-II's 8-bit ECG, whose
    isoelectric line holds one value for up to 0.8 s between beats) and
    ``clip_fraction`` (samples pinned at the window's minimum or maximum: saturation).
    Returns a dict of float32 arrays ``[N]``; a window with no valid sample scores 1 on each.
    """
    length = int(round(window_s * fs))
    if length > raw.size:
        raise ValueError(f"a {window_s:g} s window is longer than the signal ({raw.size} samples at {fs:g} Hz)")
    # Rounding a start to the native grid can overshoot the end by a sample: clamp it.
    starts = np.minimum(np.round(np.asarray(starts_s) * fs).astype(np.int64), raw.size - length)
    segs = cut_windows(raw, starts, length)                       # [N, L]
    missing = ~np.isfinite(segs)
    n_valid = length - missing.sum(axis=1)
    repeat = np.zeros(raw.size, dtype=bool)
    repeat[1:] = raw[1:] == raw[:-1]
    run = np.cumsum(~repeat)  # a run of equal samples shares one id
    stuck = repeat & (np.bincount(run)[run] >= max(2, round(FLAT_RUN_S * fs)))
    lo = np.where(missing, np.inf, segs).min(axis=1, keepdims=True)
    hi = np.where(missing, -np.inf, segs).max(axis=1, keepdims=True)
    pinned = (segs == lo).sum(axis=1) + (segs == hi).sum(axis=1) - 2
    with np.errstate(invalid="ignore", divide="ignore"):
        flat = (cut_windows(stuck, starts, length) & ~missing).sum(axis=1) / n_valid
        clip = np.where(hi[:, 0] > lo[:, 0], pinned / n_valid, 0.0)
    none_valid = n_valid == 0
    return {
        "nan_fraction": (1 - n_valid / length).astype(np.float32),
        "flat_fraction": np.where(none_valid, 1.0, flat).astype(np.float32),
        "clip_fraction": np.where(none_valid, 1.0, clip).astype(np.float32),
    }


def detect_beats(x: np.ndarray, fs: float, kind: str) -> np.ndarray:
    """Beat positions (sample indices) in a band-passed window ``x`` ``[T]`` at ``fs`` Hz.

    ``kind="ppg"``: systolic peaks: at least half as prominent as the strongest peaks, so
    dicrotic waves do not count.
    ``kind="ecg"``: R peaks, found as peaks of the smoothed squared slope (Pan-Tompkins style),
    so polarity does not matter. Peaks are at least 0.3 s apart (at most 200 beats/min).
    """
    distance = max(1, int(0.3 * fs))
    if kind == "ppg":
        # Dicrotic waves are peaks too; systolic peaks are the most prominent ones.
        peaks, props = sps.find_peaks(x, distance=distance, prominence=1e-12)
        if len(peaks) == 0:
            return peaks
        prominences = props["prominences"]
        return peaks[prominences >= 0.5 * _quantile(prominences, 0.9)]
    if kind == "ecg":
        energy = np.convolve(np.diff(x, prepend=x[0]) ** 2, np.ones(max(1, int(0.08 * fs))), "same")
        peaks, _ = sps.find_peaks(energy, distance=distance, height=0.3 * _quantile(energy, 0.99))
        return peaks
    raise ValueError(f"unknown beat detector {kind!r} (use ppg or ecg)")


def qrs_amplitude_peaks(qrs_band: np.ndarray, fs: float) -> np.ndarray:
    """R peaks found a second way, for :func:`beat_agreement`: peaks of ``|qrs_band|`` (a window
    ``[T]`` band-passed to ``QRS_BAND_HZ``) above 40% of its 99th percentile, at least 0.3 s apart."""
    y = np.abs(qrs_band)
    peaks, _ = sps.find_peaks(y, distance=max(1, int(0.3 * fs)), height=0.4 * _quantile(y, 0.99))
    return peaks


def template_match(x: np.ndarray, beats: np.ndarray) -> float:
    """Mean correlation of each beat with the window's average beat (Orphanidou et al. 2015).

    A beat is the stretch of ``x`` ``[T]`` one median beat interval long centred on its position in
    ``beats`` (sample indices); beats cut by the window's edges are left out. Returns the mean
    Pearson correlation in [-1, 1]; 0.0 with fewer than 2 whole beats (no template to match).
    """
    if len(beats) < 3:
        return 0.0
    half = int(np.median(np.diff(beats))) // 2
    centres = beats[(beats >= half) & (beats + half <= len(x))]
    if len(centres) < 2 or half < 1:
        return 0.0
    segs = cut_windows(x, centres - half, 2 * half)                       # [B, L]
    segs = segs - segs.mean(axis=1, keepdims=True)
    template = segs.mean(axis=0)
    norms = np.linalg.norm(segs, axis=1) * np.linalg.norm(template)
    return float(np.mean(segs @ template / np.maximum(norms, 1e-12)))


def beat_agreement(a: np.ndarray, b: np.ndarray, fs: float, tolerance_s: float = 0.15) -> float:
    """bSQI (Li & Clifford 2008): beats two detectors agree on (within ``tolerance_s`` seconds),
    over the beats either found: ``matched / (len(a) + len(b) - matched)``, in [0, 1]; 0.0 when
    either found none."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    matched = int((np.abs(a[:, None] - b[None, :]).min(axis=1) <= tolerance_s * fs).sum())
    return matched / (len(a) + len(b) - matched)


def band_power_share(x: np.ndarray, fs: float, band_hz, of_hz: tuple[float, float]) -> np.ndarray:
    """Share of the power of ``x`` ``[..., T]`` within ``of_hz`` (Hz, edges included) that lies in
    ``band_hz`` (periodogram), ``[...]``; 0 where there is no power. An edge of ``band_hz`` may be
    an array ``[...]``, one edge per row. The bands start above 0 Hz, so a DC offset does not
    count."""
    power = np.abs(np.fft.rfft(x, axis=-1)) ** 2
    f = np.fft.rfftfreq(x.shape[-1], 1 / fs)
    total = power[..., (f >= of_hz[0]) & (f <= of_hz[1])].sum(axis=-1)
    lo, hi = (np.asarray(edge, dtype=np.float64)[..., None] for edge in band_hz)
    inside = (power * ((f >= lo) & (f <= hi) & (f >= of_hz[0]) & (f <= of_hz[1]))).sum(axis=-1)
    return np.divide(inside, total, out=np.zeros_like(total), where=total > 0)


def _quantile(x: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``x`` by its nearest rank (np.percentile costs ~20x more per call)."""
    k = int(round(q * (len(x) - 1)))
    return float(np.partition(x, k)[k])


PULSE_HARMONICS = 2   # at fast rates the pulse band reaches halfway from the 2nd to the 3rd harmonic
QRS_BAND_HZ = (8.0, 20.0)
SQI_NAMES = {"ppg": ("beats", "hr_bpm", "signal_loss_s", "template_match", "pulse_band_power"),
             "ecg": ("beats", "hr_bpm", "signal_loss_s", "template_match", "beat_agreement")}


def pulse_band_edge_hz(hr_bpm: np.ndarray, edge_hz: float) -> np.ndarray:
    """The upper edge (Hz) of the pulse band at heart rates ``hr_bpm`` ``[...]``: ``edge_hz``, or
    ``PULSE_HARMONICS + 0.5`` times the beat rate where that is higher, so the fundamental and
    its first harmonic (which carries the dicrotic notch) count as pulse at any rate. NaN rates
    (no beats) get ``edge_hz``."""
    return np.fmax(edge_hz, (PULSE_HARMONICS + 0.5) * np.asarray(hr_bpm, dtype=np.float64) / 60.0)


LOSS_SPAN_BEATS = 1.2  # a span of 1.2 beat intervals holds an upstroke (a QRS) wherever it starts


def signal_loss_s(x: np.ndarray, beats: np.ndarray, fs: float, ratio: float) -> float:
    """The longest stretch of a window ``x`` ``[T]`` (band-passed, ``fs`` Hz) where the pulse has
    stopped or fallen below ``ratio`` of its usual amplitude, in seconds; 0.0 where there is none.

    The amplitude at each sample is the peak-to-peak of the span of ``LOSS_SPAN_BEATS`` median beat
    intervals (``beats``: sample indices; 1 s with fewer than 2 beats) starting there, which holds
    an upstroke wherever it starts, so the measure does not depend on the heart rate; "usual" is
    the 90th percentile of those amplitudes. A run of low spans covers from its first span's start
    to its last span's end.
    """
    from scipy.ndimage import maximum_filter1d, minimum_filter1d

    interval = np.median(np.diff(beats)) if len(beats) >= 2 else fs
    span = int(min(max(round(LOSS_SPAN_BEATS * interval), 2), len(x)))
    origin = -(span // 2)  # the filters' window [i, i + span), not centred on i
    amplitude = (maximum_filter1d(x, span, origin=origin) - minimum_filter1d(x, span, origin=origin))[:len(x) - span + 1]
    low = np.concatenate([[False], amplitude < ratio * _quantile(amplitude, 0.9), [False]])
    edges = np.flatnonzero(np.diff(low.astype(np.int8)))
    if edges.size == 0:
        return 0.0
    runs = edges[1::2] - edges[::2]               # consecutive low spans
    return float((runs.max() - 1 + span) / fs)


def beat_quality(windows: np.ndarray, fs: float, kind: str, band_hz: tuple[float, float], loss_ratio: float,
                 pulse_band_hz: float) -> dict[str, np.ndarray]:
    """Signal-quality indices ``SQI_NAMES[kind]`` of band-passed windows ``[N, T]`` at ``fs`` Hz,
    each ``[N]``.

    ``beats`` and ``hr_bpm`` from :func:`detect_beats`; ``signal_loss_s`` (:func:`signal_loss_s`
    below ``loss_ratio`` of the usual amplitude); ``template_match`` (Orphanidou et al. 2015).
    PPG: ``pulse_band_power``, the share of the power in ``band_hz`` (the channel's filter band)
    that lies in the pulse band, from its low edge to :func:`pulse_band_edge_hz` (``pulse_band_hz``
    Hz, higher above 168 bpm): a pulse puts nearly all of its power there at any rate and shape,
    noise spreads over the band. ECG: ``beat_agreement`` of two QRS detectors (bSQI, Li &
    Clifford 2008): :func:`detect_beats` and :func:`qrs_amplitude_peaks`.
    """
    n = len(windows)
    sqi = {k: np.zeros(n) for k in SQI_NAMES[kind]}
    qrs = bandpass(windows, fs, QRS_BAND_HZ) if kind == "ecg" else None
    for i, x in enumerate(windows):
        beats = detect_beats(x, fs, kind)
        sqi["beats"][i], sqi["hr_bpm"][i] = len(beats), heart_rate_bpm(beats, fs)
        sqi["signal_loss_s"][i] = signal_loss_s(x, beats, fs, loss_ratio)
        sqi["template_match"][i] = template_match(x, beats)
        if qrs is not None:
            sqi["beat_agreement"][i] = beat_agreement(beats, qrs_amplitude_peaks(qrs[i], fs), fs)
    if kind == "ppg":
        edge = pulse_band_edge_hz(sqi["hr_bpm"], pulse_band_hz)
        sqi["pulse_band_power"] = band_power_share(windows, fs, (band_hz[0], edge), band_hz)
    return sqi


def heart_rate_bpm(beats: np.ndarray, fs: float) -> float:
    """Heart rate in beats/min from the median beat interval; NaN with fewer than 2 beats."""
    if len(beats) < 2:
        return float("nan")
    return float(60.0 * fs / np.median(np.diff(beats)))


def zscore(windows: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Standardise each window along its last axis: zero mean, unit variance."""
    mean = windows.mean(axis=-1, keepdims=True)
    std = windows.std(axis=-1, keepdims=True)
    return (windows - mean) / np.maximum(std, eps)


FEATURE_BANDS_HZ = ((0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0))
HANDCRAFTED = ("hr_bpm", "ibi_sd_ms", "rmssd_ms", "ibi_range_ms", "beats", "template_match", "skewness", "kurtosis",
               *(f"power_{lo:g}-{hi:g}_hz" for lo, hi in FEATURE_BANDS_HZ))


def handcrafted_features(windows: np.ndarray, fs: float, band_hz: tuple[float, float] = (0.5, 10.0),
                         kind: str = "ppg") -> np.ndarray:
    """The benchmark's hand-crafted features of band-passed PPG (or, ``kind="ecg"``, ECG) windows
    ``[N, T]`` at ``fs`` Hz, ``[N, len(HANDCRAFTED)]`` (NaN where undefined): beat rate (bpm) and
    beat-interval variability (SD, RMSSD and range of the intervals, ms) from :func:`detect_beats`, the beats
    found, :func:`template_match`, skewness (Elgendi 2016's best single PPG quality index) and
    kurtosis, and the share of the ``band_hz`` power in each of ``FEATURE_BANDS_HZ`` (each
    ``[lo, hi)`` Hz)."""
    from scipy import stats

    out = np.full((len(windows), len(HANDCRAFTED)), np.nan)
    for i, x in enumerate(windows):
        beats = detect_beats(x, fs, kind)
        ibi = np.diff(beats) / fs * 1000.0
        out[i, 0] = heart_rate_bpm(beats, fs)
        if len(ibi) >= 2:
            out[i, 1:4] = ibi.std(), np.sqrt(np.mean(np.diff(ibi) ** 2)), np.ptp(ibi)
        out[i, 4], out[i, 5] = len(beats), template_match(x, beats)
    out[:, 6], out[:, 7] = stats.skew(windows, axis=-1), stats.kurtosis(windows, axis=-1)
    for k, (lo, hi) in enumerate(FEATURE_BANDS_HZ):  # [lo, hi): a harmonic on an edge counts once
        out[:, 8 + k] = band_power_share(windows, fs, (lo, hi - 1e-9), band_hz)
    return out
