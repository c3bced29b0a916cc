"""Recordings -> quality-checked 10 s windows -> Parquet, on Ray Data.

:func:`process_case` does one case end to end (read, resample, filter, window, quality, z-score,
write ``<split>/<case_id>.parquet``) and returns its outcome; :func:`build_windows` runs it over
many cases with Ray Data, resumes from earlier runs, and records every outcome in ``<outdir>/manifest.json``
(the layout and data spec: :mod:`biofm.dataset`).

``outdir`` is a local path or a URI (:mod:`biofm.storage`): the tasks write their files directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import resource
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from biofm import storage
from biofm.config import ChannelSpec, WindowsConfig, to_jsonable
from biofm.dataset import code_version, data_spec, load_outcomes, windows_table, write_examples
from biofm.errors import CaseSkipped, ConfigError, NothingProduced
from biofm.ray_connect import ensure_ray
from biofm.report import write_report
from biofm.windows import make_windows

STAGES = ("read", "resample", "filter", "quality", "write")


def reading(source, channels: dict[str, ChannelSpec]) -> dict:
    """What decides how a case is read, beyond the data spec: the source (its folder, format and
    the rate of files that name none) and the names each channel is found by. Part of every
    case's outcome, so a resume never keeps a case read otherwise."""
    return {"source": source.describe(), "rate_hz": getattr(source, "rate_hz", None),
            "names": {n: [*s.tracks, *s.aliases] for n, s in channels.items()}}


def process_case(case_id: str, source, channels: dict[str, ChannelSpec], cfg: WindowsConfig,
                 split_dir: str | Path) -> dict:
    """Read, window, check and write one case. Never raises for a bad case: returns its outcome.

    The outcome (JSON-able) is also written to ``<split_dir>/_cases/<case_id>.json``, after the
    Parquet file, so an interrupted run knows which cases are complete.
    """
    spec = data_spec(channels, cfg)
    timings = {s: 0.0 for s in STAGES}
    outcome = {"case_id": case_id, "config_hash": spec["config_hash"], "reading": reading(source, channels),
               "timings": timings}
    t0 = time.perf_counter()
    try:
        recording = source.read(case_id, channels).require(channels)
        timings["read"] = time.perf_counter() - t0
        examples = {}
        columns, reasons = recording_windows(recording, channels, cfg, timings, examples)
        if examples:
            write_examples(split_dir, case_id, examples)
        rejected, n_total = Counter(r for r in reasons if r), len(reasons)
        pieces = recording.pieces
        outcome.update(
            tracks=recording.names(),
            rates_hz={n: r for n, (_, r, _) in pieces[0].tracks.items()},
            duration_s=round(sum(min(len(x) / r for x, r, _ in p.tracks.values()) for p in pieces), 3),
            windows_total=n_total, windows_kept=len(columns["window_idx"]), rejected=dict(rejected),
        )
        if recording.absent or recording.incomplete:
            outcome["partial_record"] = {"pieces": len(pieces), "absent": recording.absent,
                                         "incomplete": recording.incomplete}
        if outcome["windows_kept"] == 0:
            top = ", ".join(f"{r} x{n}" for r, n in rejected.most_common(3))
            raise CaseSkipped("no_usable_windows", f"all {n_total} windows failed quality checks ({top})")
        t1 = time.perf_counter()
        target = storage.join(split_dir, f"{case_id}.parquet")
        try:
            storage.write(target, lambda f: pq.write_table(windows_table(case_id, columns, spec), f))
        except OSError as e:  # storage, not the case: a rerun tries it again
            raise CaseSkipped("write_failed", f"{target}: {e}", retryable=True) from None
        timings["write"] = time.perf_counter() - t1
        outcome.update(status="ok", file=f"{case_id}.parquet")
    except CaseSkipped as e:
        outcome.update(status="skipped", code=e.code, reason=e.detail, retryable=e.retryable)
    except Exception as e:  # one bad case never stops the job; the manifest keeps the cause
        outcome.update(status="skipped", code="error", reason=f"{type(e).__name__}: {e}",
                       retryable=False)
    outcome.setdefault("windows_kept", 0)
    outcome["seconds"] = round(time.perf_counter() - t0, 4)
    outcome["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    storage.write_text(storage.join(split_dir, "_cases", f"{case_id}.json"), json.dumps(outcome))
    return outcome


def recording_windows(recording, channels: dict[str, ChannelSpec], cfg: WindowsConfig,
                      timings: dict, examples: dict | None = None) -> tuple[dict, list[str]]:
    """:func:`make_windows` over every piece of ``recording``: ``window_idx`` runs on across pieces
    and ``start_s`` counts from the recording's start (``examples`` too). A piece shorter than a
    window gives none; all of them that short is ``too_short``."""
    parts, reasons, offset, short = [], [], 0, []
    for piece in recording.pieces:
        found = {} if examples is not None else None
        try:
            columns, why = make_windows(piece.tracks, channels, cfg, timings, found)
        except CaseSkipped as e:
            if e.code != "too_short":
                raise
            short.append(e.detail)
            continue
        columns["window_idx"] = columns["window_idx"] + offset
        columns["start_s"] = columns["start_s"] + piece.start_s
        for reason, (start, x) in (found or {}).items():
            examples.setdefault(reason, (start + piece.start_s, x))
        parts.append(columns)
        reasons += why
        offset += len(why)
    if not parts:
        raise CaseSkipped("too_short", short[0] if len(short) == 1 else
                          f"each of its {len(short)} pieces is shorter than one {cfg.window_s:g} s window")
    return {k: np.concatenate([c[k] for c in parts]) for k in parts[0]}, reasons


def _check_case_id(case_id: str) -> str:
    if not case_id or "/" in case_id or "\\" in case_id or case_id.startswith((".", "_")):
        raise ConfigError(f"invalid case id {case_id!r}: ids name files, so no slashes or "
                          "leading '.'/'_'")
    return case_id


class Progress:
    """One progress line per stage for people: cases done / total, windows kept, rate."""

    def __init__(self, stage: str, total: int, every_s: float = 5.0, units: tuple[str, str] = ("cases", "windows")):
        self.stage, self.total, self.every_s = stage, total, every_s
        self.units = units
        self.done = self.skipped = self.windows = 0
        self.t0 = self.last = time.perf_counter()

    def update(self, outcome: dict) -> None:
        self.done += 1
        self.skipped += outcome["status"] != "ok"
        self.windows += outcome["windows_kept"]
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.windows / max(now - self.t0, 1e-9)
            items, kept = self.units
            print(f"[{self.stage}] {self.done}/{self.total} {items} ({self.skipped} skipped), "
                  f"{self.windows} {kept} kept, {rate:.0f} {kept}/s", flush=True)


def _process_row(row: dict, **kwargs) -> dict:
    return {"outcome": json.dumps(process_case(row["case_id"], **kwargs))}


def run_cases(case_ids: list[str], progress: Progress, **kwargs) -> None:
    """Run :func:`process_case` over ``case_ids`` as a Ray Data pipeline.

    A task takes one case, or up to 8 when there are more than 4 tasks per cluster CPU anyway:
    fewer, larger tasks cut Ray Data's per-task cost (about 50 ms on a 2-core machine).
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = max(1, min(8, len(case_ids) // (4 * cpus)))
    ds = ray.data.from_items([{"case_id": c} for c in case_ids],
                             override_num_blocks=-(-len(case_ids) // per_task))
    for row in ds.map(_process_row, fn_kwargs=kwargs).iter_rows():
        progress.update(json.loads(row["outcome"]))


def build_windows(case_ids: list[str], source, channels: dict[str, ChannelSpec], cfg: WindowsConfig,
                  outdir: str | Path, split: str, overwrite: bool = False,
                  address: str | None = None, inputs: dict | None = None) -> dict:
    """Window ``case_ids`` from ``source`` into ``<outdir>/<split>/``; returns the manifest.

    Resumes: cases completed by an earlier run with the same config and the same :func:`reading`
    settings are not read again; cases skipped for a transient cause, or skipped under other
    reading settings (a ``no_sample_rate`` the ``--rate-hz`` now given fixes), are processed
    again; cases built under other reading settings are refused (``--overwrite``), never kept
    beside the others. ``overwrite`` deletes the split folder first.
    Raises :class:`NothingProduced` when no case yields a window.
    """
    trackless = [name for name, spec in channels.items() if not spec.tracks and not spec.aliases]
    if trackless:
        raise ConfigError(f"channel(s) {trackless} have no track names or aliases in channels.yaml, so no "
                          f"recording can provide them (the windows take channels that have them: "
                          f"{[n for n, s in channels.items() if s.tracks or s.aliases] or 'none'})")
    case_ids = list(dict.fromkeys(_check_case_id(str(c)) for c in case_ids))
    if not case_ids:
        raise NothingProduced(f"no cases to process for split {split!r}: the case list is empty")
    split_dir = storage.join(outdir, split)
    if overwrite:
        storage.remove_tree(split_dir)
    storage.remove_temporary(split_dir)
    spec = data_spec(channels, cfg)

    previous = load_outcomes(split_dir)
    other = {o["config_hash"] for o in previous.values()} - {spec["config_hash"]}
    if other:
        raise ConfigError(
            f"{split_dir} holds windows made with another config (hash {sorted(other)[0]}, now "
            f"{spec['config_hash']}); use --overwrite to rebuild it, or another --outdir")
    now = reading(source, channels)
    built_otherwise = sorted(c for c, o in previous.items() if o.get("reading") != now and o.get("status") == "ok")
    if built_otherwise:
        before = previous[built_otherwise[0]].get("reading") or {}
        changed = [k for k in now if before.get(k) != now[k]] or ["(not recorded: an earlier biofm)"]
        raise ConfigError(
            f"{split_dir} holds {len(built_otherwise)} case(s) (e.g. {built_otherwise[0]}) built with other reading "
            f"settings ({', '.join(f'{k}: {before.get(k)!r} -> {now[k]!r}' if k in now else k for k in changed)}); "
            "use --overwrite to rebuild them with these, or another --outdir")
    done = {c for c, o in previous.items() if not o.get("retryable") and o.get("reading") == now}
    pending = [c for c in case_ids if c not in done]
    progress = Progress(f"build-windows {split}", len(pending))
    t0 = time.perf_counter()
    if pending:
        source.check_reachable()
        ensure_ray(address)
        run_cases(pending, progress, source=source, channels=channels, cfg=cfg, split_dir=split_dir)
    print(f"[build-windows {split}] {len(case_ids) - len(pending)} cases already done, "
          f"{len(pending)} processed in {time.perf_counter() - t0:.1f} s", flush=True)

    manifest = write_manifest(split_dir, case_ids, spec, channels, cfg, source, inputs or {},
                              wall_s=time.perf_counter() - t0)
    print(f"[build-windows {split}] data report: {write_report(outdir)}", flush=True)
    if manifest["windows_kept"] == 0:
        reasons = "; ".join(f"{k}: {n} case(s)" for k, n in manifest["skip_reasons"].items())
        example = next(o["reason"] for o in manifest["cases"].values() if o["status"] != "ok")
        raise NothingProduced(f"no windows produced for split {split!r} from {source.describe()} "
                              f"({reasons}); e.g. {example}")
    return manifest


def write_manifest(split_dir: str, case_ids: list[str], spec: dict, channels, cfg, source,
                   inputs: dict, wall_s: float) -> dict:
    """Gather the per-case outcomes of ``case_ids`` into the split's section of the manifest."""
    outcomes = load_outcomes(split_dir)
    cases = {c: outcomes[c] for c in case_ids}
    ok = [o for o in cases.values() if o["status"] == "ok"]
    rejected, skip_reasons, stage_s = Counter(), Counter(), Counter()
    for o in cases.values():
        rejected.update(o.get("rejected", {}))
        stage_s.update(o["timings"])
        if o["status"] != "ok":
            skip_reasons[o["code"]] += 1
    manifest = {
        "split": storage.name(split_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code_version": code_version(),
        "source": source.describe(),
        "inputs": inputs,
        "data_spec": spec,
        "config": {"windows": to_jsonable(cfg), "channels": {n: to_jsonable(s) for n, s in channels.items()}},
        "cases_in": len(cases),
        "cases_ok": len(ok),
        "cases_skipped": len(cases) - len(ok),
        "partial_records": sum("partial_record" in o for o in ok),
        "windows_kept": sum(o["windows_kept"] for o in ok),
        "windows_rejected": dict(rejected.most_common()),
        "skip_reasons": dict(skip_reasons.most_common()),
        "timings": {"wall_s": round(wall_s, 3),
                    "case_seconds_by_stage": {k: round(v, 3) for k, v in stage_s.items()}},
        "cases": cases,
    }
    assert manifest["cases_in"] == manifest["cases_ok"] + manifest["cases_skipped"]
    outdir = split_dir.rsplit("/", 1)[0]
    path = storage.join(outdir, "manifest.json")
    with _manifest_lock(outdir):
        whole = json.loads(storage.read_text(path)) if storage.is_file(path) else {"splits": {}}
        whole["splits"][manifest["split"]] = manifest
        storage.write_text(path, json.dumps(whole, indent=1))
    return manifest


@contextlib.contextmanager
def _manifest_lock(outdir: str):
    """Locally, builds of other splits may update the manifest at the same time: they take turns.
    Object stores have no locks: build the splits of one URI one after the other (the pipeline does)."""
    if storage.is_uri(outdir):
        yield
        return
    Path(outdir).mkdir(parents=True, exist_ok=True)
    with open(Path(outdir) / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


