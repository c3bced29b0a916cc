"""What every reader returns: a recording as pieces of named tracks at native rates.

A ``.vital``, EDF or CSV file is one :class:`Piece`; a multi-segment WFDB record (MIMIC) is one
piece per segment that is present, and names the segments that are absent. Channels are found by the
aliases of ``channels.yaml`` (:func:`match_channels`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from biofm.config import ChannelSpec
from biofm.errors import CaseSkipped

Tracks = dict[str, tuple[np.ndarray, float, str]]  # channel -> (samples [n] float64, NaN in gaps; Hz; name in the file)


@dataclasses.dataclass
class Piece:
    """A stretch where the tracks run together: ``start_s`` s after the recording's start;
    ``label`` names it in skip reasons (a WFDB segment's name, or the file's)."""

    start_s: float
    tracks: Tracks
    label: str


@dataclasses.dataclass
class Recording:
    """``pieces`` in time order. ``found``: the signal names the recording holds. ``absent``: parts
    its header names that are not there (WFDB segments). ``incomplete``: pieces left out for a
    channel they lack (label -> channels)."""

    pieces: list[Piece]
    found: list[str]
    absent: list[str] = dataclasses.field(default_factory=list)
    incomplete: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def require(self, channels) -> Recording:
        """The pieces that hold every channel in ``channels`` (those channels only); the others go
        to ``incomplete``. None left: ``no_matching_channel`` naming the signals found."""
        kept, incomplete = [], dict(self.incomplete)
        for piece in self.pieces:
            lacking = [c for c in channels if c not in piece.tracks]
            if lacking:
                incomplete[piece.label] = lacking
            else:
                kept.append(Piece(piece.start_s, {c: piece.tracks[c] for c in channels}, piece.label))
        if not kept:
            lacking = [c for c in channels if any(c in v for v in incomplete.values())] or list(channels)
            raise CaseSkipped("no_matching_channel", f"no {' or '.join(lacking)} signal among "
                              f"{', '.join(self.found) or 'no signals'} (channels.yaml: tracks and aliases)")
        return Recording(kept, self.found, self.absent, incomplete)

    def names(self) -> dict[str, str]:
        """``{channel: the name it was found under}`` (the first piece's)."""
        return {c: name for c, (_, _, name) in self.pieces[0].tracks.items()} if self.pieces else {}


def match_channels(names: list[str], channels: dict[str, ChannelSpec]) -> dict[str, int]:
    """``{channel: index into names}`` for the channels whose aliases (or own name) ``names`` holds:
    case-insensitive, spaces trimmed, the first alias found wins."""
    index = {}
    for i, n in enumerate(names):
        index.setdefault(n.strip().upper(), i)
    out = {}
    for channel, spec in channels.items():
        for alias in (*spec.aliases, channel):
            if alias.upper() in index:
                out[channel] = index[alias.upper()]
                break
    return out


def check_track(channel: str, name: str, x: np.ndarray) -> None:
    """A track with no finite sample, or a constant one, cannot be windowed: ``empty_track`` or
    ``flat_track``. (``fmin``/``fmax`` skip NaN in one pass, without a copy.)"""
    lo, hi = np.fmin.reduce(x, initial=np.inf), np.fmax.reduce(x, initial=-np.inf)
    if not np.isfinite(lo):
        raise CaseSkipped("empty_track", f"{channel} track {name} has no valid samples (all NaN)")
    if lo == hi:
        raise CaseSkipped("flat_track", f"{channel} track {name} is flat (constant {lo:g})")
