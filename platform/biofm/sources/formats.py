"""Where recordings come from: ``--source api|DIR|URI``, with the format detected from the files.

:func:`open_source` gives an object with ``describe()``, ``check_reachable()``, ``ids()`` and
``read(case_id, channels) -> Recording``: the VitalDB API, or a local folder or cloud prefix of
``.vital``, WFDB, EDF/BDF, CSV/TSV or MATLAB/NumPy recordings. A prefix (``wfdb:``, ``edf:``,
``csv:``, ``array:``, ``vital:``) names the format where a folder holds several.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from biofm import storage
from biofm.config import ChannelSpec
from biofm.errors import BiofmError, CaseSkipped, ConfigError, SourceUnreachable
from biofm.sources import arrays, csv, edf, vitaldb, wfdb
from biofm.sources.recording import Recording

FORMATS = {"vital": (".vital",), "wfdb": wfdb.SUFFIXES, "edf": edf.SUFFIXES, "csv": csv.SUFFIXES,
           "array": arrays.SUFFIXES}


def detect_format(files: list[str], where: str) -> str:
    """The one format whose files ``files`` holds; none or several is a :class:`ConfigError`."""
    counts = {fmt: sum(f.lower().endswith(suffixes) for f in files) for fmt, suffixes in FORMATS.items()}
    held = {fmt: n for fmt, n in counts.items() if n}
    if len(held) == 1:
        return next(iter(held))
    if not held:
        raise ConfigError(f"no recordings in {where}: expected .vital, WFDB (.hea), EDF/BDF, CSV/TSV or "
                          "MATLAB/NumPy (.mat, .npz, .npy) files "
                          f"(unsupported_format: {len(files)} other files)")
    listed = ", ".join(f"{n} {fmt}" for fmt, n in held.items())
    raise ConfigError(f"{where} holds recordings in {len(held)} formats ({listed} files): name one with a "
                      f"prefix, e.g. --source {next(iter(held))}:{where}")


@dataclass(frozen=True)
class FolderSource:
    """WFDB, EDF, CSV or MATLAB/NumPy recordings under a local folder or a cloud prefix. ``records``:
    case id -> path relative to ``root`` (less ``.hea`` for WFDB). ``rate_hz``: the rate of CSV files
    without a time column, and of arrays whose layout names none."""

    root: str
    fmt: str
    records: dict[str, str] = field(default_factory=dict)
    rate_hz: float | None = None

    def describe(self) -> str:
        return f"{self.fmt}:{storage.normalize(self.root)}"

    def check_reachable(self) -> None:
        if not self.records:
            raise SourceUnreachable(f"no {self.fmt} recordings under {self.root}")

    def ids(self) -> list[str]:
        return sorted(self.records)

    @contextlib.contextmanager
    def _fetcher(self) -> Iterator:
        """``fetch(relative path) -> local Path or None``: the file itself for a local root, a
        temporary copy (removed afterwards) for a cloud one."""
        if not storage.is_uri(self.root):
            root = Path(self.root)
            yield lambda rel: (root / rel) if (root / rel).is_file() else None
            return
        with tempfile.TemporaryDirectory(prefix="biofm-") as tmp:
            def fetch(rel: str) -> Path | None:
                local = Path(tmp) / rel
                if not local.is_file():
                    try:
                        data = storage.read_bytes(storage.join(self.root, rel))
                    except FileNotFoundError:
                        return None
                    except OSError as e:
                        raise CaseSkipped("unreachable", f"{self.root}/{rel}: {e}", retryable=True) from None
                    local.parent.mkdir(parents=True, exist_ok=True)
                    local.write_bytes(data)
                return local
            yield fetch

    def read(self, case_id: str, channels: dict[str, ChannelSpec]) -> Recording:
        rel = self.records.get(case_id)
        if rel is None:
            raise CaseSkipped("not_found", f"no recording {case_id} under {self.root}")
        with self._fetcher() as fetch:
            if self.fmt == "wfdb":
                return wfdb.read(fetch, rel, channels)
            path = fetch(rel)
            if path is None:
                raise CaseSkipped("not_found", f"{rel} is no longer under {self.root}")
            if self.fmt == "edf":
                return edf.read(path, channels)
            if self.fmt == "array":
                return arrays.read(path, channels, self.rate_hz)
            return csv.read(path, channels, self.rate_hz)


def format_prefix(source: str) -> tuple[str, str]:
    """``(format, location)`` of a source written ``wfdb:/data/x`` (``("", source)`` without a
    prefix; a folder merely named ``vital`` or ``csv`` has none)."""
    fmt, sep, rest = source.partition(":")
    return (fmt, rest) if sep and fmt in FORMATS else ("", source)


def open_source(source: str, api_url: str | None = None, rate_hz: float | None = None):
    """``api`` (optionally at ``api_url``), or a local folder / cloud URI, its format detected
    from its files or named by a ``wfdb:``/``edf:``/``csv:``/``array:``/``vital:`` prefix. The label
    files of an array layout (TROIKA's ``*_BPMtrace.mat``) are not recordings."""
    if source == "api":
        return vitaldb.ApiSource(api_url or vitaldb.DEFAULT_API_URL)
    if api_url:
        raise SourceUnreachable("--api-url only applies to --source api")
    fmt, root = format_prefix(source)
    root = root.removeprefix("file://")
    try:
        files = storage.list_tree(root)
    except (OSError, BiofmError) as e:
        raise SourceUnreachable(f"cannot list {root}: {e}") from None
    if not files and not storage.is_dir(root):
        raise SourceUnreachable(f"source folder {root} does not exist")
    fmt = fmt or detect_format(files, root)
    if fmt == "vital":
        return vitaldb.CloudSource(root) if storage.is_uri(root) else vitaldb.DirectorySource(root)
    if fmt == "wfdb":
        records = wfdb.record_ids(files, lambda rel: storage.read_text(storage.join(root, rel)))
    else:
        records = {}
        known = arrays.layouts() if fmt == "array" else {}
        for rel in (f for f in files if f.lower().endswith(FORMATS[fmt]) and not arrays.is_label_file(Path(f).name, known)):
            rid = Path(rel).stem
            if rid in records:
                raise ConfigError(f"two {fmt} recordings under {root} are named {rid}: {records[rid]} and {rel}")
            records[rid] = rel
    if rate_hz is not None and fmt not in ("csv", "array"):
        raise ConfigError(f"--rate-hz only applies to CSV and MATLAB/NumPy recordings ({root} holds {fmt})")
    return FolderSource(root, fmt, records, rate_hz)
