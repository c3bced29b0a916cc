"""CSV and TSV recordings (BIDMC's published CSVs, NeuroKit exports), one file per recording.

One column per signal, named in the header row; the rate comes from a time column (``Time [s]``,
``time``, ``Time (ms)``) or, where there is none, from ``--rate-hz``. Empty cells are gaps (NaN).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from biofm.config import ChannelSpec
from biofm.errors import CaseSkipped
from biofm.sources.recording import Piece, Recording, check_track, match_channels

SUFFIXES = (".csv", ".tsv")
_TIME = re.compile(r"^\s*(time|t|timestamp|seconds|sec)\b\s*(\[|\()?\s*(?P<unit>ms|s)?", re.I)


def _rate_from_time(name: str, t: np.ndarray, where: str) -> float:
    """Samples per second over the whole column: exports round their times (BIDMC's to 10 ms
    past 100 s), so neighbouring steps are not to be trusted, the span is."""
    unit = (_TIME.match(name).group("unit") or "s").lower()
    t = t[np.isfinite(t)]
    if t.size < 2 or np.any(np.diff(t) < 0) or t[-1] <= t[0]:
        raise CaseSkipped("corrupt_file", f"{where}: time column {name!r} does not increase")
    span_s = (t[-1] - t[0]) / (1000.0 if unit == "ms" else 1.0)
    return round(float((t.size - 1) / span_s), 6)


def read(path: Path, channels: dict[str, ChannelSpec], rate_hz: float | None = None) -> Recording:
    """One CSV/TSV file -> one piece with the channels its columns hold. Text in a signal column
    is ``corrupt_file`` (naming the row); no time column and no ``rate_hz``, ``no_sample_rate``."""
    import pandas as pd

    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        table = pd.read_csv(path, sep=sep, skipinitialspace=True)
    except Exception as e:  # pandas raises ParserError, UnicodeDecodeError, EmptyDataError
        raise CaseSkipped("corrupt_file", f"{path.name} is not a readable table ({type(e).__name__}: {e})") from None
    names = [str(c).strip() for c in table.columns]
    time_col = next((i for i, n in enumerate(names) if _TIME.match(n)), None)
    matched = match_channels([n if i != time_col else "" for i, n in enumerate(names)], channels)

    def numbers(i: int) -> np.ndarray:
        column = table.iloc[:, i]
        if pd.api.types.is_numeric_dtype(column):
            return column.to_numpy(np.float64)
        cells = column.astype(str).str.strip()  # text somewhere: find the first cell that is not a number
        values = pd.to_numeric(cells, errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(np.isnan(values) & ~cells.str.lower().isin(["", "nan", "na"]).to_numpy())
        if bad.size:
            raise CaseSkipped("corrupt_file", f"{path.name}: column {names[i]!r} holds text at row "
                              f"{bad[0] + 2} ({cells.iloc[bad[0]]!r}) and {bad.size - 1} more")
        return values

    if time_col is not None:
        rate = _rate_from_time(names[time_col], numbers(time_col), path.name)
    elif rate_hz:
        rate = float(rate_hz)
    else:
        raise CaseSkipped("no_sample_rate", f"{path.name} has no time column (columns: {', '.join(names)}): "
                          "pass --rate-hz")
    tracks = {}
    for channel, i in matched.items():
        x = numbers(i)
        check_track(channel, names[i], x)
        tracks[channel] = (x, rate, names[i])
    return Recording([Piece(0.0, tracks, path.name)], [n for i, n in enumerate(names) if i != time_col])
