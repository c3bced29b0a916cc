"""Where a task's labelled windows come from: for each source (``Task.source``), the recordings to
read and, for one recording, its labelled records, each prepared as every task's are
(:func:`biofm.windows.record_signal`, quality checked by :func:`biofm.windows.record_quality`,
never dropped: the label may be the quality itself).

A reader is a pair: ``items(raw_dir, task, options) -> (recordings, skipped, extra)``, where
``skipped`` maps the recordings dropped before reading to their outcome and ``extra`` is passed on;
and ``windows(item, task, raw_dir, channels, cfg, extra) -> (rows, windows skipped by reason)``.
``options``: ``ppg_signal`` (which PPG signal of a recording that has several), ``fit`` (how
PPG-BP's 2.1 s segments become a window), ``rate_hz`` (CSV files without a time column).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from biofm.config import ChannelSpec, WindowsConfig
from biofm.errors import CaseSkipped
from biofm.windows import record_quality, record_signal


def _window(record: dict, channels: dict[str, ChannelSpec], cfg: WindowsConfig) -> dict:
    """One labelled record (name -> ``(x [n], fs Hz)``) -> ``signal [C, T]``, ``present [C]``, its
    quality columns and reason."""
    signal, present = record_signal(record, channels, cfg)
    quality, reason = record_quality(record, channels, cfg)
    return {"signal": signal, "present": present, "quality": quality, "quality_reason": reason}


def _cut(tracks: dict, start_s: float, window_s: float) -> dict:
    """The ``window_s`` seconds of ``tracks`` (name -> ``(x, fs, ...)``) from ``start_s`` on, as a record."""
    return {n: (t[0][int(round(start_s * t[1])):int(round(start_s * t[1])) + int(np.ceil(window_s * t[1]))], t[1])
            for n, t in tracks.items()}


def _rows(item: str, task, records, channels, cfg) -> tuple[list[dict], Counter]:
    """``records``: ``(window_idx, start_s, subject, value, record)``; each prepared, or counted by
    the reason it could not be."""
    out, skipped = [], Counter()
    for idx, start_s, subject, value, record in records:
        if task.kind == "regression" and not np.isfinite(value):
            skipped["no_target"] += 1
            continue
        try:
            w = _window(record, channels, cfg)
        except CaseSkipped as e:
            skipped[e.code] += 1
            continue
        out.append({"case_id": item, "window_idx": idx, "start_s": float(start_s), "subject_id": subject,
                    task.column: value, **w})
    return out, skipped


# BUT-PPG -------------------------------------------------------------------------------------------

def _butppg_items(raw_dir: Path, task, options: dict):
    from biofm.sources.butppg import read_annotations, read_records, read_subjects

    items, labels, subjects = read_records(raw_dir), read_annotations(raw_dir), read_subjects(raw_dir)
    skipped = {}
    for rid in items:
        if rid not in labels:
            skipped[rid] = {"status": "skipped", "code": "no_annotation", "reason": "no quality label in quality-hr-ann.csv"}
        elif rid not in subjects:
            skipped[rid] = {"status": "skipped", "code": "no_subject_info", "reason": "not listed in subject-info.csv"}
    values = {r: (a.ref_hr if task.kind == "regression" else a.label) for r, a in labels.items()}
    return items, skipped, {"ppg_signal": options.get("ppg_signal", 0), "values": values}


def _butppg_windows(item, task, raw_dir, channels, cfg, extra):
    from biofm.sources.butppg import read_record, subject_of

    record = read_record(raw_dir, item, extra["ppg_signal"])
    return _rows(item, task, [(0, 0.0, subject_of(item), extra["values"][item], record)], channels, cfg)


# the PPG arrhythmia set ----------------------------------------------------------------------------

def _arrhythmia_items(raw_dir: Path, task, options: dict):
    from biofm.sources.arrhythmia import patients

    return patients(raw_dir), {}, {}


def _arrhythmia_windows(item, task, raw_dir, channels, cfg, extra):
    from biofm.sources.arrhythmia import RATE_HZ, RHYTHMS, SEGMENT_S, read_patient

    segments, rhythms = read_patient(raw_dir, item)
    inside = (rhythms >= 0) & (rhythms < len(RHYTHMS))
    labels = (rhythms == RHYTHMS.index("AF")).astype(int) if task.kind == "binary" else rhythms
    rows, skipped = _rows(item, task, [(i, i * SEGMENT_S, item, int(labels[i]), {"PPG": (x, RATE_HZ)})
                                       for i, x in enumerate(segments) if inside[i]], channels, cfg)
    skipped["label_outside_classes"] += int((~inside).sum())
    return rows, +skipped


# PPG-BP --------------------------------------------------------------------------------------------

def _ppgbp_items(raw_dir: Path, task, options: dict):
    from biofm.sources.ppgbp import DEFAULT_FIT, FITS, subjects

    fit = options.get("fit") or DEFAULT_FIT
    if fit not in FITS:
        from biofm.errors import ConfigError

        raise ConfigError(f"--fit {fit!r}: PPG-BP's 2.1 s segments become a window by one of {', '.join(FITS)}")
    table = subjects(raw_dir)
    return sorted(table, key=int), {}, {"fit": fit, "subjects": table}


PPGBP_TARGETS = {"ppgbp-sbp": "sbp", "ppgbp-dbp": "dbp"}


def _ppgbp_windows(item, task, raw_dir, channels, cfg, extra):
    """One window per segment (``tile``, ``pad``) or per subject (``concat``): :func:`biofm.sources.ppgbp.fit`."""
    from biofm.sources.ppgbp import HYPERTENSIVE, RATE_HZ, fit, segments

    row = extra["subjects"][item]
    value = int(row["class"] in HYPERTENSIVE) if task.kind == "binary" else row[PPGBP_TARGETS[task.name]]
    records = fit(segments(raw_dir, item), extra["fit"], cfg.window_s)
    return _rows(item, task, [(k, 0.0, item, value, {"PPG": (x, RATE_HZ)}) for k, x in enumerate(records)],
                 channels, cfg)


# TROIKA (IEEE SPC 2015) ----------------------------------------------------------------------------

def _troika_items(raw_dir: Path, task, options: dict):
    from biofm.sources.formats import open_source

    source = open_source(f"array:{raw_dir}")
    return source.ids(), {}, {"source": source, "ppg": ("PPG", "PPG2")[options.get("ppg_signal", 0)]}


def _troika_windows(item, task, raw_dir, channels, cfg, extra):
    """One 10 s record per reference window (8 s, 2 s apart), centred on it; those that would reach
    outside the recording are skipped (``outside_recording``). ECG is read only if asked for."""
    import dataclasses

    from biofm.sources import troika

    wanted = {n: (dataclasses.replace(s, aliases=(extra["ppg"],)) if n == "PPG" else s) for n, s in channels.items()
              if s.tracks or s.aliases}
    tracks = extra["source"].read(item, wanted).pieces[0].tracks
    duration = min(len(x) / fs for x, fs, _ in tracks.values())
    starts, bpm = troika.heart_rate(raw_dir / f"{item}.mat")
    margin = (cfg.window_s - troika.WINDOW_S) / 2
    inside = (starts - margin >= 0) & (starts - margin + cfg.window_s <= duration + 1e-9)
    rows, skipped = _rows(item, task, [(i, s - margin, troika.subject_of(item), float(v), _cut(tracks, s - margin, cfg.window_s))
                                       for i, (s, v) in enumerate(zip(starts, bpm)) if inside[i]], channels, cfg)
    skipped["outside_recording"] += int((~inside).sum())
    return rows, +skipped


# CapnoBase -----------------------------------------------------------------------------------------

def _capnobase_items(raw_dir: Path, task, options: dict):
    from biofm.sources.formats import open_source

    source = open_source(f"array:{raw_dir}")
    return source.ids(), {}, {"source": source}


def _capnobase_windows(item, task, raw_dir, channels, cfg, extra):
    """Every whole window (``stride_s`` apart), its target the CO2 reference's respiratory rate at its
    centre (linear between the reference's points; none outside them: ``no_target``)."""
    from biofm import signals
    from biofm.sources import capnobase

    tracks = extra["source"].read(item, {n: s for n, s in channels.items() if s.tracks or s.aliases}).pieces[0].tracks
    duration = min(len(x) / fs for x, fs, _ in tracks.values())
    t, rr = capnobase.reference(raw_dir / f"{item}.mat", "rr/co2")
    starts = signals.window_starts(int(duration * cfg.sample_rate_hz), cfg.window_samples,
                                   int(round(cfg.stride_s * cfg.sample_rate_hz))) / cfg.sample_rate_hz
    centres = starts + cfg.window_s / 2
    target = np.where((centres >= t[0]) & (centres <= t[-1]), np.interp(centres, t, rr), np.nan)
    return _rows(item, task, [(i, s, item, float(v), _cut(tracks, s, cfg.window_s))
                              for i, (s, v) in enumerate(zip(starts, target))], channels, cfg)


# CinC 2017 -----------------------------------------------------------------------------------------

def _cinc2017_items(raw_dir: Path, task, options: dict):
    from biofm.sources import cinc2017
    from biofm.sources.formats import open_source

    source, labels = open_source(f"array:{raw_dir}"), cinc2017.references(raw_dir)
    present = set(source.ids())
    skipped = {r: {"status": "skipped", "code": "missing_file", "reason": f"no {r}.mat"} for r in labels if r not in present}
    return sorted(labels), skipped, {"source": source, "labels": labels}


def _cinc2017_windows(item, task, raw_dir, channels, cfg, extra):
    """Every whole 10 s window of a record, each labelled with the record's class; a record shorter
    than one window gives none (``too_short``)."""
    from biofm import signals
    from biofm.sources.cinc2017 import CLASSES

    tracks = extra["source"].read(item, {n: s for n, s in channels.items() if s.tracks or s.aliases}).pieces[0].tracks
    duration = min(len(x) / fs for x, fs, _ in tracks.values())
    starts = signals.window_starts(int(duration * cfg.sample_rate_hz + 1e-9), cfg.window_samples,
                                   int(round(cfg.stride_s * cfg.sample_rate_hz))) / cfg.sample_rate_hz
    if not len(starts):
        return [], Counter({"too_short": 1})
    label = CLASSES.index(extra["labels"][item])
    return _rows(item, task, [(i, s, item, label, _cut(tracks, s, cfg.window_s)) for i, s in enumerate(starts)],
                 channels, cfg)


# a label table -------------------------------------------------------------------------------------

def _table_items(raw_dir: Path, task, options: dict):
    from biofm.errors import ConfigError
    from biofm.sources.formats import open_source

    by_recording: dict[str, list[dict]] = {}
    for r in options.get("label_rows") or []:
        by_recording.setdefault(str(r["recording"]), []).append(r)
    if not by_recording:
        raise ConfigError(f"task {task.name}: the label table has no rows")
    return sorted(by_recording), {}, {"rows": by_recording, "source": open_source(str(raw_dir), rate_hz=options.get("rate_hz"))}


def _table_windows(item, task, raw_dir, channels, cfg, extra):
    """A label table's recording, read from any format :func:`~biofm.sources.formats.open_source`
    reads, its rows' windows cut where they start (in the piece that holds them, for WFDB segments)."""
    from biofm.sources.formats import FORMATS

    rid = Path(item).stem if Path(item).suffix.lower() in {x for v in FORMATS.values() for x in v} else item
    pieces = extra["source"].read(rid, {n: s for n, s in channels.items() if s.tracks or s.aliases}).pieces

    def at(start_s: float) -> tuple[dict, float]:
        """The tracks of the piece that holds ``start_s``, and its offset in seconds."""
        for p in pieces:
            if p.tracks and p.start_s <= start_s < p.start_s + max(len(x) / rate for x, rate, _ in p.tracks.values()):
                return p.tracks, p.start_s
        raise CaseSkipped("outside_recording", f"start_s {start_s:g} is not within {rid}'s signals")

    records, skipped = [], Counter()
    for i, row in enumerate(sorted(extra["rows"][item], key=lambda r: r["start_s"])):
        try:
            if row["start_s"] < 0:
                raise CaseSkipped("no_matching_channel", "start_s < 0")
            tracks, offset = at(row["start_s"])
            record = _cut(tracks, max(row["start_s"] - offset, 0.0), cfg.window_s)
            if "PPG" in channels and "PPG" not in record:
                raise CaseSkipped("no_matching_channel", "no PPG signal there")
        except CaseSkipped as e:
            skipped[e.code] += 1
            continue
        records.append((i, row["start_s"], str(row["subject_id"]), row[task.column], record))
    rows, more = _rows(rid, task, records, channels, cfg)
    return rows, skipped + more


READERS = {"butppg": (_butppg_items, _butppg_windows), "arrhythmia": (_arrhythmia_items, _arrhythmia_windows),
           "ppgbp": (_ppgbp_items, _ppgbp_windows), "troika": (_troika_items, _troika_windows),
           "capnobase": (_capnobase_items, _capnobase_windows), "cinc2017": (_cinc2017_items, _cinc2017_windows),
           "table": (_table_items, _table_windows)}
