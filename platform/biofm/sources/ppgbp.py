"""PPG-BP (Liang et al., Scientific Data 2018) in its published layout: short fingertip PPG segments
and one row of measurements per subject.

    <raw_dir>/0_subject/<subject>_<k>.txt   one segment per file (k = 1, 2, 3): 2,100 samples
                                            (2.1 s) at 1 kHz, tab-separated on one line
    <raw_dir>/PPG-BP dataset.xlsx           a title row, then a header row; per subject: subject_ID,
                                            systolic and diastolic blood pressure (mmHg), heart rate,
                                            the hypertension class (Normal, Prehypertension, Stage 1
                                            hypertension, Stage 2 hypertension), ...

A segment is 2.1 s, shorter than one 10 s window: :func:`fit` says how it becomes one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biofm.errors import CaseSkipped, ConfigError

RATE_HZ = 1000.0
TABLE = "PPG-BP dataset.xlsx"
COLUMNS = {"sbp": "Systolic Blood Pressure(mmHg)", "dbp": "Diastolic Blood Pressure(mmHg)",
           "hr": "Heart Rate(b/m)", "class": "Hypertension"}
HYPERTENSIVE = ("Stage 1 hypertension", "Stage 2 hypertension")  # JNC 7's stages; Normal, Prehypertension: not
FITS = ("tile", "concat", "pad")
# the fit kept: the best mean rank of the encoder's probe over the three PPG-BP tasks on their
# validation split (jobs/benchmark_experiment.py; its differences were small: docs/benchmark.md)
DEFAULT_FIT = "pad"


def subjects(raw_dir: Path) -> dict[str, dict]:
    """``{subject id: {"sbp", "dbp", "hr" (numbers), "class" (text)}}`` from the subjects' table."""
    import pandas as pd

    path = raw_dir / TABLE
    if not path.is_file():
        raise ConfigError(f"{raw_dir} holds no {TABLE!r}: point --raw-dir at the PPG-BP dataset (its 0_subject/ "
                          "folder and the subjects' table)")
    try:
        table = pd.read_excel(path, header=1)
    except Exception as e:  # openpyxl raises zipfile.BadZipFile, KeyError, ValueError for files it cannot parse
        raise ConfigError(f"{path} is not a readable xlsx table ({type(e).__name__}: {e})") from None
    missing = [c for c in ("subject_ID", *COLUMNS.values()) if c not in table.columns]
    if missing:
        raise ConfigError(f"{path} has no column {missing} (its second row is the header)")
    return {str(int(row["subject_ID"])): {k: (str(row[c]).strip() if k == "class" else float(row[c]))
                                          for k, c in COLUMNS.items()}
            for _, row in table.iterrows() if not np.isnan(row["subject_ID"])}


def segments(raw_dir: Path, subject: str) -> list[np.ndarray]:
    """A subject's segments ``[n]`` (1 kHz, raw units) in file order ``_1``, ``_2``, ``_3``; a file
    that is not a row of numbers is ``corrupt_file``, a subject without one ``missing_file``."""
    files = sorted((raw_dir / "0_subject").glob(f"{subject}_*.txt"))
    if not files:
        raise CaseSkipped("missing_file", f"no 0_subject/{subject}_<k>.txt")
    out = []
    for f in files:
        try:
            out.append(np.array(f.read_text().split(), dtype=np.float64))
        except ValueError as e:
            raise CaseSkipped("corrupt_file", f"{f.name} is not a row of numbers ({e})") from None
    return out


def fit(parts: list[np.ndarray], how: str, window_s: float) -> list[np.ndarray]:
    """Short segments (1 kHz) -> records of ``window_s`` seconds ``[n]``: one per segment (``tile``:
    the segment repeated end to end; ``pad``: the segment, then its last value held) or one per
    subject (``concat``: the segments end to end, each less its mean, then repeated)."""
    n = int(round(window_s * RATE_HZ))
    if how == "concat":
        return [np.resize(np.concatenate([p - p.mean() for p in parts]), n)]
    if how == "tile":
        return [np.resize(p, n) for p in parts]
    if how == "pad":
        return [np.concatenate([p, np.full(max(n - len(p), 0), p[-1])])[:n] for p in parts]
    raise ConfigError(f"unknown fit {how!r} for PPG-BP's 2.1 s segments (choose one of {', '.join(FITS)})")
