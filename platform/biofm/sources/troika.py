"""IEEE Signal Processing Cup 2015 (TROIKA) labels, from the published files.

    <dir>/DATA_<nn>_TYPE0<k>.mat            sig [6, N] at 125 Hz (ECG, PPG, PPG, ACC x/y/z), read as
                                            recordings by :mod:`biofm.sources.arrays` (layout ``troika``)
    <dir>/DATA_<nn>_TYPE0<k>_BPMtrace.mat   BPM0 [L, 1]: the ECG-derived heart rate (bpm) of each 8 s
                                            window; window i covers seconds 2i to 2i + 8

The protocol (Zhang et al., IEEE TBME 2015): rest for 30 s, run for 4 min on a treadmill, rest for
30 s. A recording is one subject.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biofm.errors import CaseSkipped
from biofm.sources.arrays import ArrayFile

WINDOW_S, STEP_S = 8.0, 2.0
REST_S = 30.0


def heart_rate(recording: Path) -> tuple[np.ndarray, np.ndarray]:
    """The reference heart rate of a recording (``DATA_<nn>_TYPE0<k>.mat``, its ``_BPMtrace`` file
    beside it): the start of each 8 s window ``[L]`` in seconds and its rate ``[L]`` in bpm."""
    trace = recording.with_name(f"{recording.stem}_BPMtrace.mat")
    if not trace.is_file():
        raise CaseSkipped("missing_file", f"{recording.name} has no {trace.name} beside it")
    bpm = ArrayFile(trace).get("BPM0")
    if bpm is None:
        raise CaseSkipped("missing_track", f"{trace.name} has no BPM0")
    bpm = np.asarray(bpm, dtype=np.float64).reshape(-1)
    return np.arange(len(bpm)) * STEP_S, bpm
