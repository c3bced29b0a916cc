"""EDF, EDF+ and BDF recordings (NSRR sleep studies: MESA, SHHS, CFS), one file per recording.

Read with ``edfio``: maintained, numpy only, reads EDF/EDF+/BDF and writes them (the tests' fixtures).
Signals are physical values at each signal's own rate; EDF+ annotation signals are left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biofm.config import ChannelSpec
from biofm.errors import CaseSkipped
from biofm.sources.recording import Piece, Recording, check_track, match_channels

SUFFIXES = (".edf", ".bdf")


def _check_length(path: Path, sample_bytes: int) -> None:
    """A file shorter than its header's data records is ``corrupt_file`` (edfio only warns, and
    reads fewer records). A header of unknown length (-1 records, a recording in progress) passes;
    EDF+D (records with gaps between them) is ``unsupported_format``."""
    with open(path, "rb") as f:
        head = f.read(256)
        if head[192:197] == b"EDF+D":
            raise CaseSkipped("unsupported_format", f"{path.name} is EDF+D (discontinuous: its data records are not "
                              "contiguous in time), which is not read yet; convert it to continuous EDF+C files")
        header_bytes, records, ns = int(head[184:192]), int(head[236:244]), int(head[252:256])
        f.seek(256 + ns * 216)
        per_record = sum(int(f.read(8)) for _ in range(ns))
    expected = header_bytes + records * per_record * sample_bytes
    if records >= 0 and path.stat().st_size < expected:
        raise CaseSkipped("corrupt_file", f"{path.name} is truncated: its header promises {records} data records "
                          f"({expected} bytes), the file holds {path.stat().st_size} bytes")


def read(path: Path, channels: dict[str, ChannelSpec]) -> Recording:
    """One EDF/BDF file -> one piece with the channels it holds. A file edfio cannot parse
    (truncated, not EDF) is ``corrupt_file``."""
    import edfio

    bdf = path.suffix.lower() == ".bdf"
    try:
        _check_length(path, 3 if bdf else 2)
        edf = (edfio.read_bdf if bdf else edfio.read_edf)(path, lazy_load_data=True)
        signals = list(edf.signals)
    except CaseSkipped:
        raise
    except Exception as e:  # edfio raises ValueError, EOFError or OSError for files it cannot parse
        raise CaseSkipped("corrupt_file", f"{path.name} is not a readable EDF file ({type(e).__name__}: {e})") from None
    labels = [s.label for s in signals]
    tracks = {}
    for channel, i in match_channels(labels, channels).items():
        try:
            x = np.asarray(signals[i].data, dtype=np.float64)
        except Exception as e:  # the data records end before the header says
            raise CaseSkipped("corrupt_file", f"{path.name}: signal {labels[i]} cannot be read "
                              f"({type(e).__name__}: {e}); the file is truncated?") from None
        check_track(channel, labels[i], x)
        tracks[channel] = (x, float(signals[i].sampling_frequency), labels[i])
    return Recording([Piece(0.0, tracks, path.name)], labels)
