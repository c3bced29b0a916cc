"""Recordings -> quality-checked 10 s windows -> Parquet, on Ray Data.

:func:`process_case` does one case end to end (read, resample, filter, window, quality, z-score,
write ``<split>/<case_id>.parquet``) and returns its outcome; :func:`build_windows` runs it over
many cases with Ray Data, resumes from earlier runs, and records every outcome in ``<outdir>/manifest.json``.

Layout (split folders hold only Parquet, so pandas/pyarrow/Ray read them as they are)::

    <outdir>/<split>/<case_id>.parquet     kept windows of one case (written atomically)
    <outdir>/<split>/_cases/<case_id>.json outcome of one case: ok + counts, or skipped + reason
    <outdir>/manifest.json                 per split: config, per-case outcomes, totals, timings

``outdir`` is a local path or a URI (:mod:`biofm.storage`): the tasks write their files directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biofm import __version__, storage
from biofm.config import ChannelSpec, WindowsConfig, config_hash, to_jsonable
from biofm.errors import CaseSkipped, ConfigError, NothingProduced
from biofm.windows import make_windows, record_signal

SCHEMA_KEY = b"biofm"
STAGES = ("read", "resample", "filter", "quality", "write")


def data_spec(channels: dict[str, ChannelSpec], windows: WindowsConfig) -> dict:
    """What a window means: channel order, rate, length and filters, plus the config hash.

    Stored in every Parquet file's schema metadata and in the manifest, so models can refuse
    data they were not built for.
    """
    return {
        "channels": list(channels),
        "sample_rate_hz": windows.sample_rate_hz,
        "window_s": windows.window_s,
        "window_samples": windows.window_samples,
        "filters": {
            name: {"type": "cheby2", "band_hz": list(s.band_hz), "order": s.filter_order,
                   "stopband_db": s.stopband_db, "zero_phase": True}
            for name, s in channels.items()
        },
        "zscore": "per window, per channel",
        "config_hash": config_hash(windows, *channels.values()),
    }


def windows_table(case_id: str, columns: dict, spec: dict) -> pa.Table:
    """The Parquet table of one case's windows; ``signal`` is a fixed-shape tensor ``[C, T]``."""
    n = len(columns["window_idx"])
    arrays = {
        "case_id": pa.array([case_id] * n, pa.string()),
        "window_idx": pa.array(columns["window_idx"], pa.int32()),
        "start_s": pa.array(columns["start_s"], pa.float64()),
        "signal": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(columns["signal"])),
        **{k: pa.array(v) for k, v in columns.items() if k not in ("window_idx", "start_s", "signal")},
    }
    table = pa.table(arrays)
    return table.replace_schema_metadata({SCHEMA_KEY: json.dumps(spec).encode()})


def process_case(case_id: str, source, channels: dict[str, ChannelSpec], cfg: WindowsConfig,
                 split_dir: str | Path) -> dict:
    """Read, window, check and write one case. Never raises for a bad case: returns its outcome.

    The outcome (JSON-able) is also written to ``<split_dir>/_cases/<case_id>.json``, after the
    Parquet file, so an interrupted run knows which cases are complete.
    """
    from biofm.sources.vitaldb import read_tracks

    spec = data_spec(channels, cfg)
    timings = {s: 0.0 for s in STAGES}
    outcome = {"case_id": case_id, "config_hash": spec["config_hash"], "timings": timings}
    t0 = time.perf_counter()
    try:
        with source.local_file(case_id) as path:
            tracks = read_tracks(path, channels)
        timings["read"] = time.perf_counter() - t0
        columns, reasons = make_windows(tracks, channels, cfg, timings)
        rejected, n_total = Counter(r for r in reasons if r), len(reasons)
        outcome.update(
            tracks={n: t for n, (_, _, t) in tracks.items()},
            rates_hz={n: r for n, (_, r, _) in tracks.items()},
            duration_s=round(min(len(x) / r for x, r, _ in tracks.values()), 3),
            windows_total=n_total, windows_kept=len(columns["window_idx"]), rejected=dict(rejected),
        )
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


def ensure_ray(address: str | None = None) -> None:
    """Connect to Ray: ``address`` or ``RAY_ADDRESS`` targets a cluster, else a local instance starts
    (quiet unless ``--verbose``: :mod:`biofm.output`). A local instance's processes are told its
    address (``RAY_ADDRESS``, inherited from its raylet): Ray's own state queries in them (Train's
    placement-group cleaner) otherwise fail with "Found multiple active Ray instances" when another
    runs on the machine."""
    import socket

    import ray

    from biofm import output

    if not ray.is_initialized() and (address or os.environ.get("RAY_ADDRESS")):
        ray.init(address=address, log_to_driver=True, **output.ray_init_options())
    elif not ray.is_initialized():
        with socket.socket() as s:  # a free port for the new instance's GCS, so its address is known first
            s.bind(("", 0))
            port = s.getsockname()[1]
        # read by the node this process starts; its raylet passes RAY_ADDRESS on to every worker
        os.environ.update(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"{ray.util.get_node_ip_address()}:{port}")
        try:
            ray.init(address="local", log_to_driver=True, **output.ray_init_options())
        finally:
            del os.environ["RAY_GCS_SERVER_PORT"], os.environ["RAY_ADDRESS"]
    import ray.data  # noqa: F401  (its loggers exist once it is imported)

    output.quiet_ray_data()


def _code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def load_outcomes(split_dir: str) -> dict[str, dict]:
    return {storage.name(p).removesuffix(".json"): json.loads(storage.read_text(p))
            for p in storage.list_files(storage.join(split_dir, "_cases"), ".json")}


def build_windows(case_ids: list[str], source, channels: dict[str, ChannelSpec], cfg: WindowsConfig,
                  outdir: str | Path, split: str, overwrite: bool = False,
                  address: str | None = None, inputs: dict | None = None) -> dict:
    """Window ``case_ids`` from ``source`` into ``<outdir>/<split>/``; returns the manifest.

    Resumes: cases completed by an earlier run with the same config are not read again (cases
    skipped for a transient cause are retried). ``overwrite`` deletes the split folder first.
    Raises :class:`NothingProduced` when no case yields a window.
    """
    trackless = [name for name, spec in channels.items() if not spec.tracks]
    if trackless:
        raise ConfigError(f"channel(s) {trackless} have no recording track names in channels.yaml, so no .vital "
                          f"file can provide them (the windows take channels with tracks: "
                          f"{[n for n, s in channels.items() if s.tracks] or 'none'})")
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
    done = {c for c, o in previous.items() if not o.get("retryable")}
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
        "code_version": _code_version(),
        "source": source.describe(),
        "inputs": inputs,
        "data_spec": spec,
        "config": {"windows": to_jsonable(cfg), "channels": {n: to_jsonable(s) for n, s in channels.items()}},
        "cases_in": len(cases),
        "cases_ok": len(ok),
        "cases_skipped": len(cases) - len(ok),
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


def read_manifest(outdir: str | Path, split: str) -> dict:
    """The manifest section of ``split`` under ``outdir``."""
    path = storage.join(outdir, "manifest.json")
    splits = json.loads(storage.read_text(path))["splits"] if storage.is_file(path) else {}
    if split not in splits:
        raise NothingProduced(f"{outdir} has no windows for split {split!r} (built: {sorted(splits) or 'none'})")
    return splits[split]


def scan_split(split_dir: str | Path) -> tuple[dict, dict[str, int]]:
    """The data spec stored in a split's Parquet schema metadata, and the windows (rows) of each
    file (location -> rows, sorted by location). Every file's footer is read, a few at a time (on
    an object store each read is a round trip): a file that is not Parquet, or that was made with
    other settings, is an error naming it (not a failure deep inside a read)."""
    from concurrent.futures import ThreadPoolExecutor

    files = list(storage.list_files(split_dir, ".parquet"))
    if not files:
        splits = [storage.name(d) for d in storage.list_dirs(split_dir) if storage.list_files(d, ".parquet")]
        if splits:
            raise ConfigError(f"{split_dir} holds the splits {', '.join(splits)}, not one split: choose one, e.g. "
                              f"{storage.join(split_dir, splits[-1])}")
        raise NothingProduced(f"no windows in {split_dir}: build them first with `biofm build-windows`")

    def footer(f):
        try:
            return storage.read_metadata(f)
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"{f} is not a readable Parquet file ({type(e).__name__}: {e}); remove it, "
                              "or rebuild the split with --overwrite") from None

    with ThreadPoolExecutor(16) as pool:
        footers = list(pool.map(footer, files))
    specs = {}
    for f, meta in zip(files, footers):
        metadata = meta.metadata or {}
        if SCHEMA_KEY not in metadata:
            raise ConfigError(f"{f} was not written by biofm build-windows (no data spec)")
        specs.setdefault(metadata[SCHEMA_KEY], f)
    if len(specs) > 1:
        a, b = list(specs.values())[:2]
        raise ConfigError(f"{split_dir} mixes windows made with different settings ({storage.name(a)} and {storage.name(b)}): "
                          "rebuild the split with --overwrite")
    return json.loads(next(iter(specs))), {f: m.num_rows for f, m in zip(files, footers)}


def read_data_spec(split_dir: str | Path) -> dict:
    """The data spec of a windows split (see :func:`scan_split`)."""
    return scan_split(split_dir)[0]


def same_data(a: dict, b: dict) -> bool:
    """Two data specs describe the same signals (their config hashes aside)."""
    return {k: v for k, v in a.items() if k != "config_hash"} == {k: v for k, v in b.items() if k != "config_hash"}


def check_data_spec(expected: dict, actual: dict, where: str) -> None:
    """Refuse data made differently from what a model was built for (rate, window, filters)."""
    for key in ("sample_rate_hz", "window_samples"):
        if expected[key] != actual[key]:
            raise ConfigError(f"{where}: {key} is {actual[key]}, the model was built for {expected[key]}")
    for channel in set(expected["filters"]) & set(actual["filters"]):
        if expected["filters"][channel] != actual["filters"][channel]:
            raise ConfigError(f"{where}: {channel} filter {actual['filters'][channel]} differs from the "
                              f"model's {expected['filters'][channel]}")


def process_record(record_id: str, raw_dir: str, channels: dict[str, ChannelSpec], cfg: WindowsConfig,
                   ppg_signal: int, label: int, ref_hr: float) -> dict:
    """Read and prepare one BUT-PPG record for predict (a task's records: :mod:`biofm.tasks`); never
    raises for a bad record. Returns its outcome (JSON-able) plus ``signal`` ``[C, T]`` and
    ``present`` ``[C]`` when it is usable."""
    from biofm.sources.butppg import read_record, subject_of

    t0 = time.perf_counter()
    outcome = {"record_id": record_id, "subject_id": subject_of(record_id), "label": label, "ref_hr": ref_hr}
    try:
        record = read_record(Path(raw_dir), record_id, ppg_signal)
        signal, present = record_signal(record, channels, cfg)
        outcome.update(status="ok", present=dict(zip(channels, present.tolist())),
                       rates_hz={n: rate for n, (_, rate) in record.items()})
    except CaseSkipped as e:
        outcome.update(status="skipped", code=e.code, reason=e.detail)
        signal, present = None, None
    except Exception as e:  # one bad record never stops the job; the manifest keeps the cause
        outcome.update(status="skipped", code="error", reason=f"{type(e).__name__}: {e}")
        signal, present = None, None
    outcome["seconds"] = round(time.perf_counter() - t0, 4)
    return {"outcome": outcome, "signal": signal, "present": present}
