"""The end-to-end pipeline: stage skipping, offline failure, the cluster launcher config. The
pipeline submitted with `ray job submit` to a real cluster, writing to S3: tests/test_multinode.py."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from biofm.cli import main
from biofm.errors import BiofmError
from biofm.pipeline import MARKER, run_stage
from conftest import ROOT, write_case


def test_a_stage_is_skipped_continued_or_rebuilt_by_its_settings(tmp_path, capsys):
    calls = []

    def run(resume):
        calls.append(resume)
        (folder / "out.txt").write_text(str(len(calls)))
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted midway

    folder = tmp_path / "stage"
    assert run_stage("s", folder, {"a": 1}, False, run)["status"] == "ran"
    assert run_stage("s", folder, {"a": 1}, False, run)["status"] == "skipped" and calls == [False]
    assert run_stage("s", folder, {"a": 1}, True, run)["status"] == "ran" and calls == [False, False]  # forced
    with pytest.raises(KeyboardInterrupt):
        run_stage("s", folder, {"a": 2}, False, run)  # settings changed: rebuilt, then interrupted
    assert json.loads((folder / MARKER).read_text())["status"] == "running"
    assert run_stage("s", folder, {"a": 2}, False, run)["status"] == "ran" and calls[-1] is True  # continued
    assert "its settings changed, rebuilding" in capsys.readouterr().out
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(BiofmError, match="was not made by the pipeline"):
        run_stage("s", foreign, {"a": 1}, False, run)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_changed_setting_rebuilds_its_stage_and_every_stage_after_it(tmp_path, monkeypatch):
    """run_pipeline with the heavy library calls replaced by recorders: which stages run again
    when a setting of one stage changes, and with what."""
    import biofm.infer
    import biofm.preprocess
    import biofm.train.finetune
    import biofm.train.pretrain
    import biofm.tune
    import biofm.tasks
    from biofm.config import PipelineConfig, load_config, with_overrides
    from biofm.pipeline import run_pipeline

    calls = []

    def recorder(name):
        return lambda *args, **kwargs: calls.append((name, args, kwargs))

    monkeypatch.setattr(biofm.ray_connect, "ensure_ray", lambda address=None: None)
    monkeypatch.setattr(biofm.preprocess, "build_windows", recorder("windows"))
    monkeypatch.setattr(biofm.tasks, "prepare_butppg", recorder("butppg"))
    monkeypatch.setattr(biofm.train.pretrain, "pretrain", recorder("pretrain"))
    monkeypatch.setattr(biofm.train.finetune, "finetune", recorder("finetune"))
    monkeypatch.setattr(biofm.tune, "run_search", recorder("tune"))
    monkeypatch.setattr(biofm.infer, "embed", recorder("embed"))
    vital = tmp_path / "vital"
    vital.mkdir()
    for i in range(1, 11):
        (vital / f"{i}.vital").write_bytes(b"")  # prepare-splits (real) reads only the names
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "RECORDS").write_text("100001/100001_PPG\n")
    (tmp_path / "windows.yaml").write_text("stride_s: 5.0\n")
    base = {"output_dir": str(tmp_path / "run"), "case_set": str(vital), "vital_source": str(vital),
            "butppg_raw_dir": str(raw), "tune": {"num_samples": 1, "max_epochs": 2, "grace_period": 1},
            "embed": {"split": "val"}}
    shipped = load_config(PipelineConfig, ROOT / "configs/pipeline.yaml")

    def run(**changes):
        calls.clear()
        cfg = with_overrides(PipelineConfig, ROOT / "configs/pipeline.yaml", {**base, **changes}, "test")
        records = run_pipeline(cfg)
        return [r["stage"] for r in records if r["status"] == "ran"], sorted({c[0] for c in calls})

    assert shipped.tune is None  # the quick pipeline leaves the search out; this test adds it
    everything = ["splits", "windows", "pretrain", "butppg", "finetune", "tune", "embed"]
    assert run()[0] == everything
    assert run() == ([], [])
    ran, called = run(windows_yaml=str(tmp_path / "windows.yaml"))
    assert ran == ["windows", "pretrain", "butppg", "finetune", "tune", "embed"]  # butppg: windows.yaml shapes it too
    assert called == sorted(ran) and calls[0][1][3].stride_s == 5.0
    ran, _ = run(windows_yaml=str(tmp_path / "windows.yaml"), finetune={"epochs": 3, "head_epochs": 2})
    assert ran == ["finetune", "tune"]                                   # the search starts from the fine-tuning config
    ran, _ = run(windows_yaml=str(tmp_path / "windows.yaml"), finetune={"epochs": 3, "head_epochs": 2}, split_seed=1)
    assert ran == ["splits", "windows", "pretrain", "finetune", "tune", "embed"]  # BUT-PPG does not read the splits
    ran, _ = run(windows_yaml=str(tmp_path / "windows.yaml"), finetune={"epochs": 3, "head_epochs": 2}, split_seed=1,
                 pretrain={"epochs": 2, "num_layers": 2, "warmup_epochs": 1})
    assert ran == ["pretrain", "finetune", "tune", "embed"]


def test_pipeline_stops_at_once_when_a_source_is_unreachable(dead_url, s3, tmp_path, capsys, monkeypatch):
    base = ["pipeline", "--config", str(ROOT / "configs/pipeline.yaml"), "--output-dir", str(tmp_path / "run")]
    t0 = time.perf_counter()
    assert main(base + ["--set", f"api_url={dead_url}", "--set", f"physionet_url={dead_url}",
                        "--set", f"butppg_raw_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err  # every unreachable source at once, and one line of settings
    vital = tmp_path / "vital"
    write_case(vital, "1", duration_s=20.0)
    assert f"cannot reach the VitalDB API at {dead_url}" in err and "cannot download BUT-PPG" in err
    first, *causes = err.strip().splitlines()   # the fix first, then each cause without other commands' flags
    assert first == ("biofm pipeline: error: nothing was started; to run from local copies, add to the same command: "
                     "--set vital_source=<folder of .vital files> --set case_set=<the same folder> "
                     "--set butppg_raw_dir=<BUT-PPG 2.0.0 folder>")
    assert len(causes) == 2 and not any(flag in err for flag in ("--api-url", "--source", "--raw-dir"))
    assert main(base + ["--set", f"vital_source={vital}", "--set", f"physionet_url={dead_url}",
                        "--set", f"butppg_raw_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot download BUT-PPG" in err and "--set butppg_raw_dir=" in err
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "RECORDS").write_text("100001/100001_PPG\n")
    assert main(base[:-1] + ["s3://no-such-bucket/run", "--set", f"vital_source={vital}",
                             "--set", f"butppg_raw_dir={raw}"]) == 2
    assert "cannot write to s3://no-such-bucket/run: " in capsys.readouterr().err
    assert main(base + ["--set", f"vital_source={vital}", "--set", "butppg_raw_dir=s3://bucket/butppg"]) == 2
    assert "BUT-PPG raw folder s3://bucket/butppg: the raw records are read from a folder" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "run").exists()  # nothing was started
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "ENDPOINT", dead_url)
    assert main(base + ["--set", f"vital_source={tmp_path}", "--set", f"butppg_raw_dir={raw}", "--set",
                        "pretrain={init: ibm-granite/granite-timeseries-ttm-r2@1536-96-r2}"]) == 2
    err = capsys.readouterr().err  # the published weights pretraining starts from are a source too
    assert "cannot get ibm-granite/granite-timeseries-ttm-r2@1536-96-r2: the Hugging Face hub is unreachable" in err
    assert err.splitlines()[0].endswith('add to the same command: --set pretrain="{init: <folder of the TTM checkpoint>}"')
    assert main(base + ["--set", f"vital_source={tmp_path}", "--set", f"butppg_raw_dir={raw}", "--set",
                        f"pretrain={{init: {tmp_path / 'no-such-folder'}}}"]) == 2
    assert f"init {tmp_path / 'no-such-folder'}: no such folder" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 40 and not (tmp_path / "run").exists()
    assert main(base + ["--set", "max_epochs=3"]) == 2
    assert "unknown key 'max_epochs'" in capsys.readouterr().err
    assert main(base + ["--set", "pretrain={epoch: 3}", "--set", f"vital_source={tmp_path}"]) == 2
    assert "pipeline pretrain (over configs/ssl_pretrain.yaml): unknown key 'epoch'" in capsys.readouterr().err
    assert main(base + ["--force", "training"]) == 2
    assert "unknown stage(s) ['training']" in capsys.readouterr().err
    assert main(base + ["--set", "embed={splt: val}"]) == 2
    assert "embed: expected {split: train|val, tokens: bool, batch_size: n}" in capsys.readouterr().err


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)  # what `ray up` does before its cloud calls
    validate_config(config)
    nodes = config["available_node_types"]
    assert nodes["head"]["resources"] == {"CPU": 0} and config["head_node_type"] == "head"
    assert nodes["gpu_workers"]["resources"]["GPU"] == 1 and nodes["gpu_workers"]["min_workers"] == 0
    assert nodes["gpu_workers"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in nodes["head"]["node_config"]  # losing the head ends the job
    assert nodes["cpu_workers"]["resources"]["CPU"] >= 8 and "GPU" not in nodes["cpu_workers"]["resources"]
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    opened = [p["FromPort"] for p in raw["provider"]["security_group"]["IpPermissions"]]
    assert opened == [22]  # SSH only: the dashboard is reached through the tunnel
    assert any("pip install" in c and "biofm" in c and "constraints.txt" in c for c in config["setup_commands"])
    # token authentication on every node, with one token copied from the launching machine, never committed
    token = "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/home/ubuntu/.biofm/ray_auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert start.index(token) < start.index("ray start")
    assert raw["file_mounts"]["/home/ubuntu/.biofm/ray_auth_token"] == "~/.ray/auth_token"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if "auth_token" in f]
