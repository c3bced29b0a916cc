"""Where stages read and write: a local (or shared) folder, or a cloud URI (``s3://bucket/prefix``,
``gs://bucket/prefix``), through one set of functions over pyarrow's filesystems.

A location is a string: a URI stays as given, a local path becomes absolute. Credentials and
endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``...), read on every node. A multi-node run needs its outputs
where every node reaches them: a URI, or a folder on a shared file system.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from biofm.errors import BiofmError

_LOCAL = pafs.LocalFileSystem()


def is_uri(location: str | Path) -> bool:
    s = str(location)
    return "://" in s and not s.startswith("file://")


def normalize(location: str | Path) -> str:
    """A URI without a trailing ``/``, or an absolute local path (``file://`` dropped; symbolic links
    kept as typed, so messages show the path the user gave)."""
    s = str(location)
    return s.rstrip("/") if is_uri(s) else os.path.abspath(s.removeprefix("file://"))


def join(location: str | Path, *names: str) -> str:
    return "/".join([normalize(location), *names])


def name(location: str | Path) -> str:
    return normalize(location).rsplit("/", 1)[-1]


@functools.cache
def _remote(root: str) -> pafs.FileSystem:
    try:
        return pafs.FileSystem.from_uri(root)[0]
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BiofmError(f"cannot open {root}: {e}") from None


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path within it)`` for ``location``; one filesystem per bucket."""
    s = normalize(location)
    if not is_uri(s):
        return _LOCAL, s
    scheme, rest = s.split("://", 1)
    return _remote(f"{scheme}://{rest.split('/', 1)[0]}"), rest


def _info(location) -> pafs.FileInfo:
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def exists(location: str | Path) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    return _info(location).type == pafs.FileType.Directory


def list_files(folder: str | Path, suffix: str = "") -> dict[str, int]:
    """Files directly in ``folder`` whose names end with ``suffix`` (hidden ones left out):
    location -> size in bytes, sorted by location. Empty when ``folder`` does not exist."""
    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    base = normalize(folder)
    return {f"{base}/{i.base_name}": i.size for i in sorted(infos, key=lambda i: i.base_name)
            if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith(".")}


def list_tree(folder: str | Path) -> list[str]:
    """Every file below ``folder`` (sub-folders too; hidden ones and those under ``_``-folders left
    out), as paths relative to it, sorted; empty when it does not exist."""
    fs, path = filesystem(folder)
    base = path.rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    rel = (i.path.removeprefix(base) for i in infos if i.type == pafs.FileType.File)
    return sorted(r for r in rel if not any(part.startswith((".", "_")) for part in r.split("/")))


def list_dirs(folder: str | Path) -> list[str]:
    """Sub-folders directly in ``folder``, sorted; empty when it does not exist."""
    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(f"{normalize(folder)}/{i.base_name}" for i in infos if i.type == pafs.FileType.Directory)


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def write(location: str | Path, fill: Callable[[BinaryIO], object]) -> str:
    """Write a file whole or not at all: ``fill(f)`` writes into a binary file object. Locally
    into a hidden temporary file renamed at the end; to a URI as one upload once ``fill`` is done."""
    location = normalize(location)
    if is_uri(location):
        buf = io.BytesIO()
        fill(buf)
        fs, path = filesystem(location)
        with fs.open_output_stream(path) as f:
            f.write(buf.getvalue())
        return location
    target = Path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            fill(f)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return location


def write_text(location: str | Path, text: str) -> str:
    return write(location, lambda f: f.write(text.encode()))


def remove_tree(location: str | Path) -> None:
    """Delete a folder and everything in it (nothing when it does not exist)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def remove_temporary(folder: str | Path) -> None:
    """Delete the hidden temporary files a killed local :func:`write` left in ``folder`` and
    below (uploads leave none)."""
    if not is_uri(folder):
        for tmp in Path(normalize(folder)).rglob(".*.tmp"):
            tmp.unlink()


@contextlib.contextmanager
def local_folder(location: str | Path) -> Iterator[Path]:
    """A local folder to write ``location``'s files into (for writers that only take paths):
    the folder itself when it is local, else a temporary one uploaded when the block succeeds."""
    location = normalize(location)
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="biofm-") as d:
        yield Path(d)
        fs, path = filesystem(location)
        pafs.copy_files(d, path, source_filesystem=_LOCAL, destination_filesystem=fs)


def read_table(location: str | Path | list, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file, a folder of them, or a list of files (one filesystem) as one table."""
    if isinstance(location, list):
        fs = filesystem(location[0])[0]
        return pq.read_table([filesystem(x)[1] for x in location], columns=columns, filesystem=fs)
    fs, path = filesystem(location)
    return pq.read_table(path, columns=columns, filesystem=fs)


def read_file(location: str | Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as a table, through the file reader alone (no dataset discovery: the
    cheapest read of a file whose location is known)."""
    fs, path = filesystem(location)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read(columns=columns)


def read_metadata(location: str | Path) -> pq.FileMetaData:
    """A Parquet file's footer: rows, row groups, schema and its key-value metadata."""
    fs, path = filesystem(location)
    with fs.open_input_file(path) as f:
        return pq.read_metadata(f)


def check_writable(folder: str | Path) -> None:
    """Write and delete a small file under ``folder``: a wrong bucket, missing credentials or an
    unreachable endpoint is reported before any work, naming the location."""
    probe = join(folder, ".biofm-write-check")
    try:
        write_text(probe, "ok")
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except (OSError, pa.ArrowException) as e:
        raise BiofmError(f"cannot write to {normalize(folder)}: {e}") from None

