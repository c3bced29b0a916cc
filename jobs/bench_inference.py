"""Benchmark: embeddings through Ray Data (biofm embed's actor pool) against a plain torch loop.

The same windows (the real recordings tiled to one-hour cases, as bench_ingest builds them) and
the same encoder (configs/ssl_pretrain.yaml's architecture, random weights: speed does not
depend on them), in one run:

    (a1) plain loop in this process, 1 torch thread    (r1) biofm embed on a 1-CPU Ray
    (a2) plain loop in this process, 2 torch threads   (r2) biofm embed on a 2-CPU Ray
    (the plain loops run before Ray starts and again after it stops; each baseline is the mean
    of its two rates, as this shared machine drifts)
    and (r2) again on 4x the windows, for the memory of the actors (flat when it streams): their
    private memory ("actor MB", sampled every 5th batch), less the object-store pages they map
    ("store MB", Ray's shared memory, bounded by Ray Data's backpressure). Flat: within the 4x
    run, the actor's peak over the other 3x the windows against its peak over the first 1x (the
    same actor; the peaks of the two fresh runs are printed too, but a fresh actor's starting
    memory varies by tens of MB).

For each embed run: end to end (the call of embed() to its manifest; Ray itself is running
before), its start-up (until the first batch reaches a model: an actor process importing torch,
transformers and tsfm_public and loading the checkpoint, a fixed cost per job) and its steady
rate (windows over the time from the first warm batch's start to the last one's end, as the
actors record it). Warm: a model's first 8 batches run slower (first touch of its memory and
threads) and are left out of every steady rate, the plain loop's too, as bench_train leaves out
the first epoch. Reading an actor's memory takes 40-60 ms (its /proc smaps), which the actor
spends between batches: that time is left out of the rates. The plain loop's model is loaded
before its clock starts.

    python jobs/bench_inference.py --cases 48
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from bench_ingest import build_split
from biofm import infer
from biofm.infer import Embedder

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 8  # batches per model left out of its steady rate


def write_checkpoint(split_dir: Path, path: Path) -> str:
    from biofm.config import PretrainConfig, load_config, to_jsonable
    from biofm.model.ssl import MaskedSignalModel, ttm_config
    from biofm.dataset import read_data_spec
    from biofm.train import checkpoint

    cfg = load_config(PretrainConfig, ROOT / "configs/ssl_pretrain.yaml")
    model_cfg = ttm_config(len(cfg.channels), cfg.num_layers, cfg.d_model)
    torch.manual_seed(0)
    desc = {"kind": "masked_signal_model", "channels": list(cfg.channels), "data_spec": read_data_spec(split_dir),
            "ttm_config": json.loads(json.dumps(model_cfg.to_dict(), default=str)),
            "pretrain_config": to_jsonable(cfg)}
    return checkpoint.save(path, MaskedSignalModel(model_cfg).state_dict(), desc)


def plain_loop(ckpt: str, split_dir: Path, threads: int, batch_size: int, device: str = "cpu") -> dict:
    """The encoder and pooling of biofm embed, over the training loops' batches, in this process."""
    from biofm.infer import load_encoder
    from biofm.model.classifier import pool
    from biofm.train.batches import WindowBatches, scan

    torch.set_num_threads(threads)
    encoder, _ = load_encoder(ckpt)
    encoder.to(device)
    t0 = time.perf_counter()
    calls = []  # (start, end, windows) of each batch, its reading included
    with torch.no_grad():
        for batch in WindowBatches(scan(str(split_dir)), ["signal"], batch_size, device=torch.device(device)).epoch(0):
            n = len(pool(encoder(batch["signal"])).cpu())
            calls.append((calls[-1][1] if calls else t0, time.perf_counter(), n))
    return {"windows": sum(c[2] for c in calls), "seconds": calls[-1][1] - t0,
            "steady_windows_per_s": steady_rate([calls])}


def warm(model: list) -> list:
    """A model's ``(start, end, windows, ...)`` batches less its first ``WARMUP`` (or its first
    half, when it ran fewer than twice as many)."""
    return sorted(model)[min(WARMUP, len(model) // 2):]


def steady_rate(per_model: list[list], measuring: float = 0.0) -> float:
    """Windows/s once every model is warm: the windows of their warm batches over the time from
    the first of those to the last, less ``measuring`` seconds of the benchmark's own."""
    calls = [c for model in per_model for c in warm(model)]
    return sum(c[2] for c in calls) / (max(c[1] for c in calls) - min(c[0] for c in calls) - measuring)


def private_mb(process: psutil.Process) -> tuple[float, float]:
    """``(own, store)`` MB: a process's private memory less the object-store pages it maps (Ray's
    shared memory, bounded by Ray Data's backpressure), and those pages."""
    maps = process.memory_maps(grouped=True)
    store = sum(m.private_clean + m.private_dirty for m in maps if "plasma" in m.path) / 2**20
    return sum(m.private_clean + m.private_dirty for m in maps) / 2**20 - store, store


class TimedEmbedder(Embedder):
    """biofm's Embedder, recording each batch's start, end and windows, and every 5th batch the
    actor's memory, and the seconds this record-keeping took (``$BENCH_TIMING_DIR/<pid>.jsonl``).
    Every 5th, not 4th or 16th: the actor trims every 16 batches, and a period sharing a factor
    with 16 would see the same few points of the saw-tooth."""

    batches = 0

    def __call__(self, batch):
        t0 = time.time()
        out = super().__call__(batch)
        t1, self.batches = time.time(), self.batches + 1
        memory = private_mb(psutil.Process()) if self.batches % 5 == 1 else (None, None)
        with open(Path(os.environ["BENCH_TIMING_DIR"]) / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps([t0, t1, len(out["embedding"]), *memory, time.time() - t1]) + "\n")
        return out


def ray_embed(ckpt: str, split_dir: Path, out: Path, cpus: int | None, batch_size: int, num_gpus: float = 0.0,
              compile: bool | None = False, bf16: bool = False) -> dict:
    """biofm embed on a fresh local Ray with ``cpus`` CPUs (``compile``, ``bf16``: as embed's):
    seconds end to end, start-up, steady windows/s, and the memory of its actors as the windows go
    through."""
    import ray

    from biofm import output

    shutil.rmtree(out, ignore_errors=True)
    timing = out.with_name(out.name + "_timing")
    shutil.rmtree(timing, ignore_errors=True)
    timing.mkdir(parents=True)
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": {"BENCH_TIMING_DIR": str(timing)}},
             **output.ray_init_options())
    infer.Embedder = TimedEmbedder  # measurement only: the same model calls, timed
    try:
        t0 = time.time()
        m = infer.embed(ckpt, str(split_dir), str(out), batch_size=batch_size, num_gpus=num_gpus, compile=compile,
                        bf16=bf16)
        seconds = time.time() - t0
    finally:
        infer.Embedder = Embedder
    ray.shutdown()
    per_actor = [[json.loads(line) for line in f.read_text().splitlines()] for f in timing.glob("*.jsonl")]
    calls = sorted(c for actor in per_actor for c in actor)
    done = np.cumsum([c[2] for c in calls])
    memory = [(int(n), c[3], c[4]) for n, c in zip(done, calls) if c[3] is not None]
    # the record-keeping (reading /proc/<pid>/smaps: 40-60 ms) runs between batches: the benchmark's own time, left out
    last = max(c[1] for c in calls)
    warm_from = min(warm(actor)[0][0] for actor in per_actor)
    measuring = sum(c[5] for c in calls if c[1] < last) / len(per_actor)
    measuring_warm = sum(c[5] for c in calls if warm_from <= c[0] and c[1] < last) / len(per_actor)
    return {"windows": m["embeddings"], "seconds": seconds - measuring, "actors": m["actors"],
            "startup_s": calls[0][0] - t0, "measuring_s": measuring,
            "steady_windows_per_s": steady_rate(per_actor, measuring_warm), "memory": memory,
            "actor_mb": max(x[1] for x in memory), "actor_store_mb": max(x[2] for x in memory)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=48, help="one-hour cases (about 344 windows each)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workdir", default="/tmp/biofm-bench")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    from biofm import output

    output.configure(verbose=False)
    workdir = Path(args.workdir)
    split = build_split(workdir, args.cases, 1)
    big = build_split(workdir, 4 * args.cases, 1)
    ckpt = write_checkpoint(split, workdir / "bench_inference.pt")
    before = {threads: plain_loop(ckpt, split, threads, args.batch_size) for threads in (1, 2)}
    ray_runs = {f"(r{cpus}) biofm embed, {cpus}-CPU Ray": ray_embed(ckpt, split, workdir / "embed_out", cpus,
                                                                   args.batch_size) for cpus in (1, 2)}
    ray_runs["(r2) 4x the windows"] = ray_embed(ckpt, big, workdir / "embed_out", 2, args.batch_size)
    after = {threads: plain_loop(ckpt, split, threads, args.batch_size) for threads in (1, 2)}
    runs = {}
    for threads in (1, 2):  # the baseline: the mean of the rates before Ray starts and after it stops
        pair = (before[threads], after[threads])
        rates = [r["windows"] / r["seconds"] for r in pair]
        print(f"(a{threads}) plain loop: {rates[0]:.0f} windows/s before the Ray runs, {rates[1]:.0f} after")
        runs[f"(a{threads}) plain loop, {threads} thread(s)"] = {
            "windows": pair[0]["windows"], "seconds": pair[0]["windows"] / np.mean(rates),
            "steady_windows_per_s": np.mean([r["steady_windows_per_s"] for r in pair]),
            "before_windows_per_s": rates[0], "after_windows_per_s": rates[1]}
    runs.update(ray_runs)
    print(f"\n{'run':32s} {'windows':>8s} {'seconds':>8s} {'windows/s':>10s} {'vs plain':>9s} {'start-up s':>10s} "
          f"{'steady w/s':>10s} {'vs plain':>9s} {'actor MB':>9s} {'store MB':>9s}")
    for name, r in runs.items():
        r["windows_per_s"] = r["windows"] / r["seconds"]
        base = runs["(a1) plain loop, 1 thread(s)" if name.startswith(("(a1)", "(r1)")) else "(a2) plain loop, 2 thread(s)"]
        r["vs_plain"] = r["windows_per_s"] / base["windows_per_s"]
        r["steady_vs_plain"] = r["steady_windows_per_s"] / base["steady_windows_per_s"]
        print(f"{name:32s} {r['windows']:8d} {r['seconds']:8.1f} {r['windows_per_s']:10.0f} {r['vs_plain']:9.2f} "
              f"{r.get('startup_s', 0.0):10.1f} {r['steady_windows_per_s']:10.0f} "
              f"{r['steady_vs_plain']:9.2f} {r.get('actor_mb', float('nan')):9.0f} "
              f"{r.get('actor_store_mb', float('nan')):9.0f}")
    r2, big = runs["(r2) biofm embed, 2-CPU Ray"], runs["(r2) 4x the windows"]
    first = max(mb for n, mb, _ in big["memory"] if n <= r2["windows"])
    rest = max(mb for n, mb, _ in big["memory"] if n > r2["windows"])
    growth = rest / first
    print(f"(r2) 4x run: actor memory at most {first:.0f} MB over its first {r2['windows']} windows, {rest:.0f} MB over the "
          f"other {big['windows'] - r2['windows']}; peaks of the fresh runs {r2['actor_mb']:.0f} MB (1x) and "
          f"{big['actor_mb']:.0f} MB (4x)")
    print(f"targets: (r2) steady {r2['steady_vs_plain']:.2f} x the plain loop (>= 0.8: "
          f"{'PASS' if r2['steady_vs_plain'] >= 0.8 else 'FAIL'}; end to end {r2['vs_plain']:.2f} x, "
          f"{big['vs_plain']:.2f} x at 4x the windows, after {r2['startup_s']:.1f} s of start-up); actor memory from "
          f"1x to 4x the windows {growth:.2f} x (flat, < 1.2: {'PASS' if growth < 1.2 else 'FAIL'})")
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
