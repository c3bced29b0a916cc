"""The end-to-end pipeline: stage skipping, offline failure, the cluster launcher config, and the
smoke pipeline submitted with `ray job submit` to a real head on 127.0.0.1, writing to S3 (a
server on 127.0.0.1)."""

from __future__ import annotations

import functools
import json
import subprocess
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler

import pytest
import yaml

from biofm import storage
from biofm.cli import main
from biofm.config import FinetuneConfig
from biofm.errors import BiofmError
from biofm.pipeline import MARKER, run_stage
from biofm.preprocess import read_data_spec, read_manifest
from biofm.train.finetune import finetune, load_classifier, predict, read_split
from conftest import REAL_BUTPPG, REAL_VITAL, ROOT, _Server, requires_realdata
from ray_cluster import LocalCluster


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


def test_pipeline_stops_at_once_when_a_source_is_unreachable(dead_url, s3, tmp_path, capsys, monkeypatch):
    base = ["pipeline", "--config", str(ROOT / "configs/pipeline.yaml"), "--output-dir", str(tmp_path / "run")]
    t0 = time.perf_counter()
    assert main(base + ["--set", f"api_url={dead_url}", "--set", f"physionet_url={dead_url}",
                        "--set", f"butppg_raw_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err  # every unreachable source at once, and one line of settings
    assert f"cannot reach the VitalDB API at {dead_url}" in err and "cannot download BUT-PPG" in err
    assert err.rstrip().endswith("To run from local copies, add to the same command: --set vital_source=<folder of "
                                 ".vital files> --set case_set=<the same folder> --set butppg_raw_dir=<BUT-PPG 2.0.0 folder>")
    assert main(base + ["--set", f"vital_source={tmp_path}", "--set", f"physionet_url={dead_url}",
                        "--set", f"butppg_raw_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot download BUT-PPG" in err and "--set butppg_raw_dir=" in err
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "RECORDS").write_text("100001/100001_PPG\n")
    assert main(base[:-1] + ["s3://no-such-bucket/run", "--set", f"vital_source={tmp_path}",
                             "--set", f"butppg_raw_dir={raw}"]) == 2
    assert "cannot write to s3://no-such-bucket/run: " in capsys.readouterr().err
    assert main(base + ["--set", f"vital_source={tmp_path}", "--set", "butppg_raw_dir=s3://bucket/butppg"]) == 2
    assert "BUT-PPG raw folder s3://bucket/butppg: the raw records are read from a folder" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "run").exists()  # nothing was started
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "ENDPOINT", dead_url)
    assert main(base + ["--set", f"vital_source={tmp_path}", "--set", f"butppg_raw_dir={raw}", "--set",
                        "pretrain={init: ibm-granite/granite-timeseries-ttm-r2@1536-96-r2}"]) == 2
    err = capsys.readouterr().err  # the published weights pretraining starts from are a source too
    assert "cannot get ibm-granite/granite-timeseries-ttm-r2@1536-96-r2: the Hugging Face hub is unreachable" in err
    assert err.rstrip().endswith('--set pretrain="{init: <folder of the TTM checkpoint>}"')
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


@pytest.fixture
def ray_head(s3):
    """A real Ray head with 2 CPUs on 127.0.0.1 (tests/ray_cluster.py: its own temp dir, token
    authentication on with a token of its own, as cluster.yaml starts every node, and the
    session's S3 server in its environment); stopped with everything it started."""
    cluster = LocalCluster(head_cpus=2, extra_env=s3, object_store_mb=400)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
@requires_realdata(REAL_VITAL)
@requires_realdata(REAL_BUTPPG)
def test_smoke_pipeline_submitted_as_a_ray_job(ray_head, ray_session, public_sources, tmp_path, capsys):
    """The main job's own sources (the VitalDB API, BUT-PPG downloaded from PhysioNet), served
    from 127.0.0.1; every stage writes to an s3:// URI, as on a cluster without a shared file system."""
    out = f"s3://biofm/{uuid.uuid4().hex[:8]}/smoke"
    at = functools.partial(storage.join, out)
    raw = tmp_path / "but_ppg_raw"
    entrypoint = ["python", "jobs/pipeline.py", "--config", "configs/smoke.yaml", "--output-dir", out,
                  "--set", f"case_set={REAL_VITAL}", "--set", "vital_source=api",
                  "--set", f"api_url={public_sources}/vital", "--set", f"physionet_url={public_sources}/",
                  "--set", f"butppg_raw_dir={raw}"]
    job_id = ray_head.submit(entrypoint)
    # the head lets in its owner only: no token (none in the environment, none in ~/.ray), or another one
    home = tmp_path / "stranger"
    home.mkdir()
    tokenless = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH_")} | {"HOME": str(home)}
    for stranger in (tokenless, {**ray_head.env, "RAY_AUTH_TOKEN": "f" * 64}):
        refused = ray_head.ray("job", "submit", "--address", ray_head.url, "--no-wait", "--", "echo", "hi", env=stranger)
        said_back = (refused.stdout + refused.stderr).lower()
        assert refused.returncode != 0 and "raysubmit_" not in said_back and "token" in said_back, said_back[-2000:]
    status, logs = ray_head.wait(job_id, 420)
    assert status == "succeeded", f"{status}\n{logs[-4000:]}"

    assert "[pipeline] done: ran splits, windows, pretrain, butppg, finetune" in logs
    assert "[prepare-butppg] downloading 51 records (210 files)" in logs
    assert "108 ECG/ACC files are not on the mirror" in logs  # the real subset is PPG only: 51 ECG + 3 ACC pairs
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in REAL_BUTPPG.iterdir())
    # each worker's progress line once (Ray Train's print patch used to double them)
    assert logs.count("[pretrain] epoch 1/1 ") == 1 and logs.count("[finetune] epoch 2/2 ") == 1, logs[-4000:]
    report = json.loads(storage.read_text(at("pipeline.json")))
    assert [s["stage"] for s in report["stages"]] == ["splits", "windows", "pretrain", "butppg", "finetune"]
    splits = json.loads(storage.read_text(at("splits", "splits_fasttrack.json")))
    train, val = (read_manifest(at("vitaldb_windows"), s) for s in ("train", "val"))
    assert train["cases_in"] == 2 and val["cases_in"] == 1 and train["windows_kept"] > 0
    assert train["source"] == f"{public_sources}/vital"
    assert set(train["cases"]) == set(splits["train"][:2]) and set(val["cases"]) == set(splits["val"][:1])
    assert sum(o["windows_kept"] for o in train["cases"].values()) == train["windows_kept"] == sum(
        storage.read_table(f).num_rows for f in storage.list_files(at("vitaldb_windows", "train"), ".parquet"))
    assert json.loads(storage.read_text(at("foundation_model", "training_history.json")))[-1]["epoch"] == 1
    assert storage.is_file(at("foundation_model", "encoder", "config.json"))
    assert storage.list_dirs(at("foundation_model", "ray", "ray_train")), "Ray Train's checkpoints are under the URI"
    assert json.loads(storage.read_text(at("but_ppg", "manifest.json")))["records_ok"] == 51
    _check_staged_fine_tuning(at("but_ppg_finetuned"), at("but_ppg"), at("foundation_model", "best_model.pt"))

    # the same command again, here, with a tune section: the five stages are up to date, and the
    # search runs two trials at once (half a CPU each on this session's 2-CPU Ray)
    tune = "{mode: grid, max_epochs: 2, grace_period: 1, max_concurrent_trials: 2, cpus_per_trial: 0.5, " \
           "search: {init: {grid: [pretrained, scratch]}, head_epochs: {grid: [1]}, batch_size: {grid: [32]}}}"
    assert main(["pipeline", *entrypoint[2:4], "--output-dir", str(out), *entrypoint[6:], "--set", f"tune={tune}",
                 "--set", "embed={split: val}"]) == 0
    said = capsys.readouterr().out
    assert "[pipeline] done: ran tune, embed; skipped splits, windows, pretrain, butppg, finetune" in said, said[-3000:]
    embedded = json.loads(storage.read_text(at("embeddings", "manifest.json")))  # read from and written to S3
    assert embedded["embeddings"] == val["windows_kept"] and embedded["data_dir"] == at("vitaldb_windows", "val")
    spans = _trial_spans(at("tune", "finetune_schedules"))
    overlap = min(end for _, end in spans) - max(start for start, _ in spans)
    assert len(spans) == 2 and overlap > 5, f"the trials ran one after the other: {spans}"
    assert storage.is_file(at("tune", "finetune_schedules", "best_config.yaml"))


@pytest.fixture
def public_sources(tmp_path):
    """The real recordings served from 127.0.0.1 as the VitalDB API (``<url>/vital/<id>.vital``)
    and a PhysioNet mirror (``<url>/butppg/2.0.0/...``)."""
    site = tmp_path / "site"
    (site / "butppg").mkdir(parents=True)
    (site / "butppg" / "2.0.0").symlink_to(REAL_BUTPPG)
    (site / "vital").symlink_to(REAL_VITAL)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _trial_spans(exp: str) -> list[tuple[float, float]]:
    """Per trial of a Tune experiment, (start, last report) in seconds since the epoch, from
    Tune's result.json: the first report's timestamp less the time the trial had run by then."""
    spans = []
    for result_file in [storage.join(d, "result.json") for d in storage.list_dirs(exp)]:
        if not storage.is_file(result_file):
            continue  # trials/, the fine-tuning runs of the trials
        rows = [json.loads(line) for line in storage.read_text(result_file).splitlines() if line.strip()]
        assert [r["epoch"] for r in rows] in ([1], [1, 2]), result_file  # ASHA may stop one at epoch 1
        spans.append((rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"]))
    return spans


def _check_staged_fine_tuning(out: str, data: str, pretrained: str) -> None:
    """The fine-tuning stage's whole path: inflation, stage 1 (head) then stage 2, best epoch by
    val AUROC, threshold from val, test metrics and every artifact."""
    files = storage.list_files(out)
    for name in ("best_model.pt", "training_history.json", "training_config.json", "test_metrics.json",
                 "roc_curve.png", "learning_curves.png"):
        assert files.get(storage.join(out, name), 0) > 0, name
    history = json.loads(storage.read_text(storage.join(out, "training_history.json")))
    assert [h["stage"] for h in history] == [1, 2]
    n_val = len(read_split(storage.join(data, "val"))["label"])
    assert all(sum(map(sum, h["val_confusion"])) == n_val for h in history)
    assert storage.list_files(storage.join(out, "tensorboard")), "TensorBoard scalars go with the run"
    n_train = len(read_split(storage.join(data, "train"))["label"])  # every record once per epoch
    assert all(round(h["records_per_s"] * h["train_s"]) == n_train for h in history)
    assert all(0 <= h["data_wait_fraction"] <= 1 and 0 <= h["first_batch_wait_s"] <= h["train_s"] for h in history)
    head = 192 * 2 + 2
    assert history[0]["trainable_params"] == head and history[1]["trainable_params"] > 10 * head
    metrics = json.loads(storage.read_text(storage.join(out, "test_metrics.json")))
    test = read_split(storage.join(data, "test"))
    assert metrics["test"]["n"] == len(test["label"]) == sum(map(sum, metrics["test"]["confusion"]))
    model, desc = load_classifier(storage.join(out, "best_model.pt"))
    assert desc["channels"] == ["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"] and desc["init"] == "pretrained"
    assert desc["threshold"] == metrics["test"]["threshold"]
    assert desc["data_spec"] == read_data_spec(storage.join(data, "train"))
    predicted = (predict(model, test["signal"], test["present"]) >= desc["threshold"]).astype(int)
    confusion = metrics["test"]["confusion"]
    assert int((predicted == test["label"]).sum()) == confusion[0][0] + confusion[1][1]
    with pytest.raises(BiofmError, match="--resume"):
        finetune(FinetuneConfig(), pretrained, data, out)
