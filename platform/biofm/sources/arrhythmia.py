"""The PPG arrhythmia set (Liu et al., JAHA 2022) in its published layout: one MATLAB file per patient.

    <raw_dir>/MPA_<id>.mat    ppgseg [N, 1000]: 10 s segments of fingertip PPG at 100 Hz
                              labels [N, 1]: 0 sinus, 1 PVC, 2 PAC, 3 VT, 4 SVT, 5 AF

A patient is one file (the patient id is the file's stem), and the subject to split by.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biofm.errors import CaseSkipped, ConfigError

RATE_HZ = 100.0
SEGMENT_S = 10.0
RHYTHMS = ("sinus", "PVC", "PAC", "VT", "SVT", "AF")


def patients(raw_dir: Path) -> list[str]:
    """The patient ids (file stems) of ``raw_dir``, sorted."""
    ids = sorted(p.stem for p in raw_dir.glob("MPA_*.mat"))
    if not ids:
        raise ConfigError(f"{raw_dir} holds no MPA_<id>.mat files: point --raw-dir at the PPG arrhythmia "
                          "set (one MATLAB file per patient, with ppgseg and labels)")
    return ids


def read_patient(raw_dir: Path, patient: str) -> tuple[np.ndarray, np.ndarray]:
    """One patient's segments ``[N, T]`` float64 (PPG at :data:`RATE_HZ`) and rhythm labels ``[N]``
    int64 (indices into :data:`RHYTHMS`, unchecked). A file that is not MATLAB, or lacks
    ``ppgseg``/``labels``, or whose two disagree, raises :class:`CaseSkipped`."""
    import scipy.io

    path = raw_dir / f"{patient}.mat"
    try:
        mat = scipy.io.loadmat(path, variable_names=("ppgseg", "labels"))
    except Exception as e:  # scipy raises ValueError, TypeError or OSError for files it cannot parse
        raise CaseSkipped("corrupt_file", f"{path.name} is not a readable MATLAB file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("ppgseg", "labels") if k not in mat]
    if missing:
        raise CaseSkipped("missing_track", f"{path.name} has no {' or '.join(missing)}")
    segments, labels = np.asarray(mat["ppgseg"], dtype=np.float64), np.asarray(mat["labels"]).reshape(-1)
    if segments.ndim != 2 or len(segments) != len(labels):
        raise CaseSkipped("corrupt_file", f"{path.name}: ppgseg {list(segments.shape)} and labels "
                          f"{list(np.shape(mat['labels']))} do not pair up one segment per label")
    return segments, labels.astype(np.int64)
