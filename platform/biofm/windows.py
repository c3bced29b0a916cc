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
    windows, starts_s = filtered_windows(tracks, channels, cfg, timings)
    t0 = time.perf_counter()
    keep, reasons, quality = check_windows(windows, {n: tracks[n][:2] for n in channels}, starts_s, channels, cfg)
    timings["quality"] = timings.get("quality", 0.0) + time.perf_counter() - t0

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


def filtered_windows(tracks: dict[str, tuple[np.ndarray, float, str]], channels: dict[str, ChannelSpec],
                     cfg: WindowsConfig, timings: dict) -> tuple[np.ndarray, np.ndarray]:
    """Every whole window of ``tracks`` (name -> ``(x [n], fs Hz, name in the file)``, NaN in gaps):
    gap-filled, resampled to ``cfg.sample_rate_hz`` and band-passed per channel, ``[N, C, T]``
    float64 in ``channels``' order, and their starts ``[N]`` in seconds. A recording shorter than
    one window is ``too_short``. ``timings`` gains the seconds spent resampling and filtering."""
    fs, length = cfg.sample_rate_hz, cfg.window_samples
    duration = min(len(x) / rate for x, rate, _ in tracks.values())
    n_out = int(np.floor(duration * fs + 1e-9))
    if n_out < length:
        raise CaseSkipped("too_short", f"recording lasts {duration:.1f} s, shorter than one "
                          f"{cfg.window_s:g} s window")
    starts = signals.window_starts(n_out, length, int(round(cfg.stride_s * fs)))

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
    timings["resample"] = timings.get("resample", 0.0) + t1 - t0
    timings["filter"] = timings.get("filter", 0.0) + time.perf_counter() - t1
    return np.stack([signals.cut_windows(filtered[n], starts, length) for n in channels], axis=1), starts / fs


def check_windows(windows: np.ndarray, raw: dict[str, tuple[np.ndarray, float]], starts_s: np.ndarray,
                  channels: dict[str, ChannelSpec], cfg: WindowsConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """The quality checks of band-passed windows ``[N, C, T]`` (at ``cfg.sample_rate_hz``) cut at
    ``starts_s`` (seconds) from the recordings ``raw`` (name -> ``(x [n], fs Hz)``, native rate, NaN
    where missing): :func:`window_quality`, then :func:`judge`. Returns ``keep`` ``[N]`` bool,
    ``reasons`` ``[N]`` (``""`` where kept) and the indices as columns ``<ch>_<index>`` ``[N]``.
    """
    quality = window_quality(windows, raw, starts_s, channels, cfg)
    reasons = judge(quality, channels, cfg)
    return reasons == "", reasons, quality


def window_quality(windows: np.ndarray, raw: dict[str, tuple[np.ndarray, float]], starts_s: np.ndarray,
                   channels: dict[str, ChannelSpec], cfg: WindowsConfig) -> dict[str, np.ndarray]:
    """Every quality index of every window and channel, as columns ``<ch>_<index>`` ``[N]``: the
    raw samples' (:func:`signals.raw_quality`; a band-passed window that is constant counts as all
    flat) and, for channels with a beat detector, :func:`signals.beat_quality`'s (float32; the
    beat count int16). Channels without one get ``beats`` 0 and ``hr_bpm`` NaN."""
    quality = {}
    for c, (name, spec) in enumerate(channels.items()):
        x, rate = raw[name]
        q = signals.raw_quality(x, rate, starts_s, cfg.window_s)
        q["flat_fraction"][windows[:, c].std(axis=-1) < 1e-8] = 1.0
        if spec.quality == "none":
            sqi = {"beats": np.zeros(len(windows)), "hr_bpm": np.full(len(windows), np.nan)}
        else:
            sqi = signals.beat_quality(windows[:, c], cfg.sample_rate_hz, spec.quality, spec.band_hz,
                                       cfg.signal_loss_ratio, cfg.ppg_pulse_band_hz)
        sqi = {k: v.astype(np.int16 if k == "beats" else np.float32) for k, v in sqi.items()}
        quality.update({f"{name.lower()}_{k}": v for k, v in (q | sqi).items()})
    return quality


def judge(quality: dict[str, np.ndarray], channels: dict[str, ChannelSpec], cfg: WindowsConfig) -> np.ndarray:
    """Why each window fails the checks of ``cfg`` (``"PPG:flat"``), ``""`` where it passes, ``[N]``,
    from the columns of :func:`window_quality`. Per channel, in this order, the first failure
    counts: missing, flat, clipped; then, for channels with a beat detector, too_few_beats,
    implausible_hr, signal_loss (the pulse below ``signal_loss_ratio`` of its usual amplitude
    for more than ``max_signal_loss_s`` seconds), low_template_match and, for PPG,
    low_pulse_band_power, for ECG, detectors_disagree. Channels are checked in their order."""
    n = len(next(iter(quality.values())))
    reasons = np.full(n, "", dtype=object)
    for name, spec in channels.items():
        q = {k.removeprefix(f"{name.lower()}_"): v for k, v in quality.items() if k.startswith(f"{name.lower()}_")}
        rules = [("missing", q["nan_fraction"] > cfg.max_nan_fraction),
                 ("flat", q["flat_fraction"] > cfg.max_flat_fraction),
                 ("clipped", q["clip_fraction"] > cfg.max_clip_fraction)]
        if spec.quality != "none":
            lo, hi = cfg.hr_bpm
            min_match = cfg.ppg_min_template_match if spec.quality == "ppg" else cfg.ecg_min_template_match
            rules += [("too_few_beats", q["beats"] < cfg.min_beats),
                      ("implausible_hr", ~((q["hr_bpm"] >= lo) & (q["hr_bpm"] <= hi))),
                      ("signal_loss", q["signal_loss_s"] > cfg.max_signal_loss_s),
                      ("low_template_match", ~(q["template_match"] >= min_match))]
            if spec.quality == "ppg":
                rules.append(("low_pulse_band_power", ~(q["pulse_band_power"] >= cfg.ppg_min_pulse_band_power)))
            else:
                rules.append(("detectors_disagree", ~(q["beat_agreement"] >= cfg.ecg_min_beat_agreement)))
        for reason, failed in rules:
            reasons[failed & (reasons == "")] = f"{name}:{reason}"
    return reasons


def covered_s(segments_s: np.ndarray, starts_s: np.ndarray, window_s: float) -> np.ndarray:
    """Seconds of each window (starting at ``starts_s`` ``[N]``, ``window_s`` long) that labelled
    segments ``[K, 2]`` (start, end in seconds, on the recording's clock) cover, ``[N]``; segments
    are assumed not to overlap one another."""
    ends = np.asarray(starts_s)[:, None] + window_s
    overlap = np.minimum(segments_s[None, :, 1], ends) - np.maximum(segments_s[None, :, 0], np.asarray(starts_s)[:, None])
    return np.clip(overlap, 0.0, None).sum(axis=1)


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
