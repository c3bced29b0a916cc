"""Benchmark: embeddings through Ray Data (biofm embed's actor pool) against a plain torch loop.

The same windows (the real recordings tiled to one-hour cases, as bench_ingest builds them) and
the same encoder (configs/ssl_pretrain.yaml's architecture, random weights: speed does not
depend on them), in one run:

    (a1) plain loop in this process, 1 torch thread    (r1) biofm embed on a 1-CPU Ray
    (a2) plain loop in this process, 2 torch threads   (r2) biofm embed on a 2-CPU Ray
    and (r2) again on 4x the windows, for the memory of the actors (flat when it streams).

Windows/s are end to end (Ray's start-up excluded: it is running before each embed starts).

    python jobs/bench_inference.py --cases 24
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import psutil
import torch

from bench_ingest import build_split

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(split_dir: Path, path: Path) -> str:
    from biofm.config import PretrainConfig, load_config, to_jsonable
    from biofm.model.ssl import MaskedSignalModel, ttm_config
    from biofm.preprocess import read_data_spec
    from biofm.train import checkpoint

    cfg = load_config(PretrainConfig, ROOT / "configs/ssl_pretrain.yaml")
    model_cfg = ttm_config(len(cfg.channels), cfg.num_layers, cfg.d_model)
    torch.manual_seed(0)
    desc = {"kind": "masked_signal_model", "channels": list(cfg.channels), "data_spec": read_data_spec(split_dir),
            "ttm_config": json.loads(json.dumps(model_cfg.to_dict(), default=str)),
            "pretrain_config": to_jsonable(cfg)}
    return checkpoint.save(path, MaskedSignalModel(model_cfg).state_dict(), desc)


def plain_loop(ckpt: str, split_dir: Path, threads: int, batch_size: int) -> dict:
    """The encoder and pooling of biofm embed, over the training loops' batches, in this process."""
    from biofm.infer import load_encoder
    from biofm.model.classifier import pool
    from biofm.train.batches import WindowBatches, scan

    torch.set_num_threads(threads)
    encoder, _ = load_encoder(ckpt)
    t0, n = time.perf_counter(), 0
    with torch.no_grad():
        for batch in WindowBatches(scan(str(split_dir)), ["signal"], batch_size).epoch(0):
            n += len(pool(encoder(batch["signal"])))
    return {"windows": n, "seconds": time.perf_counter() - t0}


def ray_embed(ckpt: str, split_dir: Path, out: Path, cpus: int, batch_size: int) -> dict:
    """biofm embed on a fresh local Ray with ``cpus`` CPUs; the peak memory of its actors."""
    import ray

    from biofm import output
    from biofm.infer import embed

    shutil.rmtree(out, ignore_errors=True)
    ray.init(num_cpus=cpus, include_dashboard=False, **output.ray_init_options())
    peak, done = {"actor_mb": 0.0}, threading.Event()

    def watch():
        while not done.is_set():
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                if "MapBatches(Embedder)" in " ".join(p.info["cmdline"] or []) and p.info["memory_info"]:
                    peak["actor_mb"] = max(peak["actor_mb"], p.info["memory_info"].rss / 2**20)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    m = embed(ckpt, str(split_dir), str(out), batch_size=batch_size)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    ray.shutdown()
    return {"windows": m["embeddings"], "seconds": seconds, "actors": m["actors"], **peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=24, help="one-hour cases (about 344 windows each)")
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
    runs = {}
    for threads in (1, 2):
        runs[f"(a{threads}) plain loop, {threads} thread(s)"] = plain_loop(ckpt, split, threads, args.batch_size)
    for cpus in (1, 2):
        runs[f"(r{cpus}) biofm embed, {cpus}-CPU Ray"] = ray_embed(ckpt, split, workdir / "embed_out", cpus,
                                                                  args.batch_size)
    runs["(r2) 4x the windows"] = ray_embed(ckpt, big, workdir / "embed_out", 2, args.batch_size)
    print(f"\n{'run':32s} {'windows':>8s} {'seconds':>8s} {'windows/s':>10s} {'vs plain':>9s} {'actor MB':>9s}")
    for name, r in runs.items():
        r["windows_per_s"] = r["windows"] / r["seconds"]
        base = runs["(a1) plain loop, 1 thread(s)" if name.startswith(("(a1)", "(r1)")) else "(a2) plain loop, 2 thread(s)"]
        ratio = r["windows_per_s"] / (base["windows"] / base["seconds"])
        print(f"{name:32s} {r['windows']:8d} {r['seconds']:8.1f} {r['windows_per_s']:10.0f} {ratio:9.2f} "
              f"{r.get('actor_mb', float('nan')):9.0f}")
    r2, base2 = runs["(r2) biofm embed, 2-CPU Ray"], runs["(a2) plain loop, 2 thread(s)"]
    ratio = r2["windows_per_s"] / (base2["windows"] / base2["seconds"])
    big = runs["(r2) 4x the windows"]
    growth = big["actor_mb"] / max(r2["actor_mb"], 1e-9)
    beyond = (big["windows"] - r2["windows"]) / (big["seconds"] - r2["seconds"])
    print(f"(r2) beyond its start-up (the 4x run less the 1x run): {beyond:.0f} windows/s, "
          f"{beyond / (base2['windows'] / base2['seconds']):.2f} x the plain loop")
    print(f"targets: (r2) {ratio:.2f} x the plain loop (>= 0.8: {'PASS' if ratio >= 0.8 else 'FAIL'}); actor memory "
          f"at 4x the windows {growth:.2f} x (flat, < 1.2: {'PASS' if growth < 1.2 else 'FAIL'})")
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
