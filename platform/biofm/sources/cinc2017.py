"""PhysioNet/CinC Challenge 2017 (AF from a single-lead ECG) labels, from the published files.

    <dir>/A<nnnnn>.mat   val [1, N]: one ECG lead at 300 Hz, 9-60 s (layout ``cinc2017`` of
                         :mod:`biofm.sources.arrays`; read with the ``array:`` prefix, as the folder
                         also holds the records' WFDB headers)
    <dir>/REFERENCE.csv  <record>,<class>: N (normal), A (atrial fibrillation), O (other rhythm),
                         ~ (too noisy to classify)

No subject ids are published: a record is its own subject. The challenge's score is the mean of
the F1 of N, A and O over records (Clifford et al., CinC 2017).
"""

from __future__ import annotations

import csv
from pathlib import Path

from biofm.errors import ConfigError

CLASSES = ("N", "A", "O", "~")   # the task's classes, in this order: normal, AF, other, noisy
SCORED = ("N", "A", "O")


def references(raw_dir: Path) -> dict[str, str]:
    """``{record: class}`` from ``REFERENCE.csv``; a class outside :data:`CLASSES` is an error naming it."""
    path = raw_dir / "REFERENCE.csv"
    if not path.is_file():
        raise ConfigError(f"{raw_dir} holds no REFERENCE.csv: point --raw-dir at the CinC 2017 records "
                          "(A<nnnnn>.mat and .hea, REFERENCE.csv)")
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    out = {r[0].strip(): r[1].strip() for r in rows}
    unknown = sorted({c for c in out.values() if c not in CLASSES})
    if unknown:
        raise ConfigError(f"{path}: classes {unknown} are not the challenge's {list(CLASSES)}")
    return out
