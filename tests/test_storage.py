"""biofm.storage: the same results on a local folder and under an s3:// URI (an S3 server on
127.0.0.1), and clear errors for a location that cannot be written."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pytest

from biofm import storage
from biofm.errors import BiofmError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("s3")
    return f"s3://biofm/{uuid.uuid4().hex[:8]}/root"


def test_files_round_trip_list_and_delete(root):
    assert not storage.exists(root) and storage.list_files(root) == {} and storage.list_dirs(root) == []
    storage.write_text(storage.join(root, "b.json"), '{"b": 1}')
    storage.write(storage.join(root, "a.bin"), lambda f: f.write(b"\x00" * 5))
    storage.write_text(storage.join(root, "sub", "c.json"), "c")
    assert storage.read_text(storage.join(root, "b.json")) == '{"b": 1}'
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"\x00" * 5
    assert storage.list_files(root) == {storage.join(root, "a.bin"): 5, storage.join(root, "b.json"): 8}
    assert list(storage.list_files(root, ".json")) == [storage.join(root, "b.json")]
    assert storage.list_dirs(root) == [storage.join(root, "sub")]
    assert storage.is_dir(root) and storage.is_file(storage.join(root, "sub", "c.json"))
    assert not storage.is_file(storage.join(root, "sub")) and not storage.exists(storage.join(root, "nope"))
    storage.remove_tree(storage.join(root, "sub"))
    assert storage.list_dirs(root) == [] and len(storage.list_files(root)) == 2
    storage.remove_tree(storage.join(root, "sub"))  # already gone: nothing to do


def test_a_failed_write_leaves_nothing(root):
    target = storage.join(root, "x.parquet")
    storage.write_text(target, "old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        storage.write(target, fail)
    assert storage.read_text(target) == "old"  # the previous file intact, no half-written one
    with pytest.raises(RuntimeError):
        storage.write(storage.join(root, "new.parquet"), fail)
    assert list(storage.list_files(root)) == [target]
    if not storage.is_uri(root):
        assert os.listdir(root) == ["x.parquet"]  # no hidden temporary file either


def test_parquet_and_local_folder_upload(root):
    import pyarrow.parquet as pq

    for i in range(2):
        table = pa.table({"x": [i, i + 10]}).replace_schema_metadata({b"k": str(i).encode()})
        storage.write(storage.join(root, "t", f"{i}.parquet"), lambda f, t=table: pq.write_table(t, f))
    files = list(storage.list_files(storage.join(root, "t"), ".parquet"))
    assert storage.read_table(files, columns=["x"]).column("x").to_pylist() == [0, 10, 1, 11]
    assert sorted(storage.read_table(storage.join(root, "t")).column("x").to_pylist()) == [0, 1, 10, 11]
    assert storage.read_metadata(files[1]).metadata[b"k"] == b"1"
    with storage.local_folder(storage.join(root, "enc")) as d:
        (d / "config.json").write_text("{}")
        (d / "deep").mkdir()
        (d / "deep" / "w.bin").write_bytes(b"123")
    assert storage.read_bytes(storage.join(root, "enc", "deep", "w.bin")) == b"123"
    assert list(storage.list_files(storage.join(root, "enc"))) == [storage.join(root, "enc", "config.json")]


def test_locations_are_normalised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.join("out", "a", "b.json") == f"{tmp_path}/out/a/b.json"
    assert storage.normalize("file://" + str(tmp_path / "x")) == str(tmp_path / "x")
    assert storage.join("s3://bucket/run/", "m.pt") == "s3://bucket/run/m.pt"
    assert storage.is_uri("gs://b/p") and not storage.is_uri("file:///tmp/x") and not storage.is_uri("runs/x")
    assert storage.name("s3://bucket/run/m.pt") == "m.pt"


def test_an_unwritable_location_is_named_before_any_work(s3, tmp_path):
    with pytest.raises(BiofmError, match="cannot write to s3://no-such-bucket/run: .*(NoSuchBucket|not exist)"):
        storage.check_writable("s3://no-such-bucket/run")
    storage.check_writable(f"s3://biofm/{uuid.uuid4().hex[:8]}")  # the probe file is removed again
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(BiofmError, match=f"cannot write to {blocked}"):
        storage.check_writable(blocked)
