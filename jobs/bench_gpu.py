"""GPU check and figures in one run, for a machine with a CUDA GPU (a lent device: one call).

The device first (name, memory, torch and CUDA versions, bf16 support), then these steps, in the
order ``--steps`` gives (all by default):

- step: the pretraining step alone, in this process (no Ray), on bench_train's windows: windows/s
  and ms per step against batch size (``--step-batches``, 128 ... 8192), eager against compiled,
  fp32 / TF32 / bf16, batches from one pre-pinned batch copied to the GPU every step (the upper
  bound: the method of Ray's training-ingest benchmark), from memory (``cache_mb``) and streamed
  from Parquet; compile time; and the host syncs of a step: counted (biofm.train.step.host_syncs)
  and checked, the steps run under ``torch.cuda.set_sync_debug_mode("error")``.

- embed: embeddings (jobs/bench_inference.py's runs) on the GPU: biofm embed with one actor on
  the whole GPU and with four on a quarter each, eager fp32 and compiled (bf16 too), against a
  plain loop on the GPU, the same windows and encoder, at ``--embed-batch``.
- pretrain: Ray Train, one worker on the GPU, per ``--batch-sizes``, compiled and eager, AMP on
  and off, the split streamed from Parquet and held in memory: windows/s over the epochs after
  the first, the share of each epoch spent waiting for data, and the first step's seconds (the
  compile time), on bench_train's one-hour cases; each against the same step in a plain loop
  (the step's figures at that batch, precision and ingest: Ray Train / plain loop).
- smoke: the smoke pipeline (configs/smoke.yaml on ../shared/realdata), training on the GPU:
  seconds per stage.
- ingest: the ingest benchmark (jobs/bench_ingest.py, 200 files), its batches handed to the GPU.

Writes ``gpu_figures.json`` (and ``ingest.json``) to ``--out`` after each step, so a run cut short
keeps what it measured. Without a GPU it stops with a message (``--allow-cpu`` runs it anyway, to
check the script itself).

    python jobs/bench_gpu.py --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench_train import build_windows_once, ray_train

ROOT = Path(__file__).parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"


def device_facts() -> dict:
    if not torch.cuda.is_available():
        return {"device": "cpu", "torch": torch.__version__}
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}


def embed_figures(out: Path, cases: int, batch_size: int = 1024) -> dict:
    """Windows/s of biofm embed on the GPU against a plain loop on the GPU, on bench_inference's
    windows: one actor holding the whole GPU, then four sharing it (``--num-gpus 0.25``), to see
    whether their host work (taking batches, copying them to the GPU) overlapping helps."""
    import os

    from bench_inference import build_split, plain_loop, ray_embed, write_checkpoint

    split = build_split(out, cases, 1)
    ckpt = write_checkpoint(split, out / "bench_inference.pt")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = plain_loop(ckpt, split, os.cpu_count() or 1, batch_size, device)
    rate = plain["windows"] / plain["seconds"]
    result = {"plain_windows_per_s": rate, "plain_steady_windows_per_s": plain["steady_windows_per_s"]}
    for share, compile, bf16 in ((1.0, False, False), (1.0, True, False), (1.0, True, True), (0.25, True, True)):
        run = ray_embed(ckpt, split, out / "embed_out", None, batch_size, num_gpus=share if device == "cuda" else 0.0,
                        compile=compile, bf16=bf16)
        name = f"num_gpus_{share}" + ("_compiled" if compile else "") + ("_bf16" if bf16 else "")
        result[name] = r = {**{k: v for k, v in run.items() if k != "memory"},
                            "steady_vs_plain": run["steady_windows_per_s"] / plain["steady_windows_per_s"],
                            "end_to_end_vs_plain": run["windows"] / run["seconds"] / rate}
        print(f"embed on {device}, {r['actors']} actor(s) of {share:g} GPU, compile {compile}, bf16 {bf16}: plain "
              f"{plain['steady_windows_per_s']:.0f} windows/s steady, {rate:.0f} in all; biofm embed "
              f"steady {r['steady_windows_per_s']:.0f} ({r['steady_vs_plain']:.2f} x), end to end "
              f"{r['end_to_end_vs_plain']:.2f} x after {r['startup_s']:.1f} s of start-up", flush=True)
    return result


PRECISIONS = {"fp32": {"amp": False, "tf32": False}, "tf32": {"amp": False, "tf32": True}, "bf16": {"amp": True, "tf32": True}}


def step_rate(cfg, data: Path, ingest: str, steps: int, sync_errors: bool = False) -> dict:
    """The pretraining step of train/pretrain.py (its losses, masks on the device, the sync-free
    step; compiled when ``cfg.compile``) in a plain loop on the device: ms per step and windows/s
    over ``steps`` steps after the first two (the compile), the share of that time waiting for
    batches, and the first step's seconds. ``ingest``: ``pinned`` (one batch in pinned memory,
    copied to the device every step: no loader, the upper bound), ``memory`` or ``streamed``
    (biofm.train.batches with the split in memory or read from Parquet). ``sync_errors``: the
    timed steps run under ``torch.cuda.set_sync_debug_mode("error")``."""
    import itertools
    import time

    from biofm.model.ssl import random_mask
    from biofm.model.ttm_weights import initial_model
    from biofm.train.batches import WaitClock, WindowBatches, scan
    from biofm.train.pretrain import pretraining_losses
    from biofm.train.ray_run import mixed_precision
    from biofm.train.step import adamw, compiled_for_batch, set_tf32, step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = scan(str(data / "train"), cfg.channels)
    model = initial_model(dataclasses.replace(cfg, seed=0), split.spec["window_samples"])[0].to(device)
    autocast, scaler = mixed_precision(cfg.amp, device)
    set_tf32(cfg.tf32)
    losses = pretraining_losses(model, cfg, split.spec, device, autocast)
    forward = compiled_for_batch(losses, cfg.batch_size, device) if cfg.compile else losses
    params = list(model.parameters())
    optimizer = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ingest == "pinned":
        one = next(WindowBatches(split, ["signal"], cfg.batch_size, cache_mb=1e9).epoch(0))["signal"]
        one = one.pin_memory() if device.type == "cuda" else one
        batches = ({"signal": one.to(device, non_blocking=True)} for _ in itertools.count())
    else:
        reader = WindowBatches(split, ["signal"], cfg.batch_size, train=True, device=device, shuffle_buffer=cfg.shuffle_buffer,
                               cache_mb=1e9 if ingest == "memory" else 0.0)
        batches = (b for e in itertools.count() for b in reader.epoch(e) if len(b["signal"]) == cfg.batch_size)

    def run(batch):
        x = batch["signal"]
        terms = forward(x, random_mask(len(x), x.shape[1], model.patches, cfg.mask_ratio, device=device))
        step(terms[0], optimizer, scaler, params, cfg.grad_clip)

    t0 = time.perf_counter()
    for batch in itertools.islice(batches, 2):
        run(batch)
    synchronize(device)
    first_s = time.perf_counter() - t0
    clock = WaitClock(itertools.islice(batches, steps))
    with sync_errors_raised(sync_errors):
        for batch in clock:
            run(batch)
    synchronize(device)
    seconds = time.perf_counter() - clock.t0
    return {"ms_per_step": 1000 * seconds / steps, "windows_per_s": steps * cfg.batch_size / seconds,
            "data_wait_fraction": clock.wait / seconds, "first_two_steps_s": first_s}


@contextlib.contextmanager
def sync_errors_raised(on: bool):
    """``torch.cuda.set_sync_debug_mode("error")`` inside the block when ``on``."""
    if on:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if on:
            torch.cuda.set_sync_debug_mode(0)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sync_check(cfg, data: Path) -> dict:
    """The host syncs of three eager steps (counted), and whether three steps after the first two
    (the compile), eager and compiled, run under ``torch.cuda.set_sync_debug_mode("error")`` (a
    sync raises)."""
    from biofm.train.step import host_syncs

    with host_syncs() as counts:
        step_rate(dataclasses.replace(cfg, compile=False), data, "memory", 3)
    result = {"counted": dict(counts)}
    if torch.cuda.is_available():
        for compiled in (False, True):
            try:
                step_rate(dataclasses.replace(cfg, compile=compiled), data, "memory", 3, sync_errors=True)
                result[f"compiled_{compiled}"] = "no sync"
            except RuntimeError as e:
                result[f"compiled_{compiled}"] = str(e).splitlines()[0]
    return result


def step_figures(out: Path, cases: int, batch_sizes: list[int], steps: int) -> dict:
    """The step alone against batch size, eager and compiled, per precision and ingest (see
    :func:`step_rate`), and the sync check. Compiled runs only at TF32 and bf16 (fp32's compile
    costs the same and its rate is bounded by the eager fp32 one's matmuls)."""
    import torch._dynamo

    from biofm.config import PretrainConfig, load_config

    torch._dynamo.config.cache_size_limit = 64  # a graph per batch size and precision, none evicted to eager
    cfg = load_config(PretrainConfig, ROOT / "configs/ssl_pretrain.yaml")
    data = build_windows_once(out, cases)
    figures = {"syncs": sync_check(dataclasses.replace(cfg, batch_size=batch_sizes[0]), data), "runs": []}
    print(f"syncs: {figures['syncs']}", flush=True)
    for batch in batch_sizes:
        for precision, flags in PRECISIONS.items():
            for compiled in (False, True) if precision != "fp32" else (False,):
                run = dataclasses.replace(cfg, batch_size=batch, compile=compiled, **flags)
                for ingest in ("pinned", "memory", "streamed") if batch == batch_sizes[-1] else ("pinned",):
                    r = {"batch_size": batch, "precision": precision, "compiled": compiled, "ingest": ingest,
                         **step_rate(run, data, ingest, steps)}
                    figures["runs"].append(r)
                    print(f"step batch {batch:5d} {precision} {'compiled' if compiled else 'eager   '} {ingest:8s}: "
                          f"{r['ms_per_step']:7.2f} ms, {r['windows_per_s']:9.0f} windows/s, waiting "
                          f"{100 * r['data_wait_fraction']:.1f}%, first two steps {r['first_two_steps_s']:.1f} s", flush=True)
    return figures


def pretrain_figures(out: Path, cases: int, epochs: int, batch_sizes: list[int]) -> list[dict]:
    """Ray Train, one GPU worker: windows/s and the share of time waiting for data, per batch size,
    compiled and eager, AMP on and off, the split streamed and held in memory; and each against
    the same step in a plain loop (:func:`step_rate`, as many steps as an epoch)."""
    import ray

    from biofm.config import PretrainConfig, load_config
    from biofm.train.batches import scan

    cfg = load_config(PretrainConfig, ROOT / "configs/ssl_pretrain.yaml")
    data = build_windows_once(out, cases)
    windows = scan(str(data / "train")).windows
    ray.init()
    runs = []
    for batch in batch_sizes:
        for compiled in (True, False):
            for amp in (True, False):
                for ingest, cache_mb in (("streamed", 0.0), ("memory", 1e9)):
                    run = dataclasses.replace(cfg, epochs=epochs, batch_size=batch, amp=amp, num_workers=1,
                                              cache_mb=cache_mb, compile=compiled)
                    r = ray_train(run, data, out / f"pretrain_b{batch}_c{int(compiled)}_amp{int(amp)}_{ingest}")
                    plain = step_rate(run, data, ingest, max(3, windows // batch))
                    runs.append({"batch_size": batch, "compiled": compiled, "amp": amp, "ingest": ingest, **r,
                                 "plain_windows_per_s": plain["windows_per_s"],
                                 "vs_plain": r["windows_per_s"] / plain["windows_per_s"]})
                    print(f"batch {batch:4d} {'compiled' if compiled else 'eager   '} AMP {'on ' if amp else 'off'} "
                          f"{ingest:8s}: {r['windows_per_s']:8.0f} windows/s ({runs[-1]['vs_plain']:.2f} x the plain "
                          f"loop), waiting {100 * r['data_wait_fraction']:.1f}%, first batch {r['first_batch_s']:.2f} s, "
                          f"first step {r['first_step_s']:.1f} s", flush=True)
    ray.shutdown()
    return runs


def smoke_figures(out: Path) -> dict:
    """Seconds per stage of the smoke pipeline on the real recordings, training on the GPU."""
    import ray

    from biofm.config import PipelineConfig, with_overrides
    from biofm.pipeline import run_pipeline

    smoke = with_overrides(PipelineConfig, ROOT / "configs/smoke.yaml", {
        "output_dir": str(out / "smoke"), "case_set": str(REALDATA / "vital"),
        "vital_source": str(REALDATA / "vital"), "butppg_raw_dir": str(REALDATA / "butppg")}, "bench_gpu")
    ray.init()
    stages = {r["stage"]: r["seconds"] for r in run_pipeline(smoke)}
    ray.shutdown()
    print(json.dumps(stages), flush=True)
    return stages


STEPS = ("step", "embed", "pretrain", "smoke", "ingest")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                   help="what to measure, in this order; gpu_figures.json is written after each")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cases", type=int, default=40, help="one-hour training cases (344 windows each)")
    p.add_argument("--ingest-cases", type=int, default=200, help="files for the ingest benchmark")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 2048], help="Ray Train's batch sizes")
    p.add_argument("--step-batches", type=int, nargs="+", default=[128, 512, 2048, 8192],
                   help="batch sizes of the step alone (the last also from memory and streamed)")
    p.add_argument("--step-count", type=int, default=50, help="timed steps per run of the step alone")
    p.add_argument("--embed-batch", type=int, default=4096, help="windows per embed call")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="ingest: reader threads to sweep")
    p.add_argument("--embed-cases", type=int, default=192,
                   help="one-hour cases for the embedding benchmark (344 windows each)")
    p.add_argument("--allow-cpu", action="store_true")
    args = p.parse_args()
    facts = device_facts()
    if facts["device"] == "cpu" and not args.allow_cpu:
        print("no CUDA GPU here: run this on a GPU machine (or pass --allow-cpu to check the script)")
        return 2
    if not REALDATA.is_dir():
        print(f"the benchmarks read {REALDATA}, which is absent")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"facts": facts}
    print(json.dumps(facts), flush=True)

    def save():
        (out / "gpu_figures.json").write_text(json.dumps(figures, indent=1))

    for step in args.steps:
        if step == "step":
            figures["step"] = step_figures(out, args.cases, args.step_batches, args.step_count)
        elif step == "embed":
            figures["embed"] = embed_figures(out, args.embed_cases, args.embed_batch)
        elif step == "pretrain":
            figures["pretrain"] = pretrain_figures(out, args.cases, args.epochs, args.batch_sizes)
        elif step == "smoke":
            figures["smoke_pipeline_s"] = smoke_figures(out)
        else:
            subprocess.run([sys.executable, str(ROOT / "jobs/bench_ingest.py"), "--cases", str(args.ingest_cases),
                            "--skip-ray-data", "--workdir", str(out), "--out", str(out / "ingest.json"),
                            "--threads", *map(str, args.threads)], check=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
