"""The windows dataset contract, shared by its writers (:mod:`biofm.preprocess`, :mod:`biofm.tasks`)
and its readers (:mod:`biofm.train`, :mod:`biofm.infer`, :mod:`biofm.benchmark`).

Layout of a windows folder (split folders hold only Parquet, so pandas/pyarrow/Ray read them as
they are)::

    <outdir>/<split>/<case_id>.parquet     kept windows of one case (written atomically)
    <outdir>/<split>/_cases/<case_id>.json outcome of one case: ok + counts, or skipped + reason
    <outdir>/<split>/_examples/<case_id>.npz  the case's first rejected window of each reason
    <outdir>/manifest.json                 per split: config, per-case outcomes, totals, timings
    <outdir>/report.md, report/*.png       the data report (:mod:`biofm.report`)

Every Parquet file carries its data spec (:func:`data_spec`) in its schema metadata under
:data:`SCHEMA_KEY`; readers scan and compare specs here, and refuse data a model was not built for.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa

from biofm import __version__, storage
from biofm.config import ChannelSpec, WindowsConfig, config_hash
from biofm.errors import ConfigError, NothingProduced
from biofm.signals import PASS_BAND

SCHEMA_KEY = b"biofm"


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
            name: {"type": "cheby2", "band_hz": list(s.band_hz), "edges": PASS_BAND, "order": s.filter_order,
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
                              f"model's {expected['filters'][channel]}{_before_pass_band(expected, actual)}")


def _before_pass_band(*specs: dict) -> str:
    """A hint where a spec comes from a biofm whose filters passed a narrower band than band_hz."""
    old = any(f.get("edges") != PASS_BAND for spec in specs for f in spec["filters"].values())
    return (" (an earlier biofm built it, whose filters passed a narrower band than band_hz says: rebuild the "
            "windows with --overwrite, or retrain the model on windows built now)") if old else ""


def load_outcomes(split_dir: str) -> dict[str, dict]:
    return {storage.name(p).removesuffix(".json"): json.loads(storage.read_text(p))
            for p in storage.list_files(storage.join(split_dir, "_cases"), ".json")}


def write_examples(split_dir: str, case_id: str, examples: dict[str, tuple[float, np.ndarray]]) -> None:
    """``examples``: reason -> ``(start_s, window [C, T])`` -> ``_examples/<case_id>.npz``."""
    import io

    buffer = io.BytesIO()
    reasons = list(examples)
    np.savez_compressed(buffer, reasons=np.array(reasons), start_s=np.array([examples[r][0] for r in reasons]),
                        signal=np.stack([examples[r][1] for r in reasons]).astype(np.float16))
    storage.write(storage.join(split_dir, "_examples", f"{case_id}.npz"), lambda f: f.write(buffer.getvalue()))


def read_examples(split_dir: str, case_id: str) -> list[tuple[str, float, np.ndarray]]:
    """The rejected windows :func:`write_examples` kept for ``case_id``: ``[(reason, start_s,
    [C, T])]``; none when it kept none."""
    import io

    path = storage.join(split_dir, "_examples", f"{case_id}.npz")
    if not storage.is_file(path):
        return []
    z = np.load(io.BytesIO(storage.read_bytes(path)))
    return [(str(r), float(t), x.astype(np.float32)) for r, t, x in zip(z["reasons"], z["start_s"], z["signal"])]


def read_manifest(outdir: str | Path, split: str) -> dict:
    """The manifest section of ``split`` under ``outdir``."""
    path = storage.join(outdir, "manifest.json")
    splits = json.loads(storage.read_text(path))["splits"] if storage.is_file(path) else {}
    if split not in splits:
        raise NothingProduced(f"{outdir} has no windows for split {split!r} (built: {sorted(splits) or 'none'})")
    return splits[split]


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__
