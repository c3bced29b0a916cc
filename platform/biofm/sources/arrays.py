"""MATLAB (``.mat``: v4-v7 with scipy, v7.3 with h5py) and NumPy (``.npz``, ``.npy``) recordings.

One file is one recording. A layout (``configs/layouts.yaml``: CapnoBase, TROIKA) says which
variable, struct path or row of an array holds which signal, and the rate; the first layout whose
``files`` glob fits the file's name is used. A file no layout fits is read as generic: every
top-level variable with one non-singleton dimension is a signal named by the variable, and the
rate comes from a scalar variable (:data:`RATE_NAMES`) or ``--rate-hz``. A ``.npy`` file holds
one array, named ``arr_0`` (NumPy's name for it in an ``.npz``). MATLAB 7.3 stores arrays
transposed; they are read in MATLAB's orientation, so ``sig[1]`` is row 1 in both versions.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import numpy as np

from biofm.config import ArrayLayout, ChannelSpec, LayoutsConfig, load_config
from biofm.errors import CaseSkipped
from biofm.sources.recording import Piece, Recording, check_track, match_channels

SUFFIXES = (".mat", ".npz", ".npy")
RATE_NAMES = ("fs", "fs_hz", "srate", "sample_rate", "sampling_rate", "rate_hz")
_ROW = re.compile(r"^(?P<var>[^\[\]]*)\[(?P<row>\d+)\]$")


def layouts() -> dict[str, ArrayLayout]:
    """The named layouts of ``configs/layouts.yaml``."""
    return load_config(LayoutsConfig, "configs/layouts.yaml").layouts


def layout_for(name: str, known: dict[str, ArrayLayout]) -> ArrayLayout | None:
    """The first layout whose ``files`` glob fits the file name ``name``; None: generic."""
    return next((lay for lay in known.values() if fnmatch.fnmatch(name, lay.files)), None)


def is_label_file(name: str, known: dict[str, ArrayLayout]) -> bool:
    """Whether ``name`` is a layout's label file (TROIKA's ``*_BPMtrace.mat``): not a recording."""
    return any(lay.labels and fnmatch.fnmatch(name, lay.labels) for lay in known.values())


class ArrayFile:
    """The variables of one MATLAB or NumPy file, read on demand by name or struct path."""

    def __init__(self, path: Path):
        self.path = path
        suffix = path.suffix.lower()
        try:
            if suffix == ".npy":
                self._vars = {"arr_0": np.load(path, allow_pickle=False)}
            elif suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    self._vars = {k: z[k] for k in z.files}
            else:
                self._vars = _read_mat(path)
        except CaseSkipped:
            raise
        except Exception as e:  # scipy, h5py and numpy raise ValueError, OSError, KeyError ... for files they cannot parse
            raise CaseSkipped("corrupt_file", f"{path.name} is not a readable {suffix} file "
                              f"({type(e).__name__}: {e})") from None

    def names(self) -> list[str]:
        """The top-level variable names."""
        return sorted(self._vars)

    def get(self, where: str) -> np.ndarray | None:
        """The array at ``where``: a name, a struct path ``a/b/c`` or a row ``name[k]``; None where
        there is no such variable. A row beyond the array's is ``corrupt_file``."""
        m = _ROW.match(where)
        node = self._vars
        for part in (m.group("var") if m else where).split("/"):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                return None
        if callable(node):
            node = node()
        array = np.asarray(node)
        if m is None:
            return array
        row = int(m.group("row"))
        if array.ndim == 1 and row == 0:  # scipy reads MATLAB's [1, N] squeezed to [N]
            return array
        if array.ndim != 2 or row >= array.shape[0]:
            raise CaseSkipped("corrupt_file", f"{self.path.name}: {where} asks for row {row} of "
                              f"{m.group('var')}, an array of shape {list(array.shape)}")
        return array[row]


def _read_mat(path: Path) -> dict:
    """A MATLAB file's variables as nested dicts: arrays (v4-v7, scipy) or loaders (v7.3, h5py)."""
    import h5py

    if not h5py.is_hdf5(path):
        import scipy.io

        return {k: v for k, v in scipy.io.loadmat(path, simplify_cells=True).items() if not k.startswith("__")}
    f = h5py.File(path, "r")

    def tree(group) -> dict:
        out = {}
        for key, item in group.items():
            if isinstance(item, h5py.Group):
                out[key] = tree(item)
            elif item.attrs.get("MATLAB_empty"):
                out[key] = np.zeros((0,))
            else:  # MATLAB writes column-major: reverse the axes for MATLAB's orientation
                out[key] = lambda item=item: np.asarray(item[()]).T
        return out

    return tree(f)


def _rate(file: ArrayFile, rate_hz: float | str | None, given: float | None) -> float:
    """A layout's rate (a number or a variable), else ``given`` (--rate-hz), else a rate variable."""
    where = rate_hz if isinstance(rate_hz, str) else None
    value = rate_hz if isinstance(rate_hz, (int, float)) else given
    if value is None and where is None:
        where = next((n for n in RATE_NAMES if n in file.names()), None)
    if where is not None:
        found = file.get(where)
        if found is None or found.size != 1:
            raise CaseSkipped("no_sample_rate", f"{file.path.name}: no scalar {where} to read the rate from")
        value = float(found.reshape(-1)[0])
    if value is None:
        raise CaseSkipped("no_sample_rate", f"{file.path.name} names no rate (a variable {', '.join(RATE_NAMES)}): "
                          "pass --rate-hz")
    if not np.isfinite(value) or value <= 0:
        raise CaseSkipped("no_sample_rate", f"{file.path.name}: the rate {value} Hz is not a positive number")
    return float(value)


def read(path: Path, channels: dict[str, ChannelSpec], rate_hz: float | None = None,
         known: dict[str, ArrayLayout] | None = None) -> Recording:
    """One MATLAB/NumPy file -> one piece with the channels its signals hold (by ``channels``'
    aliases), each at the file's rate. ``known``: the layouts (default :func:`layouts`)."""
    known = layouts() if known is None else known
    file = ArrayFile(path)
    layout = layout_for(path.name, known)
    if layout is not None:
        where = {name: v for name, v in layout.signals.items() if file.get(_variable(v)) is not None}
        found = list(where)
    else:
        where = {n: n for n in file.names() if n not in RATE_NAMES and _is_signal(file.get(n))}
        found = file.names()
    matched = match_channels(list(where), channels)
    tracks = {}
    if matched:
        rate = _rate(file, layout.rate_hz if layout else None, rate_hz)
        names = list(where)
        for channel, i in matched.items():
            x = np.asarray(file.get(where[names[i]]), dtype=np.float64)
            if sum(d > 1 for d in x.shape) != 1:
                raise CaseSkipped("corrupt_file", f"{path.name}: {where[names[i]]} has shape {list(x.shape)}, "
                                  "not one signal")
            x = x.reshape(-1)
            check_track(channel, names[i], x)
            tracks[channel] = (x, rate, names[i])
    return Recording([Piece(0.0, tracks, path.name)], found)


def _variable(where: str) -> str:
    """The variable of ``name[k]``, or ``where`` itself."""
    m = _ROW.match(where)
    return m.group("var") if m else where


def _is_signal(x: np.ndarray | None) -> bool:
    return x is not None and x.dtype.kind in "iuf" and sum(d > 1 for d in x.shape) == 1
