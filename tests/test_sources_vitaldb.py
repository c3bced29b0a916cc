import gzip
import uuid

import numpy as np
import pytest

from biofm import storage
from biofm.config import ChannelsConfig, load_config
from biofm.errors import CaseSkipped, SourceUnreachable
from biofm.sources.formats import open_source
from biofm.sources.vitaldb import ApiSource, CloudSource, DirectorySource, case_sets, read_tracks
from conftest import ROOT, REAL_VITAL, requires_realdata, write_case

CHANNELS = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])


def skipped(path) -> CaseSkipped:
    with pytest.raises(CaseSkipped) as e:
        read_tracks(path, CHANNELS)
    return e.value


def test_reads_vitaldb_layout_at_native_rate(tmp_path):
    path = write_case(tmp_path, "1", duration_s=30)
    tracks = read_tracks(path, CHANNELS)
    assert list(tracks) == ["PPG", "ECG"]
    x, fs, name = tracks["PPG"]
    assert (fs, name, x.shape, x.dtype) == (500.0, "SNUADC/PLETH", (15000,), np.float64)
    assert tracks["ECG"][1:] == (500.0, "SNUADC/ECG_II") and np.isfinite(tracks["ECG"][0]).all()


@requires_realdata(REAL_VITAL)
def test_reads_real_recordings_through_aliases():
    for path in sorted(REAL_VITAL.glob("*.vital")):
        tracks = read_tracks(path, CHANNELS)
        assert (tracks["PPG"][1], tracks["PPG"][2]) == (100.0, "Bx50/PLETH")
        assert (tracks["ECG"][1], tracks["ECG"][2]) == (300.0, "Bx50/ECG1")
        assert abs(len(tracks["ECG"][0]) - 3 * len(tracks["PPG"][0])) <= 3  # same duration
    gap = read_tracks(REAL_VITAL / "MICUA01_240724_180622_first100s.vital", CHANNELS)
    assert np.isnan(gap["PPG"][0]).mean() == pytest.approx(0.186, abs=0.01)


def test_corrupt_gzip(tmp_path):
    data = bytearray(write_case(tmp_path, "1").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    (tmp_path / "bad.vital").write_bytes(bytes(data))
    e = skipped(tmp_path / "bad.vital")
    assert e.code == "corrupt_file" and "not a valid gzip stream" in e.detail


def test_truncated_file(tmp_path):
    data = write_case(tmp_path, "1").read_bytes()
    (tmp_path / "cut.vital").write_bytes(data[: len(data) // 2])
    e = skipped(tmp_path / "cut.vital")
    assert (e.code, e.detail) == ("corrupt_file", "file is truncated (gzip stream ends early)")


def test_not_a_vital_file(tmp_path):
    (tmp_path / "a.vital").write_bytes(gzip.compress(b"time,value\n0,1\n"))
    assert skipped(tmp_path / "a.vital").detail == "not a Vital file (no VITA signature)"
    (tmp_path / "b.vital").write_text("<html>Not found</html>")
    assert "not a valid gzip stream" in skipped(tmp_path / "b.vital").detail


@pytest.mark.parametrize("names, missing", [((None, "SNUADC/ECG_II"), "PPG"), (("SNUADC/PLETH", None), "ECG")])
def test_missing_track(tmp_path, names, missing):
    e = skipped(write_case(tmp_path, "1", names=names))
    assert e.code == "no_matching_channel" and e.detail.startswith(f"no {missing} signal among SNUADC/")


def test_all_nan_and_flat_tracks(tmp_path):
    e = skipped(write_case(tmp_path, "1", ppg=np.full(30000, np.nan)))
    assert (e.code, e.detail) == ("empty_track", "PPG track SNUADC/PLETH has no valid samples (all NaN)")
    e = skipped(write_case(tmp_path, "2", ecg=np.full(30000, 0.25)))
    assert (e.code, e.detail) == ("flat_track", "ECG track SNUADC/ECG_II is flat (constant 0.25)")


def test_directory_source_layouts(tmp_path):
    write_case(tmp_path / "vital_files", "0007")
    write_case(tmp_path, "abc")
    src = DirectorySource(str(tmp_path))
    with src.local_file("7") as p:
        assert p.name == "0007.vital"
    with src.local_file("abc") as p:
        assert p.parent == tmp_path
    with pytest.raises(CaseSkipped, match="not_found: no 8.vital under"):
        with src.local_file("8"):
            pass
    with pytest.raises(SourceUnreachable, match="does not exist"):
        DirectorySource(str(tmp_path / "nope")).check_reachable()


def test_cloud_source_reads_from_s3(s3, tmp_path):
    uri = f"s3://biofm/{uuid.uuid4().hex[:8]}/vital"
    storage.write(f"{uri}/0012.vital", lambda f: f.write(write_case(tmp_path, "12").read_bytes()))
    src = CloudSource(uri)
    src.check_reachable()
    with src.local_file("12") as p:
        assert read_tracks(p, CHANNELS)["PPG"][1] == 500.0
    assert not p.exists()  # the temporary copy is removed
    with pytest.raises(CaseSkipped, match="not_found"):
        with src.local_file("13"):
            pass
    for missing in (f"{uri}-missing", "s3://no-such-bucket/vital"):
        with pytest.raises(SourceUnreachable, match=f"nothing at {missing}: no such bucket or prefix"):
            CloudSource(missing).check_reachable()
    assert isinstance(open_source(uri), CloudSource) and open_source(uri).ids() == ["0012"]
    assert isinstance(open_source(f"vital:{tmp_path}"), DirectorySource)
    with pytest.raises(SourceUnreachable, match="source folder /no/such/folder does not exist"):
        open_source("/no/such/folder")


def test_api_downloads_case(tmp_path, http_server):
    body = write_case(tmp_path, "42").read_bytes()
    http_server.routes["/1.0.1/42.vital"] = [(200, body)]
    src = ApiSource(f"{http_server.url}/1.0.1", backoff_s=0.01)
    src.check_reachable()
    with src.local_file("42") as p:
        assert p.read_bytes() == body
    assert not p.exists()


def test_api_404_skips_case(http_server):
    src = ApiSource(http_server.url, backoff_s=0.01)
    with pytest.raises(CaseSkipped) as e:
        with src.local_file("5"):
            pass
    assert (e.value.code, e.value.retryable) == ("not_found", False)
    assert http_server.hits["/5.vital"] == 1  # a 404 is not retried


def test_api_500_then_success(tmp_path, http_server):
    body = write_case(tmp_path, "9").read_bytes()
    http_server.routes["/9.vital"] = [(500, b"oops"), (503, b"busy"), (200, body)]
    with ApiSource(http_server.url, retries=3, backoff_s=0.01).local_file("9") as p:
        assert p.read_bytes() == body
    assert http_server.hits["/9.vital"] == 3


def test_api_persistent_500_is_retryable_skip(http_server):
    http_server.routes["/9.vital"] = [(500, b"oops")]
    with pytest.raises(CaseSkipped) as e:
        with ApiSource(http_server.url, retries=2, backoff_s=0.01).local_file("9"):
            pass
    assert (e.value.code, e.value.retryable) == ("http_error", True)
    assert "HTTP 500 after 3 attempts" in e.value.detail and http_server.hits["/9.vital"] == 3


def test_api_unreachable(dead_url):
    src = ApiSource(dead_url, backoff_s=0.01)
    with pytest.raises(SourceUnreachable, match=f"cannot reach the VitalDB API at {dead_url}.*--source"):
        src.check_reachable()
    with pytest.raises(CaseSkipped) as e:
        with src.local_file("1"):
            pass
    assert (e.value.code, e.value.retryable) == ("unreachable", True)


def test_vitaldb_case_sets_are_offline():
    sets = case_sets()
    assert {"bis", "tiva"} <= set(sets)
    assert len(sets["bis"]) > 1000 and sets["bis"][:3] == ["1", "2", "3"]
