"""VitalDB recordings: case sets, and reading one case from the API, a mirror or cloud storage.

A source turns a case id into a local ``.vital`` file (:meth:`local_file`); :func:`read_file`
decodes it into native-rate signals (a :class:`~biofm.sources.recording.Recording`). Every way a case can be unusable raises
:class:`~biofm.errors.CaseSkipped` with a reason code.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import urllib.error
import urllib.parse
from isal import isal_zlib as zlib  # ISA-L: the same API as zlib, 2.2x faster to inflate
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vitaldb

from biofm import storage
from biofm.config import ChannelSpec
from biofm.errors import BiofmError, CaseSkipped, SourceUnreachable
from biofm.sources import http
from biofm.sources.recording import Piece, Recording, Tracks, check_track

DEFAULT_API_URL = f"{vitaldb.dataset.api_url}/{vitaldb.dataset.DATASET_VERSION}"


def case_sets() -> dict[str, list[str]]:
    """The case sets the ``vitaldb`` package ships (``bis``, ``tiva``, ...): name -> sorted ids."""
    return {
        name[len("caseids_"):]: [str(c) for c in sorted(getattr(vitaldb, name))]
        for name in dir(vitaldb)
        if name.startswith("caseids_") and isinstance(getattr(vitaldb, name), (set, list))
    }


def _temp_copy(chunks: Iterator[bytes]) -> Path:
    fd, name = tempfile.mkstemp(suffix=".vital", prefix="biofm-")
    with os.fdopen(fd, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
    return Path(name)


class _VitalSource:
    """What the three ``.vital`` sources share: :meth:`read` through their ``local_file``."""

    def read(self, case_id: str, channels: dict[str, ChannelSpec]) -> Recording:
        with self.local_file(case_id) as path:
            return read_file(path, channels)


@dataclass(frozen=True)
class ApiSource(_VitalSource):
    """The VitalDB open-dataset API (or any server laid out like it): ``GET {base_url}/{id}.vital``.

    Connection errors and HTTP 5xx are retried ``retries`` times with exponential backoff
    starting at ``backoff_s``; HTTP 404 means the case does not exist.
    """

    base_url: str = DEFAULT_API_URL
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    def describe(self) -> str:
        return self.base_url

    def url(self, case_id: str) -> str:
        name = str(int(case_id)) if case_id.isdigit() else case_id
        return f"{self.base_url.rstrip('/')}/{urllib.parse.quote(name)}.vital"

    def check_reachable(self) -> None:
        """Raise :class:`SourceUnreachable` when no HTTP server answers at ``base_url``."""
        try:
            http.get(self.base_url.rstrip("/") + "/", 2, self.timeout_s, self.backoff_s)
        except urllib.error.HTTPError:
            return  # the server answered (a 403/404 for the folder itself is fine)
        except OSError as e:
            raise SourceUnreachable(
                f"cannot reach the VitalDB API at {self.base_url} ({_reason(e)}). "
                "Check the network or --api-url, or point --source at a local copy of the "
                ".vital files (a folder, e.g. PhysioNet's vitaldb/1.0.0/vital_files)."
            ) from None

    @contextlib.contextmanager
    def local_file(self, case_id: str) -> Iterator[Path]:
        url = self.url(case_id)
        try:
            response = http.get(url, self.retries + 1, self.timeout_s, self.backoff_s)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise CaseSkipped("not_found", f"{url} answered 404 Not Found") from None
            raise CaseSkipped("http_error", f"{url} answered HTTP {e.code} after "
                              f"{self.retries + 1} attempts", retryable=True) from None
        except OSError as e:
            raise CaseSkipped("unreachable", f"{url}: {_reason(e)} after {self.retries + 1} "
                              "attempts", retryable=True) from None
        with response:
            path = _temp_copy(iter(lambda: response.read(1 << 20), b""))
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


def _reason(e: OSError) -> str:
    return str(getattr(e, "reason", None) or e)


@dataclass(frozen=True)
class DirectorySource(_VitalSource):
    """A folder of ``.vital`` files: ``<root>/<id>.vital`` or PhysioNet's ``<root>/vital_files/``.

    Numeric ids also match zero-padded names (``1`` -> ``0001.vital``).
    """

    root: str

    def describe(self) -> str:
        return str(Path(self.root).resolve())

    def check_reachable(self) -> None:
        if not Path(self.root).is_dir():
            raise SourceUnreachable(f"source folder {self.root} does not exist")

    def ids(self) -> list[str]:
        root = Path(self.root)
        return sorted({p.stem for p in root.glob("*.vital")} | {p.stem for p in root.glob("vital_files/*.vital")})

    def candidates(self, case_id: str) -> list[Path]:
        names = [case_id] + ([f"{int(case_id):04d}"] if case_id.isdigit() else [])
        root = Path(self.root)
        return [d / f"{n}.vital" for d in (root, root / "vital_files") for n in names]

    @contextlib.contextmanager
    def local_file(self, case_id: str) -> Iterator[Path]:
        for path in self.candidates(case_id):
            if path.is_file():
                yield path
                return
        raise CaseSkipped("not_found", f"no {case_id}.vital under {self.root}")


@dataclass(frozen=True)
class CloudSource(_VitalSource):
    """``.vital`` files under a cloud URI (``s3://bucket/prefix``, ``gs://...``), read through
    :mod:`biofm.storage`, so credentials come from the usual environment."""

    uri: str

    def describe(self) -> str:
        return self.uri

    def check_reachable(self) -> None:
        try:
            found = storage.is_dir(self.uri)
        except (OSError, BiofmError) as e:
            raise SourceUnreachable(f"cannot reach {self.uri}: {e}") from None
        if not found:
            raise SourceUnreachable(f"nothing at {self.uri}: no such bucket or prefix of .vital files")

    def ids(self) -> list[str]:
        return sorted(Path(name).stem for name in storage.list_files(self.uri, ".vital"))

    @contextlib.contextmanager
    def local_file(self, case_id: str) -> Iterator[Path]:
        fs, root = storage.filesystem(self.uri)
        names = [case_id] + ([f"{int(case_id):04d}"] if case_id.isdigit() else [])
        for name in names:
            try:
                with fs.open_input_stream(f"{root}/{name}.vital") as f:
                    path = _temp_copy(iter(lambda: f.read(1 << 20), b""))
                break
            except FileNotFoundError:
                continue
            except OSError as e:
                raise CaseSkipped("unreachable", f"{self.uri}/{name}.vital: {e}", retryable=True) from None
        else:
            raise CaseSkipped("not_found", f"no {case_id}.vital under {self.uri}")
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)


def _check_container(path: Path) -> None:
    """Check that ``path`` is a complete gzip stream holding a Vital file (``VITA`` signature).

    The ``vitaldb`` reader stops silently at a truncated stream, so truncation is caught here.
    """
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    head = b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                out = inflater.decompress(chunk)
                if len(head) < 4:
                    head += out[:4]
                while inflater.unused_data and inflater.eof:  # concatenated gzip members
                    rest, inflater = inflater.unused_data, zlib.decompressobj(zlib.MAX_WBITS | 16)
                    inflater.decompress(rest)
    except zlib.error as e:
        raise CaseSkipped("corrupt_file", f"not a valid gzip stream ({e})") from None
    if not inflater.eof:
        raise CaseSkipped("corrupt_file", "file is truncated (gzip stream ends early)")
    if head[:4] != b"VITA":
        raise CaseSkipped("corrupt_file", "not a Vital file (no VITA signature)")


def read_file(path: Path, channels: dict[str, ChannelSpec]) -> Recording:
    """A ``.vital`` file -> one piece with the channels whose tracks it holds, at their native
    rates, every channel on the file's common time axis (sample 0 at the file's start)."""
    _check_container(path)
    wanted = [t for spec in channels.values() for t in spec.tracks]
    vf = vitaldb.VitalFile()
    messages = io.StringIO()
    with contextlib.redirect_stdout(messages):
        ok = vf.load_vital(str(path), track_names=wanted)
    if not ok:
        raise CaseSkipped("corrupt_file", f"vitaldb could not parse the file: "
                          f"{messages.getvalue().strip() or 'unknown error'}")
    tracks = {}
    for name, spec in channels.items():
        track = next((t for t in spec.tracks if t in vf.trks and vf.trks[t].srate > 0), None)
        if track is not None:
            x = np.asarray(vf.get_track_samples(track, 1.0 / vf.trks[track].srate), dtype=np.float64)
            check_track(name, track, x)
            tracks[name] = (x, float(vf.trks[track].srate), track)
    return Recording([Piece(0.0, tracks, path.name)], sorted(vf.trks))


def read_tracks(path: Path, channels: dict[str, ChannelSpec]) -> Tracks:
    """Every channel's track from a ``.vital`` file: ``{channel: (samples [T] float64 with NaN for
    gaps, rate in Hz, track name)}``; a channel it lacks is ``no_matching_channel``."""
    return read_file(path, channels).require(channels).pieces[0].tracks
