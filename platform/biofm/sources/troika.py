"""IEEE Signal Processing Cup 2015 (TROIKA) labels, from the published files.

    training part, one recording per subject:
    <dir>/DATA_<nn>_TYPE0<k>.mat            sig [6, N] at 125 Hz (ECG, PPG, PPG, ACC x/y/z), read as
                                            recordings by :mod:`biofm.sources.arrays` (layout ``troika``)
    <dir>/DATA_<nn>_TYPE0<k>_BPMtrace.mat   BPM0 [L, 1]: the ECG-derived heart rate (bpm) of each 8 s
                                            window; window i covers seconds 2i to 2i + 8
    test part, subject <nn>'s recordings <mm>:
    <dir>/TEST_S<nn>_T<mm>.mat              sig [5, N] at 125 Hz (PPG, PPG, ACC x/y/z; no ECG), layout
                                            ``troika_test``
    <dir>/True_S<nn>_T<mm>.mat              BPM0 [L, 1], the same 8 s windows

The protocol (Zhang et al., IEEE TBME 2015): rest for 30 s, run for 4 min on a treadmill, rest for
30 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biofm.errors import CaseSkipped
from biofm.sources.arrays import ArrayFile

WINDOW_S, STEP_S = 8.0, 2.0
REST_S = 30.0


def subject_of(recording: str) -> str:
    """The subject of a recording id: ``DATA_<nn>_TYPE0<k>`` -> ``train_<nn>``, ``TEST_S<nn>_T<mm>``
    -> ``test_S<nn>`` (the parts' subjects are numbered apart)."""
    parts = recording.split("_")
    return f"test_{parts[1]}" if parts[0] == "TEST" else f"train_{parts[1]}"


def heart_rate(recording: Path) -> tuple[np.ndarray, np.ndarray]:
    """The reference heart rate of a recording (``DATA_<nn>_TYPE0<k>.mat`` with its ``_BPMtrace``
    file beside it, or ``TEST_S<nn>_T<mm>.mat`` with ``True_S<nn>_T<mm>.mat``): the start of each
    8 s window ``[L]`` in seconds and its rate ``[L]`` in bpm."""
    trace = (recording.with_name(f"True_{recording.stem.removeprefix('TEST_')}.mat") if recording.stem.startswith("TEST_")
             else recording.with_name(f"{recording.stem}_BPMtrace.mat"))
    if not trace.is_file():
        raise CaseSkipped("missing_file", f"{recording.name} has no {trace.name} beside it")
    bpm = ArrayFile(trace).get("BPM0")
    if bpm is None:
        raise CaseSkipped("missing_track", f"{trace.name} has no BPM0")
    bpm = np.asarray(bpm, dtype=np.float64).reshape(-1)
    return np.arange(len(bpm)) * STEP_S, bpm
