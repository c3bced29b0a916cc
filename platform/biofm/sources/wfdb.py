"""WFDB records (PhysioNet: the MIMIC-III/IV Waveform Database, BIDMC, MIT-BIH), read with ``wfdb``.

A record is a ``.hea`` header and its signal files. A multi-segment record (MIMIC's
``p000878-2137-10-26-16-57``) names its segments in order with their lengths; ``~`` marks a gap and
``*_layout`` a header without samples. Each segment present is one piece at its offset; segments
whose files are absent are named in ``absent``, so a partial download gives what it holds.
Record ids come from ``RECORDS`` files (PhysioNet lists folders as ``p00/`` lines) or, where there
are none, from the headers that no multi-segment record names as its segment.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from pathlib import Path

import numpy as np

from biofm.config import ChannelSpec
from biofm.errors import CaseSkipped, ConfigError
from biofm.sources.recording import Piece, Recording, check_track, match_channels

SUFFIXES = (".hea",)
Fetch = Callable[[str], Path | None]  # a path relative to the source's root -> a local copy, None if absent


def _segments(header_text: str) -> list[str]:
    """The segment names a header lists (none for a single-segment header)."""
    lines = [x.split("#")[0].strip() for x in header_text.splitlines()]
    lines = [x for x in lines if x]
    if not lines or "/" not in lines[0].split()[0]:
        return []
    return [x.split()[0] for x in lines[1:]]


def record_ids(files: list[str], read_text: Callable[[str], str]) -> dict[str, str]:
    """``{record id: its path less .hea, relative to the root}`` from ``files`` (every relative file
    path under the root). Ids are the records' names; two records of one name are refused."""
    if "RECORDS" in files:
        stems, todo = [], ["RECORDS"]
        while todo:
            listing = todo.pop(0)
            folder = posixpath.dirname(listing)
            for line in read_text(listing).splitlines():
                line = line.strip()
                if line.endswith("/"):
                    todo.append(posixpath.join(folder, line, "RECORDS"))
                elif line:
                    stems.append(posixpath.join(folder, line))
        stems = [s for s in stems if f"{s}.hea" in files or posixpath.join(s, posixpath.basename(s) + ".hea") in files]
    else:
        stems = [f[:-4] for f in files if f.endswith(".hea")]
        named = {posixpath.join(posixpath.dirname(s), seg) for s in stems for seg in _segments(read_text(f"{s}.hea"))}
        stems = [s for s in stems if s not in named and not s.endswith("_layout")]
    out = {}
    for stem in stems:
        rid = posixpath.basename(stem)
        if rid in out:
            raise ConfigError(f"two WFDB records are named {rid}: {out[rid]} and {stem}")
        out[rid] = stem
    return out


def _header(fetch: Fetch, stem: str):
    import wfdb

    path = fetch(f"{stem}.hea")
    if path is None:
        return None
    try:
        return wfdb.rdheader(str(path)[:-4])
    except Exception as e:  # wfdb raises ValueError, IndexError ... for a header it cannot parse
        raise CaseSkipped("corrupt_file", f"{posixpath.basename(stem)}.hea cannot be parsed "
                          f"({type(e).__name__}: {e})") from None


def _segment(fetch: Fetch, stem: str, channels: dict[str, ChannelSpec], header=None) -> tuple[dict, list[str], str | None]:
    """One single-segment record (``header``: its header, when already read) -> ``(tracks,
    signal names, why it is absent or None)``."""
    import wfdb

    header = header or _header(fetch, stem)
    if header is None:
        return {}, [], "no header"
    names = list(header.sig_name or [])
    matched = match_channels(names, channels)
    if not matched:
        return {}, names, None
    folder = posixpath.dirname(stem)
    missing = sorted({f for f in header.file_name if fetch(posixpath.join(folder, f)) is None})
    if missing:
        return {}, names, f"no {', '.join(missing)}"
    try:
        rec = wfdb.rdrecord(str(fetch(f"{stem}.hea"))[:-4], channel_names=[names[i] for i in matched.values()],
                            smooth_frames=False)  # each signal at its own rate (fs x samples per frame)
    except Exception as e:  # a signal file shorter than its header says, or not in its format
        raise CaseSkipped("corrupt_file", f"{posixpath.basename(stem)}: wfdb cannot read its samples "
                          f"({type(e).__name__}: {e})") from None
    tracks = {}
    for channel, (k, name) in zip(matched, enumerate(rec.sig_name)):
        x = np.asarray(rec.e_p_signal[k], dtype=np.float64)
        check_track(channel, name, x)
        tracks[channel] = (x, float(rec.fs) * rec.samps_per_frame[k], name)
    return tracks, names, None


def read(fetch: Fetch, stem: str, channels: dict[str, ChannelSpec]) -> Recording:
    """A record (``stem``: its path less ``.hea``) -> its pieces. A single-segment record whose
    signal file is absent is ``missing_file``; a multi-segment record with no segment present,
    ``missing_file`` naming what is absent."""
    import wfdb

    header = _header(fetch, stem)
    rid = posixpath.basename(stem)
    if header is None:
        raise CaseSkipped("not_found", f"no {rid}.hea")
    if not isinstance(header, wfdb.MultiRecord):
        tracks, names, absent = _segment(fetch, stem, channels, header)
        if absent:
            raise CaseSkipped("missing_file", f"{rid}.hea is there but its signal file is not ({absent})")
        return Recording([Piece(0.0, tracks, rid)], names)
    folder, fs = posixpath.dirname(stem), float(header.fs)
    pieces, found, absent, offset = [], [], [], 0
    for name, length in zip(header.seg_name, header.seg_len):
        if name != "~" and not name.endswith("_layout"):
            tracks, names, why = _segment(fetch, posixpath.join(folder, name), channels)
            found += [n for n in names if n not in found]
            if why:
                absent.append(f"{name} ({why})")
            else:
                pieces.append(Piece(offset / fs, tracks, name))
        offset += int(length)
    if not pieces:
        raise CaseSkipped("missing_file", f"{rid}: none of its {len(absent)} segments is present "
                          f"({', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''})")
    return Recording(pieces, found, absent)
