"""BUT-PPG (PhysioNet ``butppg``) in its published layout: records, labels, subjects.

    <raw_dir>/RECORDS                      one ``<id>/<id>_PPG`` line per record
    <raw_dir>/quality-hr-ann.csv           ID, Quality (1 = good), HR   (UTF-8 with a BOM)
    <raw_dir>/subject-info.csv             ID, Gender, Age [years], ... (UTF-8 with a BOM)
    <raw_dir>/<id>/<id>_PPG.{hea,dat}      smartphone PPG, 30 Hz
    <raw_dir>/<id>/<id>_ECG.{hea,dat}      ECG, 1000 Hz
    <raw_dir>/<id>/<id>_ACC.{hea,dat}      accelerometer X, Y, Z, 100 Hz (records >= 112001 only)

A record id is six digits; its first three are the subject.
"""

from __future__ import annotations

import csv
import shutil
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biofm import storage
from biofm.errors import CaseSkipped, ConfigError, SourceUnreachable
from biofm.sources import http

DATABASE = "butppg"
VERSION = "2.0.0"
RECORD_S = 10.0
ACC_FROM = 112001
MODALITIES = {"PPG": ("PPG",), "ECG": ("ECG",), "ACC": ("ACC_X", "ACC_Y", "ACC_Z")}
_BYTES = {"16": 2, "32": 4, "80": 1, "8": 1}


@dataclass(frozen=True)
class Annotation:
    label: int  # 1 = good quality, 0 = poor
    ref_hr: float  # reference heart rate, bpm (NaN where the file leaves it empty)


def subject_of(record_id: str) -> str:
    return record_id[:3]


def raw_folder(raw_dir: str | Path) -> Path:
    """The raw records' folder as a path; a URI is refused: wfdb reads files from a folder (local,
    or shared by every node when a cluster prepares the records)."""
    if storage.is_uri(raw_dir):
        raise ConfigError(f"BUT-PPG raw folder {raw_dir}: the raw records are read from a folder (local, or "
                          "shared by every node), not a URI")
    return Path(storage.normalize(raw_dir))


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: is {path.parent} a BUT-PPG folder (PhysioNet butppg/{VERSION})?")
    with open(path, newline="", encoding="utf-8-sig") as f:  # PhysioNet's files start with a BOM
        return list(csv.DictReader(f))


def read_records(raw_dir: Path) -> list[str]:
    """Record ids listed in ``RECORDS`` (``100001/100001_PPG`` -> ``100001``), in file order."""
    path = raw_dir / "RECORDS"
    if not path.is_file():
        raise ConfigError(f"{raw_dir} has no RECORDS file: point --raw-dir at the BUT-PPG {VERSION} "
                          "folder, or pass --download")
    ids = [line.strip().split("/")[0] for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(ids))


def read_annotations(raw_dir: Path) -> dict[str, Annotation]:
    """``quality-hr-ann.csv``: record id -> label and reference HR."""
    out = {}
    for row in _read_csv(raw_dir / "quality-hr-ann.csv"):
        quality, hr = row.get("Quality", "").strip(), row.get("HR", "").strip()
        if quality not in ("0", "1"):
            continue  # left unannotated: the record is skipped with that reason
        out[row["ID"].strip()] = Annotation(int(quality), float(hr) if hr else float("nan"))
    return out


def read_subjects(raw_dir: Path) -> dict[str, dict]:
    """``subject-info.csv``: record id -> its row. Raises if a subject (first 3 digits of the
    id) has records with different gender or age, i.e. the id does not identify the subject."""
    rows = {row["ID"].strip(): row for row in _read_csv(raw_dir / "subject-info.csv")}
    seen: dict[str, tuple] = {}
    for rid, row in rows.items():
        who = (row.get("Gender", "").strip(), row.get("Age [years]", "").strip())
        if seen.setdefault(subject_of(rid), who) != who:
            raise ConfigError(f"subject-info.csv: records of subject {subject_of(rid)} disagree on gender/age "
                              f"({seen[subject_of(rid)]} vs {who} at {rid}); subject ids cannot be trusted")
    return rows


def _read_signals(base: Path) -> tuple[np.ndarray, float, list[str]]:
    """One WFDB record: ``(x [n_sig, n] float64 in physical units, fs Hz, signal names)``.

    A header whose signal length disagrees with its ``.dat`` file (the first release's records
    are reported to have such headers) is decoded from the file size only when that is
    verifiable: a plain format (8/16/32/80), one data file, and exactly ``RECORD_S`` seconds of
    samples at the header's rate. Anything else raises :class:`CaseSkipped`.
    """
    import wfdb

    name = base.name
    try:
        header = wfdb.rdheader(str(base))
    except Exception as e:
        raise CaseSkipped("malformed_header", f"{name}.hea cannot be parsed ({type(e).__name__}: {e})") from e
    fs, n_sig = float(header.fs or 0), int(header.n_sig or 0)
    if fs <= 0 or n_sig <= 0:
        raise CaseSkipped("malformed_header", f"{name}.hea gives fs={header.fs}, {header.n_sig} signals")
    names = [str(s) for s in (header.sig_name or [])]
    files, fmts = set(header.file_name or []), set(header.fmt or [])
    dat = base.parent / next(iter(files)) if len(files) == 1 else None
    if dat is None or not dat.is_file():
        raise CaseSkipped("missing_file", f"{name}: data file {sorted(files)} not found")
    per_sample = _BYTES.get(next(iter(fmts)), 0) * n_sig if len(fmts) == 1 else 0
    from_size = dat.stat().st_size // per_sample if per_sample and dat.stat().st_size % per_sample == 0 else None
    if header.sig_len and header.sig_len > 1 and (from_size is None or header.sig_len <= from_size):
        record = wfdb.rdrecord(str(base))
        return record.p_signal.T.astype(np.float64), fs, names
    expected = int(round(RECORD_S * fs))
    if from_size != expected:
        raise CaseSkipped("malformed_header", f"{name}.hea says {header.sig_len} samples and its .dat file "
                          f"cannot be decoded from its size ({dat.stat().st_size} bytes, fmt {sorted(fmts)}, "
                          f"{n_sig} signals; expected {expected} samples = {RECORD_S:g} s at {fs:g} Hz)")
    dtype = {"16": "<i2", "32": "<i4", "80": "u1", "8": "i1"}[next(iter(fmts))]
    raw = np.fromfile(dat, dtype=dtype).reshape(-1, n_sig).T.astype(np.float64)
    offset = 128 if dtype == "u1" else 0
    gain = np.array([g or 200.0 for g in header.adc_gain], dtype=np.float64)[:, None]
    baseline = np.array(header.baseline or [0] * n_sig, dtype=np.float64)[:, None]
    return (raw - offset - baseline) / gain, fs, names


def read_record(raw_dir: Path, record_id: str, ppg_signal: int = 0) -> dict[str, tuple[np.ndarray, float]]:
    """The record's channels present on disk: name -> ``(x [n] float64, fs Hz)``.

    Names are ``PPG`` (signal ``ppg_signal`` of the PPG record: the smartphone's colour
    channels), ``ECG``, ``ACC_X``, ``ACC_Y``, ``ACC_Z``. A missing PPG record raises
    :class:`CaseSkipped`; missing ECG/ACC records are simply absent.
    """
    out = {}
    for modality, names in MODALITIES.items():
        base = raw_dir / record_id / f"{record_id}_{modality}"
        if not base.with_suffix(".hea").is_file():
            if modality == "PPG":
                raise CaseSkipped("missing_ppg", f"{base}.hea not found")
            continue
        x, fs, _ = _read_signals(base)
        if x.shape[1] < 2:
            raise CaseSkipped("malformed_header", f"{base.name} decodes to {x.shape[1]} sample(s)")
        if modality == "PPG":
            if not 0 <= ppg_signal < len(x):
                raise CaseSkipped("missing_ppg", f"{base.name} has {len(x)} signal(s), ppg_signal={ppg_signal}")
            out["PPG"] = (x[ppg_signal], fs)
        elif len(x) < len(names):
            raise CaseSkipped(f"bad_{modality.lower()}", f"{base.name} has {len(x)} signals, expected {len(names)}")
        else:
            out.update({n: (x[i], fs) for i, n in enumerate(names)})
    return out


PHYSIONET_URL = "https://physionet.org/files/"


def _base(index_url: str | None) -> str:
    return f"{(index_url or PHYSIONET_URL).rstrip('/')}/{DATABASE}/{VERSION}/"


def _unreachable(base: str, e: OSError) -> SourceUnreachable:
    return SourceUnreachable(f"cannot download BUT-PPG from {base} ({type(e).__name__}: {e}). Offline? Download it "
                             "elsewhere (https://physionet.org/content/butppg/) and pass its folder with --raw-dir")


def check_reachable(index_url: str | None = None) -> int:
    """The number of BUT-PPG records PhysioNet (or the mirror at ``index_url``, laid out like
    ``https://physionet.org/files/``) lists; raises :class:`SourceUnreachable` when it cannot."""
    base = _base(index_url)
    try:
        with http.get(base + "RECORDS", attempts=2) as r:
            return len([line for line in r.read().decode().splitlines() if line.strip()])
    except OSError as e:
        raise _unreachable(base, e) from None


def _fetch(url: str, dest: Path) -> None:
    """``url`` to ``dest``, unless ``dest`` is there at the size the server reports."""
    if dest.is_file():
        with http.get(url, method="HEAD") as r:
            if int(r.headers.get("Content-Length", -1)) == dest.stat().st_size:
                return
    part = dest.with_name(f".{dest.name}.part")
    with http.get(url) as r, open(part, "wb") as f:
        shutil.copyfileobj(r, f)
    part.replace(dest)


def download(raw_dir: Path, index_url: str | None = None, threads: int = 8) -> None:
    """Fetch BUT-PPG from PhysioNet (``index_url``: a mirror laid out like it), ``threads``
    files at a time: about 17,000 small files, whose round trips one at a time take most of an
    hour. Files already there at full size are kept, so an interrupted download continues.
    ``RECORDS`` is written last: a folder without it is an unfinished download. An ECG or ACC file
    the mirror does not have (404) is left out, counted in the output: that channel reads as
    absent in its record, as ACC is before 112001; a missing PPG file is an error."""
    base = _base(index_url)
    raw_dir.mkdir(parents=True, exist_ok=True)
    try:
        with http.get(base + "RECORDS") as r:
            listing = r.read()
        records = [r.split("/")[0] for r in listing.decode().splitlines() if r.strip()]
        bad = [rid for rid in records if not rid.isdigit()]  # ids name folders here
        if bad:
            raise ConfigError(f"{base}RECORDS lists {bad[0]!r}, which is not a BUT-PPG record id")
        for name in ("quality-hr-ann.csv", "subject-info.csv"):
            _fetch(base + name, raw_dir / name)
        files = []
        for rid in records:
            (raw_dir / rid).mkdir(exist_ok=True)
            files += [f"{rid}/{rid}_{m}.{ext}" for m in ("PPG", "ECG") for ext in ("hea", "dat")]
            if int(rid) >= ACC_FROM:
                files += [f"{rid}/{rid}_ACC.{ext}" for ext in ("hea", "dat")]
        print(f"[prepare-butppg] downloading {len(records)} records ({len(files)} files) from {base}", flush=True)

        def fetch(name: str) -> str | None:
            try:
                _fetch(base + name, raw_dir / name)
            except urllib.error.HTTPError as e:
                if e.code != 404 or "_PPG." in name:
                    raise
                return name
            return None

        t0, absent = time.perf_counter(), []
        with ThreadPoolExecutor(threads) as pool:  # map cancels the queued files at the first failure
            for i, missing in enumerate(pool.map(fetch, files), 1):
                absent += [missing] if missing else []
                if i % 2000 == 0 or i == len(files):
                    print(f"[prepare-butppg] {i}/{len(files)} files in {time.perf_counter() - t0:.0f} s", flush=True)
        if absent:
            print(f"[prepare-butppg] {len(absent)} ECG/ACC files are not on the mirror (e.g. {absent[0]}): "
                  "those channels are absent in their records", flush=True)
        (raw_dir / "RECORDS").write_bytes(listing)
    except OSError as e:
        raise _unreachable(base, e) from None
