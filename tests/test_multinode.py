"""Lost nodes on a real multi-node Ray cluster (tests/ray_cluster.py: a head without CPUs and
1-CPU worker nodes, token authentication on, jobs sent with `ray job submit`, outputs on the
session's S3 server). Each test kills a node with SIGKILL while a job runs on it, then checks
that the job finished with every case, window, epoch and trial exactly once."""

from __future__ import annotations

import csv
import functools
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler

import numpy as np
import pytest

from biofm import storage
from biofm.config import ChannelsConfig, FinetuneConfig, WindowsConfig, load_config
from biofm.errors import BiofmError
from biofm.preprocess import build_windows
from biofm.dataset import read_data_spec, read_manifest
from biofm.train.finetune import finetune, load_classifier, predict, read_split
from biofm.train.metrics import choose_threshold, classification_metrics
from biofm.sources.vitaldb import ApiSource
from conftest import REAL_BUTPPG, REAL_VITAL, ROOT, _Server, requires_realdata
from ray_cluster import LocalCluster

pytestmark = [pytest.mark.slow, requires_realdata(REAL_VITAL), pytest.mark.timeout(600)]

CASES = [str(i) for i in range(1, 13)]  # twelve cases served from the six real recordings
RECORDINGS = sorted(REAL_VITAL.glob("*.vital"))


@pytest.fixture(scope="module")
def cluster(s3):
    """One cluster for the module: a head without CPUs and two 1-CPU worker nodes. A test that
    kills a node adds one back, so the next test starts with two again."""
    c = LocalCluster(head_cpus=0, extra_env=s3)
    try:
        c.add_node()
        c.add_node()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def slow_api():
    """The real recordings as the VitalDB API on 127.0.0.1 (case ``i`` is recording ``(i-1) % 6``),
    each answer held back 1 s so that a node can be lost while cases are in flight."""

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.strip("/").removesuffix(".vital")
            if not name.isdigit():  # the reachability check asks for the root
                self.send_response(404)
                self.end_headers()
                return
            self.server.hits[name] = self.server.hits.get(name, 0) + 1
            body = RECORDINGS[(int(name) - 1) % len(RECORDINGS)].read_bytes()
            time.sleep(1.0)
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the reader's node was lost
                pass

        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), Slow)
    server.hits = {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _replace_lost_node(cluster: LocalCluster, lost: str) -> None:
    assert lost not in cluster.workers()
    cluster.add_node()


def test_build_windows_loses_a_node_and_every_case_ends_once(cluster, slow_api, ray_session, tmp_path):
    """The node's case in flight is read again elsewhere; the result equals an uninterrupted run's."""
    api = f"http://127.0.0.1:{slow_api.server_address[1]}"
    out = f"s3://biofm/{uuid.uuid4().hex[:8]}/windows"
    split_file = f"s3://biofm/{uuid.uuid4().hex[:8]}/splits.json"
    storage.write_text(split_file, json.dumps({"train": CASES, "val": [], "test": []}))
    job = cluster.submit(["python", "jobs/build_windows.py", "--split-file", split_file, "--split", "train",
                          "--outdir", out, "--source", "api", "--api-url", api])
    deadline, done = time.time() + 120, []
    while time.time() < deadline and len(done) < 3:  # a quarter of the cases written: kill a node midway
        done = storage.list_files(storage.join(out, "train", "_cases"), ".json") if storage.exists(
            storage.join(out, "train", "_cases")) else []
        time.sleep(0.3)
    assert len(done) >= 3, cluster.logs(job)[-3000:]
    victim = None
    while time.time() < deadline and victim is None:  # a node reading a case now (an idle worker is ray::IDLE)
        victim = cluster.node_running("_process_row")
        time.sleep(0.05)
    assert victim, cluster.logs(job)[-3000:]
    cluster.kill_node(victim)
    _replace_lost_node(cluster, victim)
    status, logs = cluster.wait(job, 300)
    assert "succeeded" in status, logs[-4000:]
    redone = sum(slow_api.hits.values()) - len(CASES)
    assert redone >= 1, f"no case was in flight on the lost node: {slow_api.hits}"
    print(f"\n[measured] build-windows: {len(done)} of {len(CASES)} cases written when the node was lost, "
          f"{redone} case(s) read again")

    manifest = read_manifest(out, "train")
    assert manifest["cases_in"] == len(CASES) == manifest["cases_ok"] + manifest["cases_skipped"]
    assert sorted(manifest["cases"]) == sorted(CASES)
    files = storage.list_files(storage.join(out, "train"), ".parquet")
    assert sorted(storage.name(f).removesuffix(".parquet") for f in files) == sorted(
        c for c, o in manifest["cases"].items() if o["status"] == "ok")
    # the same cases built by an uninterrupted run, here, give the same windows
    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
    reference = build_windows(CASES, ApiSource(base_url=api), channels, load_config(WindowsConfig, ROOT / "configs/windows.yaml"),
                              tmp_path / "reference", "train")
    assert {c: o["windows_kept"] for c, o in manifest["cases"].items() if o["status"] == "ok"} == {
        c: o["windows_kept"] for c, o in reference["cases"].items() if o["status"] == "ok"}
    assert manifest["windows_kept"] == reference["windows_kept"] > 0
    assert manifest["windows_rejected"] == reference["windows_rejected"]
    for f in files:
        ours = storage.read_table(f)
        theirs = storage.read_table(str(tmp_path / "reference" / "train" / storage.name(f)))
        assert ours.column("window_idx").to_pylist() == theirs.column("window_idx").to_pylist()
        assert np.array_equal(ours.column("signal").combine_chunks().to_numpy_ndarray(),
                              theirs.column("signal").combine_chunks().to_numpy_ndarray())


@pytest.fixture(scope="module")
def windows_on_s3(ray_session):
    """Windows of the six real recordings (one split, 0.5 s stride: about 950 windows in six
    files) on S3, built here."""
    import dataclasses

    from biofm.sources.vitaldb import DirectorySource

    out = f"s3://biofm/{uuid.uuid4().hex[:8]}/dense"
    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
    cfg = dataclasses.replace(load_config(WindowsConfig, ROOT / "configs/windows.yaml"), stride_s=0.5)
    build_windows([p.stem for p in RECORDINGS], DirectorySource(str(REAL_VITAL)), channels, cfg, out, "train")
    return out


def _embeddings(folder: str) -> dict[tuple[str, int], np.ndarray]:
    rows = {}
    for f in storage.list_files(folder, ".parquet"):
        t = storage.read_table(f)
        for case, idx, emb in zip(t.column("case_id").to_pylist(), t.column("window_idx").to_pylist(),
                                  t.column("embedding").to_pylist()):
            assert (case, idx) not in rows, f"window {case}:{idx} embedded twice"
            rows[(case, idx)] = np.asarray(emb)
    return rows


def test_embed_loses_the_node_of_its_actor_and_every_window_ends_once(cluster, windows_on_s3, ray_session, tmp_path):
    from biofm.infer import embed
    from conftest import write_pretrained

    ckpt = write_pretrained(f"s3://biofm/{uuid.uuid4().hex[:8]}/fm.pt")
    out = f"s3://biofm/{uuid.uuid4().hex[:8]}/embedded"
    target = storage.join(out, "embeddings")
    split = storage.join(windows_on_s3, "train")
    job = cluster.submit(["python", "jobs/embed.py", "--checkpoint", ckpt, "--data-dir", split, "--output", out,
                          "--batch-size", "64"])
    deadline = time.time() + 120
    while time.time() < deadline and not (storage.exists(target) and storage.list_files(target, ".parquet")):
        time.sleep(0.2)  # the first file of embeddings written: the others are still to come
    victim = cluster.node_running("Embedder")
    assert victim, cluster.logs(job)[-3000:]
    cluster.kill_node(victim)
    written_before = len(storage.list_files(target, ".parquet"))
    _replace_lost_node(cluster, victim)
    status, logs = cluster.wait(job, 300)
    assert "succeeded" in status, logs[-4000:]

    assert written_before < len(storage.list_files(target, ".parquet")), "the node was lost after the last batch"
    print(f"\n[measured] embed: {written_before} of {len(storage.list_files(target, '.parquet'))} files written "
          "when the node of the actor was lost")
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    windows = read_manifest(windows_on_s3, "train")["windows_kept"]
    assert manifest["windows_in"] == manifest["embeddings"] == windows
    ours = _embeddings(target)
    reference = _embeddings(str(tmp_path / "reference" / "embeddings")) if embed(
        ckpt, split, str(tmp_path / "reference"), batch_size=64) else {}
    assert len(ours) == windows and ours.keys() == reference.keys()
    worst = max(float(np.abs(ours[k] - reference[k]).max()) for k in ours)
    assert worst < 1e-4, worst


def _epoch_lines(logs: str, what: str, total: int) -> list[int]:
    """The epochs of ``[what] epoch k/total`` lines, in the order printed (a worker prints an
    epoch's line once its checkpoint is committed)."""
    return [int(m) for m in re.findall(rf"\[{what}\] epoch (\d+)/{total} ", logs)]


@requires_realdata(REAL_BUTPPG)
def test_pipeline_survives_a_lost_node_and_a_lost_cluster(cluster, s3, public_sources, tmp_path):
    """The main job with its own sources (the VitalDB API, BUT-PPG downloaded from PhysioNet,
    served from 127.0.0.1), every stage writing to S3. Pretraining (two DDP workers, one per
    node): a node is lost after epoch 1, a node is added back, training goes on; then the whole
    cluster is lost. The same `ray job submit` on a fresh cluster skips the finished stages and
    continues pretraining from its last checkpoint in storage; in its Tune search the node under
    a trial is lost after the trial's first epoch."""
    out = f"s3://biofm/{uuid.uuid4().hex[:8]}/pipeline"
    at = functools.partial(storage.join, out)
    raw = tmp_path / "but_ppg_raw"
    epochs = 10  # an epoch takes about a second: enough left to lose the cluster after the log is read, on a busy machine
    tune = ("{mode: grid, max_epochs: 3, grace_period: 2, max_concurrent_trials: 2, cpus_per_trial: 0.5, "
            "search: {init: {grid: [pretrained, scratch]}, head_epochs: {grid: [1]}, batch_size: {grid: [16]}}}")
    entrypoint = ["python", "jobs/pipeline.py", "--config", "configs/smoke.yaml", "--output-dir", out,
                  "--set", f"case_set={REAL_VITAL}", "--set", "vital_source=api",
                  "--set", f"api_url={public_sources}/vital", "--set", f"physionet_url={public_sources}/",
                  "--set", f"butppg_raw_dir={raw}",
                  "--set", f"pretrain={{epochs: {epochs}, num_layers: 2, batch_size: 8, warmup_epochs: 0, "
                           "num_workers: 2, cpus_per_worker: 1}", "--set", f"tune={tune}", "--set", "embed={split: val}"]
    job = cluster.submit(entrypoint)
    # the head lets in its owner only: no token (none in the environment, none in ~/.ray), or another one
    home = tmp_path / "stranger"
    home.mkdir()
    tokenless = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH_")} | {"HOME": str(home)}
    for stranger in (tokenless, {**cluster.env, "RAY_AUTH_TOKEN": "f" * 64}):
        refused = cluster.ray("job", "submit", "--address", cluster.url, "--no-wait", "--", "echo", "hi", env=stranger)
        said_back = (refused.stdout + refused.stderr).lower()
        assert refused.returncode != 0 and "raysubmit_" not in said_back and "token" in said_back, said_back[-2000:]
    logs = cluster.wait_for_log(job, f"[pretrain] epoch 1/{epochs} ", 240)
    seen_before_node_loss = max(_epoch_lines(logs, "pretrain", epochs))
    victim = cluster.node_running("RayTrainWorker")
    assert victim, logs[-3000:]
    lost_at = cluster.kill_node(victim)
    _replace_lost_node(cluster, victim)
    logs = cluster.wait_for_log(job, "[pretrain] continuing from the checkpoint of epoch", 240)
    node_loss_to_resumed_s = time.time() - lost_at
    resumed = "[pretrain] continuing from the checkpoint of epoch"
    logs = cluster.wait_for_log(job, "[pretrain] epoch ", 240, after=resumed)
    after_node_loss = logs[logs.rfind(resumed):]
    seen_before_cluster_loss = max(_epoch_lines(after_node_loss, "pretrain", epochs))
    assert seen_before_cluster_loss < epochs, "pretraining finished before the cluster could be lost"
    first_logs = cluster.logs(job)
    for name in list(cluster.nodes):  # the whole cluster, head included, gone at once
        cluster.kill_node(name)

    fresh = LocalCluster(head_cpus=0, extra_env=s3)
    try:
        fresh.add_node()
        fresh.add_node()
        job = fresh.submit(entrypoint)
        logs = fresh.wait_for_log(job, "[finetune] epoch 1/3 ", 420)  # a trial's first epoch: lose its node
        line = next(line for line in logs.splitlines() if "[finetune] epoch 1/3 " in line)
        victim = fresh.node_of(int(re.search(r"pid=(\d+)", line).group(1)))
        assert victim, line
        fresh.kill_node(victim)
        _replace_lost_node(fresh, victim)
        status, second_logs = fresh.wait(job, 420)
    finally:
        fresh.stop()
    assert "succeeded" in status, second_logs[-5000:]

    assert "[pipeline] pretrain: continuing" in second_logs
    assert "[pipeline] done: ran pretrain, butppg, finetune, tune, embed; skipped splits, windows" in second_logs
    report = json.loads(storage.read_text(at("pipeline.json")))
    assert [s["stage"] for s in report["stages"]] == ["splits", "windows", "pretrain", "butppg", "finetune", "tune", "embed"]
    splits = json.loads(storage.read_text(at("splits", "splits_fasttrack.json")))
    train, val = (read_manifest(at("vitaldb_windows"), s) for s in ("train", "val"))
    assert train["cases_in"] == 2 and val["cases_in"] == 1 and train["windows_kept"] > 0
    assert train["source"] == f"{public_sources}/vital"
    assert set(train["cases"]) == set(splits["train"][:2]) and set(val["cases"]) == set(splits["val"][:1])
    assert sum(o["windows_kept"] for o in train["cases"].values()) == train["windows_kept"] == sum(
        storage.read_table(f).num_rows for f in storage.list_files(at("vitaldb_windows", "train"), ".parquet"))
    assert "[prepare-butppg] downloading 51 records (210 files)" in second_logs
    assert "108 ECG/ACC files are not on the mirror" in second_logs  # the real subset is PPG only: 51 ECG + 3 ACC pairs
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in REAL_BUTPPG.iterdir())
    assert json.loads(storage.read_text(at("but_ppg", "manifest.json")))["records_ok"] == 51
    assert storage.is_file(at("foundation_model", "encoder", "config.json"))
    assert storage.list_dirs(at("foundation_model", "ray", "ray_train")), "Ray Train's checkpoints are under the URI"
    _check_staged_fine_tuning(at("but_ppg_finetuned"), at("but_ppg"), at("foundation_model", "best_model.pt"))
    assert second_logs.count("[finetune] epoch 2/2 ") == 1  # each progress line once (Ray's print patch doubled them)
    embedded = json.loads(storage.read_text(at("embeddings", "manifest.json")))  # read from and written to S3
    assert embedded["embeddings"] == val["windows_kept"] and embedded["data_dir"] == at("vitaldb_windows", "val")
    history = json.loads(storage.read_text(at("foundation_model", "training_history.json")))
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    attempts = [h["attempt"] for h in history]
    assert sorted(set(attempts)) == [1, 2, 3] and attempts == sorted(attempts), attempts
    # no committed epoch ran twice: the restarts began after the last epoch seen committed
    resumed_after = [attempts.index(2), attempts.index(3)]  # the epoch each restart continued from
    assert resumed_after[0] >= seen_before_node_loss and resumed_after[1] >= seen_before_cluster_loss, (
        resumed_after, seen_before_node_loss, seen_before_cluster_loss)
    printed = _epoch_lines(first_logs, "pretrain", epochs) + _epoch_lines(second_logs, "pretrain", epochs)
    assert all(printed.count(e) <= 1 for e in range(1, epochs + 1)), printed
    assert f"[pretrain] continuing from the checkpoint of epoch {resumed_after[1]}" in second_logs
    assert "[pretrain] starting from" in first_logs and "[pretrain] starting from" not in second_logs  # resumed, not restarted
    assert all(h["workers"] == 2 for h in history)
    assert storage.is_file(at("foundation_model", "best_model.pt"))

    # the search: each trial once in the report, the one whose node was lost continued
    results = _trial_results(at("tune", "finetune_schedules"))
    spans = [(rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"]) for rows in results]
    overlap = min(end for _, end in spans) - max(start for start, _ in spans)
    assert len(spans) == 2 and overlap > 5, f"the trials ran one after the other: {spans}"
    assert storage.is_file(at("tune", "finetune_schedules", "best_config.yaml"))
    rows = list(csv.DictReader(storage.read_text(at("tune", "finetune_schedules", "trials.csv")).splitlines()))
    assert len(rows) == len({r["trial"] for r in rows}) == 2 and {r["status"] for r in rows} <= {"completed", "stopped early"}
    continued = re.findall(r"\[finetune\] continuing from the checkpoint of epoch (\d+)", second_logs)
    assert continued and all(int(e) >= 1 for e in continued), second_logs[-4000:]
    restarted = []
    for rows in results:  # Tune's reports: a trial stopped early by ASHA writes no artifacts of its own
        attempts = [r["attempt"] for r in rows]
        assert attempts == sorted(attempts)
        if attempts[-1] > 1:
            restarted.append(rows[attempts.index(attempts[-1])]["epoch"] - 1)  # the epoch the last attempt continued from
    assert restarted and set(restarted) <= {int(e) for e in continued}, (restarted, continued)
    print(f"\n[measured] node lost -> pretraining resumed: {node_loss_to_resumed_s:.1f} s; pretraining continued "
          f"after epoch {resumed_after[0]} (last seen {seen_before_node_loss}) and after epoch {resumed_after[1]} "
          f"(last seen {seen_before_cluster_loss}) of {epochs}; Tune trials continued after epoch(s) {restarted}")


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


def _trial_results(exp: str) -> list[list[dict]]:
    """Per trial of a Tune experiment, its reports from Tune's result.json, each epoch at most once
    and in order (a report committed as the cluster died can be missing from the file: the trial
    continued from its checkpoint, seen as [1, 3]; a span of a trial: its first report's timestamp
    less the time it had run by then, to its last)."""
    results = []
    for result_file in [storage.join(d, "result.json") for d in storage.list_dirs(exp)]:
        if not storage.is_file(result_file):
            continue  # trials/, the fine-tuning runs of the trials
        rows = [json.loads(line) for line in storage.read_text(result_file).splitlines() if line.strip()]
        epochs = [r["epoch"] for r in rows]
        assert epochs == sorted(set(epochs)) and epochs[0] == 1, result_file
        results.append(rows)
    return results


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
    # the kept weights are those of the epoch with the best val AUROC, and the threshold is val's
    val = read_split(storage.join(data, "val"))
    p_val = predict(model, val["signal"], val["present"])
    best = max(h["val_auroc"] for h in history)
    assert classification_metrics(val["label"], p_val, 0.5)["auroc"] == pytest.approx(best, abs=1e-6)
    assert metrics["best_epoch"] in [h["epoch"] for h in history if h["val_auroc"] == best]
    assert desc["threshold"] == choose_threshold(val["label"], p_val)
    assert desc["data_spec"] == read_data_spec(storage.join(data, "train"))
    predicted = (predict(model, test["signal"], test["present"]) >= desc["threshold"]).astype(int)
    confusion = metrics["test"]["confusion"]
    assert int((predicted == test["label"]).sum()) == confusion[0][0] + confusion[1][1]
    with pytest.raises(BiofmError, match="--resume"):
        finetune(FinetuneConfig(), pretrained, data, out)
