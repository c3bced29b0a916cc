"""Recordings -> quality-checked windows, in memory: resample, band-pass, cut, check, z-score.

Pure numpy (no Ray, no files): :func:`make_windows` serves build-windows and predict for every
recording of a source; :func:`record_signal` prepares a labelled 10 s record (a task's window) the
same way, and :func:`record_quality` checks it without rejecting it (its label may be the quality
itself). Signal processing
itself lives in :mod:`biofm.signals`.
"""

from __future__ import annotations

import time

import numpy as np

from biofm import signals
from biofm.config import ChannelSpec, WindowsConfig
from biofm.errors import CaseSkipped


def make_windows(tracks: dict[str, tuple[np.ndarray, float, str]], channels: dict[str, ChannelSpec],
                 cfg: WindowsConfig, timings: dict, examples: dict | None = None) -> tuple[dict, list[str]]:
    """Cut quality-checked windows from native-rate tracks (as :func:`read_tracks` returns).

    Returns ``(columns, reasons)``: the kept windows' columns (``window_idx`` [N], ``start_s`` [N]
    in seconds, ``signal`` [N, C, T] float32 z-scored, per-channel quality ``[N]``) and, for every
    window cut, why it was rejected (``"PPG:clipped"``...; ``""`` where kept: see
    :func:`check_windows`). ``timings`` gains the seconds spent per stage; ``examples``, where
    given, the first rejected window of each reason not in it yet (``reason -> (start_s, [C, T]
    float32 z-scored)``), for the data report.
    """
    fs, length = cfg.sample_rate_hz, cfg.window_samples
    duration = min(len(x) / rate for x, rate, _ in tracks.values())
    n_out = int(np.floor(duration * fs + 1e-9))
    if n_out < length:
        raise CaseSkipped("too_short", f"recording lasts {duration:.1f} s, shorter than one "
                          f"{cfg.window_s:g} s window")
    starts = signals.window_starts(n_out, length, int(round(cfg.stride_s * fs)))
    starts_s = starts / fs

    t0 = time.perf_counter()
    filled = {}
    for name, (raw, rate, _) in tracks.items():
        x, _ = signals.fill_gaps(raw)
        filled[name] = signals.resample(x, rate, fs)[:n_out]
    t1 = time.perf_counter()
    filtered = {
        name: signals.bandpass(filled[name], fs, spec.band_hz, spec.filter_order, spec.stopband_db)
        for name, spec in channels.items()
    }
    t2 = time.perf_counter()

    windows = np.stack([signals.cut_windows(filtered[n], starts, length) for n in channels], axis=1)
    keep, reasons, quality = check_windows(windows, {n: tracks[n][:2] for n in channels}, starts_s, channels, cfg)
    t3 = time.perf_counter()
    timings["resample"] = timings.get("resample", 0.0) + t1 - t0
    timings["filter"] = timings.get("filter", 0.0) + t2 - t1
    timings["quality"] = timings.get("quality", 0.0) + t3 - t2

    if examples is not None:
        for i in np.flatnonzero(~keep):
            if reasons[i] not in examples:
                examples[reasons[i]] = (float(starts_s[i]), signals.zscore(windows[i]).astype(np.float32))
    columns = {
        "window_idx": np.flatnonzero(keep).astype(np.int32),
        "start_s": starts_s[keep].astype(np.float64),
        "signal": signals.zscore(windows[keep]).astype(np.float32),
        **{k: v[keep] for k, v in quality.items()},
    }
    return columns, reasons.tolist()


def check_windows(windows: np.ndarray, raw: dict[str, tuple[np.ndarray, float]], starts_s: np.ndarray,
                  channels: dict[str, ChannelSpec], cfg: WindowsConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """The quality checks of band-passed windows ``[N, C, T]`` (at ``cfg.sample_rate_hz``) cut at
    ``starts_s`` (seconds) from the recordings ``raw`` (name -> ``(x [n], fs Hz)``, native rate, NaN
    where missing).

    Per channel, in this order, the first failure is a window's reason (``"PPG:flat"``): missing,
    flat, clipped (:func:`signals.raw_quality`); then, for channels with a beat detector,
    too_few_beats, implausible_hr, low_template_match and, for PPG, low_pulse_band_power, for
    ECG, detectors_disagree (:func:`signals.beat_quality`). A rejected window is not checked
    further. Returns ``keep`` ``[N]`` bool, ``reasons`` ``[N]`` (``""`` where kept) and the
    indices as columns ``<ch>_<index>`` ``[N]``.
    """
    n = len(windows)
    keep = np.ones(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    quality = {}

    def reject(mask, reason):
        new = mask & keep
        reasons[new] = reason
        keep[new] = False

    for c, (name, spec) in enumerate(channels.items()):
        x, rate = raw[name]
        q = signals.raw_quality(x, rate, starts_s, cfg.window_s)
        reject(q["nan_fraction"] > cfg.max_nan_fraction, f"{name}:missing")
        reject(q["flat_fraction"] > cfg.max_flat_fraction, f"{name}:flat")
        reject(windows[:, c].std(axis=-1) < 1e-8, f"{name}:flat")
        reject(q["clip_fraction"] > cfg.max_clip_fraction, f"{name}:clipped")
        sqi = {k: np.full(n, np.nan, dtype=np.float32) for k in signals.SQI_NAMES.get(spec.quality, ("hr_bpm",))}
        sqi["beats"] = np.zeros(n, dtype=np.int16)
        if spec.quality != "none":
            checked = np.flatnonzero(keep)
            for k, v in signals.beat_quality(windows[checked, c], cfg.sample_rate_hz, spec.quality, spec.band_hz).items():
                sqi[k][checked] = v
            lo, hi = cfg.hr_bpm
            reject(sqi["beats"] < cfg.min_beats, f"{name}:too_few_beats")
            reject(~((sqi["hr_bpm"] >= lo) & (sqi["hr_bpm"] <= hi)), f"{name}:implausible_hr")
            if spec.quality == "ppg":
                reject(~(sqi["template_match"] >= cfg.ppg_min_template_match), f"{name}:low_template_match")
                reject(~(sqi["pulse_band_power"] >= cfg.ppg_min_pulse_band_power), f"{name}:low_pulse_band_power")
            else:
                reject(~(sqi["template_match"] >= cfg.ecg_min_template_match), f"{name}:low_template_match")
                reject(~(sqi["beat_agreement"] >= cfg.ecg_min_beat_agreement), f"{name}:detectors_disagree")
        quality.update({f"{name.lower()}_{k}": v for k, v in (q | sqi).items()})
    return keep, reasons, quality


def record_signal(record: dict[str, tuple[np.ndarray, float]], channels: dict[str, ChannelSpec],
                  cfg: WindowsConfig) -> tuple[np.ndarray, np.ndarray]:
    """One record's channels (name -> ``(x [n], fs Hz)``) -> ``signal [C, T]`` float32 and
    ``present [C]`` bool, in ``channels``' order. Each present channel is gap-filled, resampled
    to ``cfg.sample_rate_hz``, cut to its first ``cfg.window_s`` seconds, band-passed and
    z-scored, as VitalDB windows are; absent (or all-NaN non-PPG) channels are zeros."""
    filtered, present = _record_filtered(record, channels, cfg)
    return signals.zscore(filtered).astype(np.float32), present  # absent rows stay zeros


def record_quality(record: dict[str, tuple[np.ndarray, float]], channels: dict[str, ChannelSpec],
                   cfg: WindowsConfig) -> tuple[dict[str, float], str]:
    """The quality checks of :func:`check_windows` on a labelled record's window (as
    :func:`record_signal` prepares it), without rejecting it: its label may be the quality
    itself. Returns the indices of the present channels (``<ch>_<index>`` -> value) and the
    first failure (``"PPG:low_template_match"``; ``""`` where every check passes)."""
    filtered, present = _record_filtered(record, channels, cfg)
    names = [n for n, p in zip(channels, present) if p]
    raw = {n: (record[n][0][:int(np.ceil(cfg.window_s * record[n][1]))], record[n][1]) for n in names}
    _, reasons, quality = check_windows(filtered[present][None], raw, np.zeros(1), {n: channels[n] for n in names}, cfg)
    return {k: float(v[0]) for k, v in quality.items()}, str(reasons[0])


def _record_filtered(record: dict[str, tuple[np.ndarray, float]], channels: dict[str, ChannelSpec],
                     cfg: WindowsConfig) -> tuple[np.ndarray, np.ndarray]:
    """:func:`record_signal` before the z-score: band-passed ``[C, T]`` float64 and ``present [C]``."""
    fs, length = cfg.sample_rate_hz, cfg.window_samples
    signal = np.zeros((len(channels), length))
    present = np.zeros(len(channels), dtype=bool)
    for c, (name, spec) in enumerate(channels.items()):
        if name not in record:
            continue
        raw, rate = record[name]
        if len(raw) / rate * fs + 1e-9 < length:
            raise CaseSkipped("too_short", f"{name} lasts {len(raw) / rate:.2f} s, shorter than {cfg.window_s:g} s")
        try:
            x, _ = signals.fill_gaps(raw)
        except ValueError:
            if name == "PPG":
                raise CaseSkipped("PPG:missing", "the PPG trace has no finite sample") from None
            continue
        signal[c] = signals.bandpass(signals.resample(x, rate, fs)[:length], fs, spec.band_hz, spec.filter_order,
                                     spec.stopband_db)
        present[c] = True
    return signal, present
