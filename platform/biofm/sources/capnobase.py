"""CapnoBase IEEE TBME benchmark (Karlen et al. 2013) labels, from its published files.

    <dir>/<case>_8min.mat   MATLAB 7.3: signal/{pleth,ecg,co2}/y at param/samplingrate/* Hz (300),
                            read as recordings by :mod:`biofm.sources.arrays` (layout ``capnobase``)
      labels/<s>/artif/x    artifact segments a human rater marked, start/end sample pairs
      labels/<s>/peak/x     beats (pleth, ecg), in samples
      reference/hr/<s>/x,y  heart rate (bpm) from the labelled beats, at times in s
      reference/rr/co2/x,y  respiratory rate (breaths/min) from the capnogram, at times in s

``<s>`` is the file's name for a channel: :data:`SIGNALS`. A case is one subject.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biofm.errors import CaseSkipped
from biofm.sources.arrays import ArrayFile

SIGNALS = {"PPG": "pleth", "ECG": "ecg", "CO2": "co2"}


def _get(file: ArrayFile, where: str) -> np.ndarray:
    x = file.get(where)
    if x is None:
        raise CaseSkipped("missing_track", f"{file.path.name} has no {where}")
    return np.asarray(x, dtype=np.float64).reshape(-1)


def rate_hz(file: ArrayFile, channel: str) -> float:
    return float(_get(file, f"param/samplingrate/{SIGNALS[channel]}")[0])


def artifacts_s(path: Path, channel: str) -> np.ndarray:
    """The rater's artifact segments of ``channel`` (``PPG``, ``ECG``), ``[K, 2]`` start and end in
    seconds from the recording's start; ``[0, 2]`` where the rater marked none."""
    file = ArrayFile(path)
    pairs = _get(file, f"labels/{SIGNALS[channel]}/artif/x")
    if pairs.size % 2:
        raise CaseSkipped("corrupt_file", f"{path.name}: labels/{SIGNALS[channel]}/artif/x holds {pairs.size} values, "
                          "not start/end pairs")
    return pairs.reshape(-1, 2) / rate_hz(file, channel)


def beats_s(path: Path, channel: str) -> np.ndarray:
    """The rater's beat positions of ``channel`` (``PPG``, ``ECG``), ``[n]`` seconds."""
    file = ArrayFile(path)
    return _get(file, f"labels/{SIGNALS[channel]}/peak/x") / rate_hz(file, channel)


def reference(path: Path, trend: str) -> tuple[np.ndarray, np.ndarray]:
    """A reference trend (``hr/ecg``, ``hr/pleth``, ``rr/co2``): times ``[n]`` in seconds and
    values ``[n]`` (bpm, breaths/min)."""
    file = ArrayFile(path)
    return _get(file, f"reference/{trend}/x"), _get(file, f"reference/{trend}/y")
