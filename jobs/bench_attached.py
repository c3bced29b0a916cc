"""Benchmark: a small job on a Ray it starts itself (cold) against the same job attached to a
long-lived local Ray (``ray start --head`` once, then ``--address``).

Two commands, as a user types them, each timed end to end (the process's start to its exit,
Python's and torch's imports included), alternating cold and attached ``--repeats`` times so the
shared machine's drift falls on both:

    prepare-task --task butppg-quality on the BUT-PPG records of ../shared/realdata
    embed of that task's windows with the encoder of configs/ssl_pretrain.yaml (random weights:
    the time does not depend on them)

The long-lived Ray is started here with token authentication, as Ray 2.60's ``ray start --head``
does, on 2 CPUs, and stopped at the end (its own processes only: never ``ray stop``). The
figures are medians; the saving is cold / attached.

    python jobs/bench_attached.py --realdata ../shared/realdata --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pyarrow.dataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def start_head(temp: Path, cpus: int) -> tuple[subprocess.Popen, str, dict]:
    """A ``ray start --head --block`` process with token authentication; its address and the
    environment a client needs."""
    token = temp / "auth_token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
                             f"--temp-dir={temp / 'ray'}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    probe = f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)"
    while subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=60).returncode != 0:
        if time.time() > deadline or head.poll() is not None:
            raise SystemExit("bench_attached: the long-lived Ray did not start")
        time.sleep(1)
    return head, address, env


def stop(head: subprocess.Popen) -> None:
    family = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    for p in family:
        p.kill()
    psutil.wait_procs(family, timeout=30)


def timed(args: list[str], env: dict, cwd: Path) -> float:
    """Seconds from the command's start to its exit (a failure stops the benchmark)."""
    t0 = time.perf_counter()
    done = subprocess.run([str(BIN / "biofm"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bench_attached: biofm {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realdata", default=str(ROOT.parent / "shared" / "realdata"))
    p.add_argument("--repeats", type=int, default=3, help="cold and attached runs of each command")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the long-lived Ray")
    p.add_argument("--output", default=None, help="write the figures here as JSON")
    args = p.parse_args()
    raw = Path(args.realdata) / "butppg"
    if not raw.is_dir():
        raise SystemExit(f"bench_attached: no BUT-PPG records at {raw} (pass --realdata)")
    sys.path.insert(0, str(ROOT / "jobs"))
    from bench_inference import write_checkpoint

    temp = Path(tempfile.mkdtemp(prefix="att", dir="/tmp"))   # short: Ray's socket paths stay < 108 chars
    head, address, env = start_head(temp, args.cpus)
    cold_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    try:
        task = ["prepare-task", "--task", "butppg-quality", "--raw-dir", str(raw.resolve())]
        timed([*task, "--outdir", "task"], cold_env, temp)   # the windows the embed reads; imports warmed
        ckpt = write_checkpoint(temp / "task" / "test", temp / "encoder.pt")
        embed = ["embed", "--checkpoint", ckpt, "--data-dir", str(temp / "task" / "test")]
        times = {"prepare-task": {"cold": [], "attached": []}, "embed": {"cold": [], "attached": []}}
        for i in range(args.repeats):
            for mode, extra, run_env in (("cold", [], cold_env), ("attached", ["--address", address], env)):
                out = f"{mode}{i}"
                times["prepare-task"][mode].append(timed([*task, "--outdir", f"task_{out}", *extra], run_env, temp))
                times["embed"][mode].append(timed([*embed, "--output", f"emb_{out}", *extra], run_env, temp))
    finally:
        stop(head)
    windows = pyarrow.dataset.dataset(str(temp / "task" / "test"), format="parquet").count_rows()
    shutil.rmtree(temp, ignore_errors=True)
    result = {}
    print(f"| command | cold, s | attached, s | cold / attached |  (medians of {args.repeats}; embed: {windows} windows)")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        cold, attached = statistics.median(t["cold"]), statistics.median(t["attached"])
        result[name] = {**t, "cold_median_s": cold, "attached_median_s": attached, "ratio": cold / attached}
        print(f"| {name} | {cold:.1f} | {attached:.1f} | {cold / attached:.2f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
