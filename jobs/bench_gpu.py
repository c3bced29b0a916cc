"""GPU check and figures in one run, for a machine with a CUDA GPU (a lent device: one call).

The device first (name, memory, torch and CUDA versions, bf16 support), then these steps, in the
order ``--steps`` gives (all four by default):

- embed: embeddings (jobs/bench_inference.py's runs) on the GPU: biofm embed with one actor on
  the whole GPU and with four on a quarter each, against a plain loop on the GPU, the same
  windows and encoder.
- pretrain: Ray Train, one worker on the GPU, batch 128 and 512, AMP on and off, the split
  streamed from Parquet and held in memory: windows/s over the epochs after the first, and the
  share of each epoch spent waiting for data, on bench_train's one-hour cases.
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
    for share in (1.0, 0.25):
        run = ray_embed(ckpt, split, out / "embed_out", None, batch_size, num_gpus=share if device == "cuda" else 0.0)
        result[f"num_gpus_{share}"] = r = {**{k: v for k, v in run.items() if k != "memory"},
                                           "steady_vs_plain": run["steady_windows_per_s"] / plain["steady_windows_per_s"],
                                           "end_to_end_vs_plain": run["windows"] / run["seconds"] / rate}
        print(f"embed on {device}, {r['actors']} actor(s) of {share:g} GPU: plain {plain['steady_windows_per_s']:.0f} "
              f"windows/s steady, {rate:.0f} in all; biofm embed "
              f"steady {r['steady_windows_per_s']:.0f} ({r['steady_vs_plain']:.2f} x), end to end "
              f"{r['end_to_end_vs_plain']:.2f} x after {r['startup_s']:.1f} s of start-up", flush=True)
    return result


def pretrain_figures(out: Path, cases: int, epochs: int, batch_sizes: list[int]) -> list[dict]:
    """Ray Train, one GPU worker: windows/s and the share of time waiting for data, per batch size,
    AMP on and off, the split streamed and held in memory."""
    import ray

    from biofm.config import PretrainConfig, load_config

    cfg = load_config(PretrainConfig, ROOT / "configs/ssl_pretrain.yaml")
    data = build_windows_once(out, cases)
    ray.init()
    runs = []
    for batch in batch_sizes:
        for amp in (True, False):
            for ingest, cache_mb in (("streamed", 0.0), ("cached", cfg.cache_mb)):
                run = dataclasses.replace(cfg, epochs=epochs, batch_size=batch, amp=amp, num_workers=1,
                                          cache_mb=cache_mb)
                r = ray_train(run, data, out / f"pretrain_b{batch}_amp{int(amp)}_{ingest}")
                runs.append({"batch_size": batch, "amp": amp, "ingest": ingest, **r})
                print(f"batch {batch:4d} AMP {'on ' if amp else 'off'} {ingest:8s}: {r['windows_per_s']:8.0f} windows/s, "
                      f"waiting {100 * r['data_wait_fraction']:.1f}%, first batch {r['first_batch_s']:.2f} s", flush=True)
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


STEPS = ("embed", "pretrain", "smoke", "ingest")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                   help="what to measure, in this order; gpu_figures.json is written after each")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cases", type=int, default=40, help="one-hour training cases (344 windows each)")
    p.add_argument("--ingest-cases", type=int, default=200, help="files for the ingest benchmark")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
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
        if step == "embed":
            figures["embed"] = embed_figures(out, args.embed_cases)
        elif step == "pretrain":
            figures["pretrain"] = pretrain_figures(out, args.cases, args.epochs, args.batch_sizes)
        elif step == "smoke":
            figures["smoke_pipeline_s"] = smoke_figures(out)
        else:
            subprocess.run([sys.executable, str(ROOT / "jobs/bench_ingest.py"), "--cases", str(args.ingest_cases),
                            "--skip-ray-data", "--workdir", str(out), "--out", str(out / "ingest.json")], check=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
