"""Benchmark: pretraining throughput, a plain PyTorch loop vs Ray Train with 1 and 2 workers.

Same model (TTM as configs/ssl_pretrain.yaml), same batch size, same Parquet windows: the real
recordings of ../shared/realdata/vital tiled to an hour (as in bench_preprocess) and windowed by
biofm.preprocess. Throughput is windows/s over the epochs after the first (warm-up excluded);
"waiting" is the share of training time spent waiting for the next batch; "1st batch" the seconds
until an epoch's first batch arrives, and "steady" the waiting share once it has. Every run takes
its batches from biofm.train.batches as pretraining does: (a), (b) and (c) as configured (held in
memory below ``cache_mb``); (d) streams them from Parquet every epoch.

    python jobs/bench_train.py --epochs 3 --batch-size 128 --cases 12
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch

from bench_preprocess import make_cases


def build_windows_once(workdir: Path, n_cases: int) -> Path:
    from biofm.config import ChannelsConfig, WindowsConfig, load_config
    from biofm.preprocess import process_case
    from biofm.sources.vitaldb import DirectorySource

    data = workdir / f"train_windows_{n_cases}"
    if (data / "val").is_dir():
        return data
    root = Path(__file__).parents[1]
    channels = load_config(ChannelsConfig, root / "configs/channels.yaml").select(["PPG", "ECG"])
    windows = load_config(WindowsConfig, root / "configs/windows.yaml")
    cases = make_cases(workdir, n_cases + 1, 1.0)
    for split, ids in (("train", [str(i) for i in range(1, n_cases + 1)]), ("val", [str(n_cases + 1)])):
        (data / split / "_cases").mkdir(parents=True, exist_ok=True)
        for c in ids:
            process_case(c, DirectorySource(str(cases)), channels, windows, data / split)
    return data


def plain_loop(cfg, data: Path) -> dict:
    """The same training step as Ray Train's loop (its losses, the sync-free step; compiled when
    ``cfg.compile``), on the same batches, in this process."""
    from biofm.model.ssl import random_mask
    from biofm.model.ttm_weights import initial_model
    from biofm.train.batches import WaitClock, scan
    from biofm.train.pretrain import loaders, pretraining_losses
    from biofm.train.step import adamw, compiled_for_batch, step

    split = scan(str(data / "train"), cfg.channels)
    model = initial_model(cfg, split.spec["window_samples"])[0]
    losses = pretraining_losses(model, cfg, split.spec)
    forward = compiled_for_batch(losses, cfg.batch_size, torch.device("cpu")) if cfg.compile else losses
    params = list(model.parameters())
    optimizer = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_batches, _ = loaders(cfg, split, scan(str(data / "val"), cfg.channels))
    epochs = []
    for epoch in range(cfg.epochs):
        clock = WaitClock(train_batches.epoch(epoch))
        for batch in clock:
            x = batch["signal"]
            terms = forward(x, random_mask(len(x), x.shape[1], model.patches, cfg.mask_ratio))
            step(terms[0], optimizer, torch.amp.GradScaler("cpu", enabled=False), params, cfg.grad_clip)
        epochs.append({**clock.metrics(), "windows_per_s": train_batches.windows / clock.metrics()["train_s"]})
    return summarise(epochs[1:])


def summarise(epochs: list[dict]) -> dict:
    """Means over ``epochs`` (``windows_per_s``, ``data_wait_fraction``, ``first_batch_wait_s``,
    ``train_s``, as in training_history.json), and the waiting share once the first batch is in."""
    return {"windows_per_s": float(np.mean([e["windows_per_s"] for e in epochs])),
            "data_wait_fraction": float(np.mean([e["data_wait_fraction"] for e in epochs])),
            "first_batch_s": float(np.mean([e["first_batch_wait_s"] for e in epochs])),
            "steady_wait_fraction": float(np.mean([(e["data_wait_fraction"] * e["train_s"] - e["first_batch_wait_s"])
                                                   / (e["train_s"] - e["first_batch_wait_s"]) for e in epochs]))}


def ray_train(cfg, data: Path, out: Path) -> dict:
    import json

    from biofm.train.pretrain import pretrain

    shutil.rmtree(out, ignore_errors=True)
    pretrain(cfg, data, out)
    history = json.loads((out / "training_history.json").read_text())
    return {**summarise(history[1:]), "first_step_s": history[0]["first_step_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cases", type=int, default=12, help="one-hour training cases (344 windows each)")
    p.add_argument("--workdir", default="/tmp/biofm-bench")
    p.add_argument("--compiled", action="store_true", help="add (e): one worker with compile: true (its first epoch "
                   "compiles; the figures are of the epochs after it)")
    args = p.parse_args()
    import ray

    from biofm.config import PretrainConfig, load_config

    root = Path(__file__).parents[1]
    cfg = dataclasses.replace(load_config(PretrainConfig, root / "configs/ssl_pretrain.yaml"),
                              epochs=args.epochs, batch_size=args.batch_size, use_gpu=False)
    workdir = Path(args.workdir)
    data = build_windows_once(workdir, args.cases)
    n = sum(1 for _ in data.joinpath("train").glob("*.parquet"))
    print(f"{n} one-hour cases of windows, batch {cfg.batch_size}, {cfg.epochs} epochs, "
          f"torch threads {torch.get_num_threads()}, {cfg.num_layers} TTM layers")
    first = plain_loop(cfg, data)
    runs = {"(a) plain PyTorch loop": first}
    ray.init(num_cpus=2)
    for workers in (1, 2):
        runs[f"({'bc'[workers - 1]}) Ray Train, {workers} worker{'s' * (workers > 1)}"] = ray_train(
            dataclasses.replace(cfg, num_workers=workers), data, workdir / f"train_out_{workers}")
    # the same split streamed from Parquet every epoch instead of cached (cache_mb: 0)
    runs["(d) Ray Train, 1, streamed"] = ray_train(
        dataclasses.replace(cfg, num_workers=1, cache_mb=0.0), data, workdir / "train_out_streamed")
    if args.compiled:
        runs["(e) Ray Train, 1, compiled"] = ray_train(
            dataclasses.replace(cfg, num_workers=1, compile=True), data, workdir / "train_out_compiled")
    ray.shutdown()
    again = plain_loop(cfg, data)  # the machine drifts: the baseline is the mean of a run before and after
    runs["(a) plain PyTorch loop"] = {k: (first[k] + again[k]) / 2 for k in first}
    print(f"(a) before Ray: {first['windows_per_s']:.1f} windows/s, after: {again['windows_per_s']:.1f}")
    base = runs["(a) plain PyTorch loop"]["windows_per_s"]
    print(f"\n{'run':28s} {'windows/s':>10s} {'vs (a)':>7s} {'waiting':>8s} {'1st batch':>10s} {'steady':>7s}")
    for name, r in runs.items():
        print(f"{name:28s} {r['windows_per_s']:10.1f} {r['windows_per_s'] / base:7.2f} "
              f"{100 * r['data_wait_fraction']:7.1f}% {r['first_batch_s']:9.2f}s {100 * r['steady_wait_fraction']:6.1f}%")
    one = runs["(b) Ray Train, 1 worker"]
    print(f"targets: (b)/(a) = {one['windows_per_s'] / base:.2f} (>= 0.9: "
          f"{'PASS' if one['windows_per_s'] >= 0.9 * base else 'FAIL'}); waiting {100 * one['data_wait_fraction']:.1f}% "
          f"(< 10%: {'PASS' if one['data_wait_fraction'] < 0.1 else 'FAIL'})")


if __name__ == "__main__":
    main()
