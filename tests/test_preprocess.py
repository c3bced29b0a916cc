import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from biofm.config import ChannelsConfig, WindowsConfig, load_config
from biofm.errors import ConfigError, NothingProduced, SourceUnreachable
from biofm.preprocess import build_windows, process_case
from biofm.dataset import data_spec, load_outcomes, read_examples, read_manifest, SCHEMA_KEY
from biofm.sources.vitaldb import ApiSource, DirectorySource
from conftest import ROOT, REAL_VITAL, heartbeat_signals, requires_realdata, write_case

CHANNELS = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")


def read_windows(split_dir):
    """All windows of a split, sorted by (case_id, window_idx)."""
    table = pq.read_table(split_dir).sort_by([("case_id", "ascending"), ("window_idx", "ascending")])
    return table


def build(tmp_path, case_ids, source, **kw):
    return build_windows(case_ids, source, CHANNELS, WINDOWS, tmp_path / "out", "train", **kw)


def test_windows_dataset_contract(ray_session, tmp_path):
    for i in range(3):
        write_case(tmp_path / "src", str(i + 1), duration_s=60, seed=i)
    m = build(tmp_path, ["1", "2", "3"], DirectorySource(str(tmp_path / "src")))
    assert (m["cases_in"], m["cases_ok"], m["cases_skipped"], m["windows_kept"]) == (3, 3, 0, 18)
    assert m["windows_rejected"] == {} and m["data_spec"]["channels"] == ["PPG", "ECG"]
    assert set(m["timings"]["case_seconds_by_stage"]) == {"read", "resample", "filter", "quality", "write"}

    split_dir = tmp_path / "out" / "train"
    assert sorted(p.name for p in split_dir.iterdir()) == ["1.parquet", "2.parquet", "3.parquet", "_cases"]
    assert read_manifest(tmp_path / "out", "train") == m
    ds = ray_session.data.read_parquet(str(split_dir))
    batch = next(iter(ds.iter_batches(batch_size=100, batch_format="numpy")))
    assert batch["signal"].shape == (18, 2, 1250) and batch["signal"].dtype == np.float32
    np.testing.assert_allclose(batch["signal"].mean(-1), 0, atol=1e-4)
    np.testing.assert_allclose(batch["signal"].std(-1), 1, atol=1e-3)
    np.testing.assert_allclose(batch["start_s"], batch["window_idx"] * 10.0)
    np.testing.assert_allclose(batch["ppg_hr_bpm"], 72, rtol=0.08)
    np.testing.assert_allclose(batch["ecg_hr_bpm"], 72, rtol=0.08)
    assert (batch["ppg_beats"] >= 11).all() and (batch["ecg_nan_fraction"] == 0).all()

    schema = pq.read_schema(split_dir / "1.parquet")
    spec = json.loads(schema.metadata[SCHEMA_KEY])
    assert spec == json.loads(json.dumps(data_spec(CHANNELS, WINDOWS)))
    assert spec["sample_rate_hz"] == 125 and spec["filters"]["PPG"]["band_hz"] == [0.5, 10.0]
    assert str(schema.field("window_idx").type) == "int32" and str(schema.field("start_s").type) == "double"
    assert str(schema.field("case_id").type) == "string"

    from biofm.train.batches import WindowBatches, scan

    streamed = scan(str(split_dir), ("ECG", "PPG"))
    assert streamed.spec["channels"] == ["ECG", "PPG"] and list(streamed.spec["filters"]) == ["ECG", "PPG"]
    order = np.lexsort((batch["window_idx"], batch["case_id"]))
    b = next(iter(WindowBatches(streamed, ["signal", "case_id", "window_idx"], 100).epoch(0)))
    got = b["signal"].numpy()[np.lexsort((b["window_idx"].numpy(), b["case_id"]))]
    np.testing.assert_array_equal(got, batch["signal"][order][:, ::-1])


def test_bad_cases_are_skipped_with_reasons(ray_session, tmp_path):
    src = tmp_path / "src"
    write_case(src, "good", duration_s=60)
    ppg, ecg = heartbeat_signals(60, 500.0, seed=1)
    ppg[11000:13500] = np.nan  # 22-27 s: NaN gap inside the recording
    ecg[11000:13500] = np.nan
    write_case(src, "gap", ppg=ppg, ecg=ecg)
    write_case(src, "short", duration_s=8)
    write_case(src, "noecg", names=("SNUADC/PLETH", None))
    write_case(src, "flat", ppg=np.ones(30000))
    (src / "corrupt.vital").write_bytes(b"\x1f\x8b\x08\x00garbage")
    ids = ["good", "gap", "short", "noecg", "flat", "corrupt", "absent"]
    m = build(tmp_path, ids, DirectorySource(str(src)))

    codes = {c: (o["status"], o.get("code")) for c, o in m["cases"].items()}
    assert codes == {"good": ("ok", None), "gap": ("ok", None), "short": ("skipped", "too_short"),
                     "noecg": ("skipped", "no_matching_channel"), "flat": ("skipped", "flat_track"),
                     "corrupt": ("skipped", "corrupt_file"), "absent": ("skipped", "not_found")}
    assert m["cases"]["short"]["reason"] == "recording lasts 8.0 s, shorter than one 10 s window"
    assert (m["cases_in"], m["cases_ok"], m["cases_skipped"]) == (7, 2, 5)
    assert m["cases"]["gap"]["rejected"] == {"PPG:missing": 1}
    assert m["windows_kept"] == 11 and m["windows_rejected"] == {"PPG:missing": 1}
    gap = pq.read_table(tmp_path / "out" / "train" / "gap.parquet")
    assert gap.column("window_idx").to_pylist() == [0, 1, 3, 4, 5]

    # the data report beside the manifest: counts, reasons, pictures, the rejected window itself
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 7 | 2 | 5 | 0 | 0.03 | 12 | 11 (92%) | 1 |" in report  # 2 x 60 s read; 12 windows cut
    for code in ("too_short", "no_matching_channel", "flat_track", "corrupt_file", "not_found"):
        assert f"| `{code}` | 1 | " in report
    assert "| `PPG:missing` | 1 | 8.3% |" in report
    assert "Kept and rejected windows (6 kept, 1 rejected;" in report  # 3 windows of each recording
    for png in ("train_heart_rate.png", "train_examples.png"):
        assert (tmp_path / "out" / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (reason, start, x), = read_examples(str(tmp_path / "out" / "train"), "gap")
    assert (reason, start, x.shape) == ("PPG:missing", 20.0, (2, 1250)) and abs(float(x[0].std()) - 1) < 0.01


def test_rerun_resumes_without_reading_again(ray_session, tmp_path):
    src = tmp_path / "src"
    for c in ("1", "2"):
        write_case(src, c, duration_s=30)
    first = build(tmp_path, ["1", "2"], DirectorySource(str(src)))
    before = read_windows(tmp_path / "out" / "train")
    for f in src.iterdir():
        f.unlink()  # a rerun must not need the recordings again
    second = build(tmp_path, ["1", "2"], DirectorySource(str(src)))
    after = read_windows(tmp_path / "out" / "train")
    assert after.equals(before) and second["windows_kept"] == first["windows_kept"] == 6
    keys = list(zip(after.column("case_id").to_pylist(), after.column("window_idx").to_pylist()))
    assert len(keys) == len(set(keys))
    with pytest.raises(NothingProduced, match="not_found: 2 case"):
        build(tmp_path, ["1", "2"], DirectorySource(str(src)), overwrite=True)
    assert not list((tmp_path / "out" / "train").glob("*.parquet"))


def test_a_failed_write_is_recorded_and_retried(tmp_path):
    """Storage failing under a case is not the case's fault: recorded as retryable, and a rerun
    (here, the case processed again once the obstacle is gone) writes it."""
    write_case(tmp_path / "src", "1", duration_s=30)
    split = tmp_path / "out" / "train"
    (split / "1.parquet").mkdir(parents=True)  # a folder where the file must go
    outcome = process_case("1", DirectorySource(str(tmp_path / "src")), CHANNELS, WINDOWS, split)
    assert (outcome["status"], outcome["code"], outcome["retryable"]) == ("skipped", "write_failed", True)
    assert outcome["reason"].startswith(f"{split}/1.parquet: ")
    assert load_outcomes(str(split))["1"]["code"] == "write_failed" and sorted(os.listdir(split)) == ["1.parquet", "_cases"]
    (split / "1.parquet").rmdir()
    assert process_case("1", DirectorySource(str(tmp_path / "src")), CHANNELS, WINDOWS, split)["status"] == "ok"
    assert pq.read_table(split / "1.parquet").num_rows == 3


def test_changed_config_needs_overwrite(ray_session, tmp_path):
    write_case(tmp_path / "src", "1", duration_s=20)
    source = DirectorySource(str(tmp_path / "src"))
    build(tmp_path, ["1"], source)
    other = WindowsConfig(max_nan_fraction=0.1)
    with pytest.raises(ConfigError, match="another config .*use --overwrite"):
        build_windows(["1"], source, CHANNELS, other, tmp_path / "out", "train")
    m = build_windows(["1"], source, CHANNELS, other, tmp_path / "out", "train", overwrite=True)
    assert m["data_spec"]["config_hash"] == data_spec(CHANNELS, other)["config_hash"]


def test_a_flag_that_changes_how_cases_are_read_is_applied_or_refused_never_ignored(ray_session, tmp_path):
    """A CSV without a time column is skipped as no_sample_rate; the same build with --rate-hz 100
    processes it (its skip was made under other reading settings); --rate-hz 50 then finds it
    built otherwise and refuses, naming the change and --overwrite, which rebuilds it at 50 Hz."""
    from biofm.sources.formats import open_source

    ppg, ecg = heartbeat_signals(40.0, 100.0, seed=1)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "rec.csv").write_text("PPG,ECG\n" + "".join(f"{p:.5f},{e:.5f}\n" for p, e in zip(ppg, ecg)))
    folder = str(tmp_path / "csv")
    with pytest.raises(NothingProduced, match="no_sample_rate"):
        build(tmp_path, ["rec"], open_source(folder))
    m = build(tmp_path, ["rec"], open_source(folder, rate_hz=100.0))
    assert (m["cases_ok"], m["windows_kept"]) == (1, 4)
    with pytest.raises(ConfigError, match=r"1 case\(s\) \(e.g. rec\) built with other reading settings \(rate_hz: 100.0 "
                                          r"-> 50.0\); use --overwrite"):
        build(tmp_path, ["rec"], open_source(folder, rate_hz=50.0))
    assert build(tmp_path, ["rec"], open_source(folder, rate_hz=50.0), overwrite=True)["windows_kept"] == 8
    assert build(tmp_path, ["rec"], open_source(folder, rate_hz=50.0))["windows_kept"] == 8   # resumed: the same settings


def test_empty_case_list_and_nothing_usable(ray_session, tmp_path):
    with pytest.raises(NothingProduced, match="the case list is empty"):
        build(tmp_path, [], DirectorySource(str(tmp_path)))
    write_case(tmp_path / "src", "1", duration_s=5)
    with pytest.raises(NothingProduced, match=r"\(too_short: 1 case\(s\)\); e.g. recording lasts 5.0 s"):
        build(tmp_path, ["1"], DirectorySource(str(tmp_path / "src")))
    assert read_manifest(tmp_path / "out", "train")["cases_skipped"] == 1


def test_api_source_end_to_end_and_a_rerun_retries_only_transient_skips(ray_session, tmp_path, http_server):
    for c in ("3", "4", "6"):
        http_server.routes[f"/{c}.vital"] = [(200, write_case(tmp_path / "src", c, duration_s=30).read_bytes())]
    http_server.routes["/4.vital"].insert(0, (500, b"try again"))
    good = http_server.routes["/6.vital"][0]
    http_server.routes["/6.vital"] = [(503, b"busy")]                  # every attempt of this run
    source = ApiSource(http_server.url, backoff_s=0.01)
    m = build(tmp_path, ["3", "4", "5", "6"], source)
    assert {c: o["status"] for c, o in m["cases"].items()} == {"3": "ok", "4": "ok", "5": "skipped", "6": "skipped"}
    assert m["cases"]["5"]["code"] == "not_found" and m["windows_kept"] == 6
    assert (m["cases"]["6"]["code"], m["cases"]["6"]["retryable"]) == ("http_error", True)
    assert http_server.hits["/4.vital"] == 2 and m["source"] == http_server.url
    hits = dict(http_server.hits)
    assert hits["/6.vital"] == source.retries + 1
    # the rerun: the server answers again; only the transient skip is fetched again
    http_server.routes["/6.vital"] = [good]
    again = build(tmp_path, ["3", "4", "5", "6"], source)
    assert {c: o["status"] for c, o in again["cases"].items()} == {"3": "ok", "4": "ok", "5": "skipped", "6": "ok"}
    assert again["windows_kept"] == 9
    fetched = {k: v - hits.get(k, 0) for k, v in http_server.hits.items() if v != hits.get(k, 0)}
    assert fetched == {"/": 1, "/6.vital": 1}  # the reachability check, and the one case


def test_unreachable_api_stops_before_work(ray_session, tmp_path, dead_url):
    with pytest.raises(SourceUnreachable, match="cannot reach the VitalDB API"):
        build(tmp_path, ["1"], ApiSource(dead_url, backoff_s=0.01))


@pytest.mark.slow
def test_killed_run_then_rerun_gives_the_same_windows(ray_session, tmp_path, http_server):
    """Kill a build-windows driver midway (SIGKILL), rerun: identical to an uninterrupted run."""
    ids = [str(i) for i in range(1, 7)]
    release = threading.Event()
    for i, c in enumerate(ids):
        http_server.routes[f"/{c}.vital"] = [(200, write_case(tmp_path / "src", c, duration_s=40, seed=i).read_bytes())]
    original = http_server.RequestHandlerClass.do_GET

    def stall_late_cases(handler):
        if handler.path in ("/5.vital", "/6.vital"):
            release.wait(timeout=120)  # these cases hang until the driver is killed
        original(handler)
    http_server.RequestHandlerClass.do_GET = stall_late_cases

    (tmp_path / "splits.json").write_text(json.dumps({"train": ids}))
    out = tmp_path / "killed"
    gcs = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, str(ROOT / "jobs/build_windows.py"), "--split-file", str(tmp_path / "splits.json"),
           "--outdir", str(out), "--api-url", http_server.url, "--address", gcs]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cases_dir = out / "train" / "_cases"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cases_dir.glob("*.json"))) < 4:
        time.sleep(0.2)
    assert len(list(cases_dir.glob("*.json"))) == 4, proc.stdout.read1().decode() if proc.poll() is not None else ""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    release.set()
    assert not (out / "manifest.json").exists()

    source = ApiSource(http_server.url, backoff_s=0.01)
    resumed = build_windows(ids, source, CHANNELS, WINDOWS, out, "train")
    whole = build_windows(ids, source, CHANNELS, WINDOWS, tmp_path / "whole", "train")
    assert resumed["windows_kept"] == whole["windows_kept"] == 24
    a, b = read_windows(out / "train"), read_windows(tmp_path / "whole" / "train")
    assert a.num_rows == 24 and a.equals(b)
    assert http_server.hits["/1.vital"] == 2  # once by the killed run, once by the reference run


@requires_realdata(REAL_VITAL)
def test_real_recordings(ray_session, tmp_path):
    ids = sorted(p.stem for p in REAL_VITAL.glob("*.vital"))
    m = build(tmp_path, ids, DirectorySource(str(REAL_VITAL)))
    assert m["cases_ok"] == 6
    gap = m["cases"]["MICUA01_240724_180622_first100s"]
    assert gap["rates_hz"] == {"PPG": 100.0, "ECG": 300.0}
    assert gap["windows_total"] == 12 and gap["rejected"] == {"PPG:missing": 4}
    # Real artifacts (signal loss, saturation) are rejected; most windows survive.
    assert sum(m["windows_rejected"].values()) == 62 - m["windows_kept"]
    assert 40 <= m["windows_kept"] <= 56 and m["windows_rejected"].get("PPG:clipped", 0) >= 1


def test_a_split_with_a_corrupt_or_foreign_file_is_refused_by_name(tmp_path):
    """read_data_spec (what pretraining, fine-tuning and evaluation call first) reads every
    file's footer: junk named .parquet, or windows made with other settings, fail naming the file."""
    import dataclasses

    from biofm.preprocess import process_case
    from biofm.dataset import read_data_spec

    for i in range(3):
        write_case(tmp_path / "vital", str(i + 1), duration_s=40.0, seed=i)
    split = tmp_path / "train"
    (split / "_cases").mkdir(parents=True)
    source = DirectorySource(str(tmp_path / "vital"))
    for case in ("1", "2"):
        assert process_case(case, source, CHANNELS, WINDOWS, split)["status"] == "ok"
    assert read_data_spec(split) == data_spec(CHANNELS, WINDOWS)
    (split / "9.parquet").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"9.parquet is not a readable Parquet file .*--overwrite"):
        read_data_spec(split)
    (split / "9.parquet").unlink()
    other = {"PPG": dataclasses.replace(CHANNELS["PPG"], band_hz=(0.5, 8.0)), "ECG": CHANNELS["ECG"]}
    process_case("3", source, other, WINDOWS, split)
    with pytest.raises(ConfigError, match=r"mixes windows made with different settings \(1.parquet and 3.parquet\)"):
        read_data_spec(split)
