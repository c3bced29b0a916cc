"""Benchmark: training ingest alone (no model), against pyarrow reading the same files.

The windows are the real recordings of ../shared/realdata/vital tiled to one-hour cases (as in
bench_preprocess), windowed once by biofm.preprocess, then written as ``--cases`` Parquet files
(``--files-per-case 4`` cuts each case in four: the same windows in four times the files). Every
run iterates ``--epochs`` epochs of batches of ``--batch-size`` and records, per epoch, the
seconds to the first batch, the rate after it ("steady") and the whole epoch's windows/s:

    (p) pyarrow, one process: every file read whole (``ParquetFile.read``, the fastest of
        pyarrow's readers here) and its signals made a numpy array
    (a) biofm's batches (the training loops' own), streamed, in a plain loop in this process
    (b) the same, cached                          (c) streamed, in a Ray Train worker
    (d) cached, in a Ray Train worker             (r) before: Ray Data's dataset shard in a Ray
        Train worker, streamed, iterated as the pretraining loop did (read_parquet,
        get_dataset_shard, iter_batches with a 512-window local shuffle buffer, 4 batches prefetched)
    (t=N) (a) with N reader threads (``read_ahead``: files decoded at once; ``--threads 1 2 4 8``)

    python jobs/bench_ingest.py --cases 200 --epochs 3
    python jobs/bench_ingest.py --cases 200 --files-per-case 4 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bench_preprocess import make_cases

ROOT = Path(__file__).resolve().parents[1]


def build_split(workdir: Path, n_cases: int, per_case: int) -> Path:
    """``n_cases`` one-hour cases of windows as ``n_cases * per_case`` files (built once)."""
    from biofm.config import ChannelsConfig, WindowsConfig, load_config
    from biofm.preprocess import process_case
    from biofm.sources.vitaldb import DirectorySource

    split = workdir / f"ingest_{n_cases}x{per_case}" / "train"
    if split.is_dir():
        return split
    base = workdir / "ingest_base"
    if not base.is_dir():
        channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
        windows = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
        cases = make_cases(workdir, 6, 1.0)
        (base / "_cases").mkdir(parents=True)
        for c in range(1, 7):
            process_case(str(c), DirectorySource(str(cases)), channels, windows, base)
    tables = [pq.read_table(base / f"{c}.parquet") for c in range(1, 7)]
    tmp = split.with_name(".train.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        table = tables[i % len(tables)]
        ids = np.full(table.num_rows, str(i + 1), dtype=object)
        table = table.set_column(table.schema.get_field_index("case_id"), "case_id", [ids.tolist()])
        bounds = np.linspace(0, table.num_rows, per_case + 1).astype(int)
        for j in range(per_case):
            name = f"{i + 1}.parquet" if per_case == 1 else f"{i + 1}-{j}.parquet"
            pq.write_table(table.slice(bounds[j], bounds[j + 1] - bounds[j]), tmp / name)
    tmp.rename(split)
    return split


def time_epoch(batches) -> dict:
    """Seconds to the first batch, windows/s after it and over the whole epoch."""
    t0 = time.perf_counter()
    first, n, n_first = None, 0, 0
    for batch in batches:
        n += len(batch["signal"])
        if first is None:
            first, n_first = time.perf_counter() - t0, n
    total = time.perf_counter() - t0
    return {"windows": n, "first_batch_s": first, "epoch_s": total, "windows_per_s": n / total,
            "steady_windows_per_s": (n - n_first) / max(total - first, 1e-9)}


def pyarrow_epochs(split: Path, epochs: int) -> list[dict]:
    def batches():
        for f in sorted(split.glob("*.parquet")):
            table = pq.ParquetFile(f).read(columns=["signal"])  # pyarrow's fastest way to read a file
            yield {"signal": table.column("signal").combine_chunks().to_numpy_ndarray()}

    return [time_epoch(batches()) for _ in range(epochs)]


def biofm_epochs(config: dict) -> list[dict]:
    """Epochs of biofm's batches as the training loops take them (in a Ray Train worker or not)."""
    from biofm.train.batches import WindowBatches

    device, rank, world = "cpu", 0, 1
    if config["in_ray"]:
        import ray.train
        import ray.train.torch

        device, rank = ray.train.torch.get_device(), ray.train.get_context().get_world_rank()
    batches = WindowBatches(config["split"], ["signal"], config["batch_size"], train=True, rank=rank, world=world,
                            cache_mb=config["cache_mb"], device=device, read_ahead=config.get("read_ahead", 4))
    return [time_epoch(batches.epoch(e)) for e in range(config["epochs"])]


def ray_data_epochs(config: dict) -> list[dict]:
    """The previous ingest: Ray Data's dataset shard, iterated as the pretraining loop did."""
    import ray.train
    import ray.train.torch
    import torch

    device = ray.train.torch.get_device()

    def batches():
        for b in ray.train.get_dataset_shard("train").iter_batches(
                batch_size=config["batch_size"], batch_format="numpy",
                local_shuffle_buffer_size=4 * config["batch_size"], prefetch_batches=4):
            yield {"signal": torch.from_numpy(b["signal"]).float().to(device)}

    return [time_epoch(batches()) for _ in range(config["epochs"])]


def in_worker(loop, config: dict, datasets: dict | None = None) -> list[dict]:
    """Run ``loop`` in one Ray Train worker (1 CPU, as pretraining's default, and a GPU where there
    is one: batches then arrive on it) and return its epochs (written to a file: a local benchmark)."""
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = f"ingest-{time.time_ns()}"
    result = Path(config["storage"]) / f"{name}.json"

    def train_loop(cfg):
        result.write_text(json.dumps(loop(cfg)))

    result.parent.mkdir(parents=True, exist_ok=True)
    TorchTrainer(train_loop, train_loop_config={**config, "in_ray": True}, datasets=datasets,
                 scaling_config=ScalingConfig(num_workers=1, use_gpu=torch.cuda.is_available(),
                                                      resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=config["storage"], name=name)).fit()
    return json.loads(result.read_text())


def summary(epochs: list[dict]) -> dict:
    """The first epoch apart (a cached run loads the split in it), the later ones averaged."""
    later = epochs[1:] or epochs
    return {"windows_per_epoch": epochs[0]["windows"],
            "first_epoch_windows_per_s": epochs[0]["windows_per_s"], "first_epoch_first_batch_s": epochs[0]["first_batch_s"],
            "windows_per_s": float(np.mean([e["windows_per_s"] for e in later])),
            "first_batch_s_max": max(e["first_batch_s"] for e in later),
            "steady_windows_per_s": float(np.mean([e["steady_windows_per_s"] for e in later])),
            "slowest_epoch_windows_per_s": min(e["windows_per_s"] for e in epochs), "epochs": epochs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=200, help="one-hour cases (about 344 windows each)")
    p.add_argument("--files-per-case", type=int, default=1, help="cut each case into this many files")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workdir", default="/tmp/biofm-bench")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--skip-ray-data", action="store_true", help="leave out (r), the previous ingest")
    p.add_argument("--threads", type=int, nargs="*", default=[], help="reader thread counts to sweep (streamed, plain loop)")
    args = p.parse_args()
    import ray

    from biofm.train.batches import scan

    workdir = Path(args.workdir)
    split_dir = build_split(workdir, args.cases, args.files_per_case)
    split = scan(str(split_dir), ("PPG", "ECG"))
    print(f"{len(split.files)} files, {split.windows} windows, {split.memory_bytes / 1e6:.0f} MB of signals; "
          f"batch {args.batch_size}, {args.epochs} epochs", flush=True)
    base = {"split": split, "batch_size": args.batch_size, "epochs": args.epochs, "in_ray": False,
            "storage": str(workdir / "ray")}
    streamed, cached = {**base, "cache_mb": 0.0}, {**base, "cache_mb": split.memory_bytes / 1e6 + 1}
    runs = {"(p) pyarrow, one process": pyarrow_epochs(split_dir, args.epochs),
            "(a) biofm streamed, plain loop": biofm_epochs(streamed),
            "(b) biofm cached, plain loop": biofm_epochs(cached)}
    for n in args.threads:
        runs[f"(t={n}) streamed, {n} reader thread(s)"] = biofm_epochs({**streamed, "read_ahead": n})
    ray.init(num_cpus=2, include_dashboard=False)  # as this 2-core machine; a GPU is found by itself
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs["(c) biofm streamed, Ray Train"] = in_worker(biofm_epochs, streamed)
    runs["(d) biofm cached, Ray Train"] = in_worker(biofm_epochs, cached)
    if not args.skip_ray_data:
        ds = ray.data.read_parquet(str(split_dir)).select_columns(["signal"])
        runs["(r) before: Ray Data, Ray Train"] = in_worker(ray_data_epochs, base, {"train": ds})
    ray.shutdown()

    figures = {name: summary(epochs) for name, epochs in runs.items()}
    p = figures["(p) pyarrow, one process"]
    ref = float(np.mean([e["windows_per_s"] for e in p["epochs"]]))
    print(f"\n{'run':34s} {'epoch 1 w/s':>11s} {'1st batch':>9s} {'later w/s':>10s} {'vs (p)':>7s} "
          f"{'1st batch (max)':>15s} {'steady w/s':>10s}")
    for name, f in figures.items():
        print(f"{name:34s} {f['first_epoch_windows_per_s']:11.0f} {f['first_epoch_first_batch_s']:8.2f}s "
              f"{f['windows_per_s']:10.0f} {f['windows_per_s'] / ref:7.2f} {f['first_batch_s_max']:14.2f}s "
              f"{f['steady_windows_per_s']:10.0f}")
    c = figures["(c) biofm streamed, Ray Train"]
    first = max(e["first_batch_s"] for e in c["epochs"])
    print(f"targets, (c), every epoch: slowest {c['slowest_epoch_windows_per_s'] / ref:.2f} x pyarrow (>= 0.5: "
          f"{'PASS' if c['slowest_epoch_windows_per_s'] >= 0.5 * ref else 'FAIL'}); first batch at most "
          f"{first:.2f} s (<= 2 s: {'PASS' if first <= 2 else 'FAIL'})")
    if args.out:
        Path(args.out).write_text(json.dumps({"files": len(split.files), "windows": split.windows, **figures}, indent=1))


if __name__ == "__main__":
    main()
