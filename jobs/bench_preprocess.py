"""Benchmark: VitalDB preprocessing as a sequential loop vs Ray Data on 1 and 2 CPUs.

Cases are the real recordings of ../shared/realdata/vital, resampled to VitalDB's 500 Hz SNUADC
tracks and tiled to an hour each. Every configuration runs in a fresh process, timed from
process start to finish (Ray's start-up included), over the same cases:

    (a) a plain loop over biofm.preprocess.process_case (same per-case function, same Parquet)
    (b) build_windows on Ray Data with 1 CPU      (c) the same with 2 CPUs
    (p) a multiprocessing pool of 2 over the same function: what this machine's cores allow
        without any framework, the ceiling for (c)
    and (c) on M and 4M cases, to check that memory does not grow with the number of cases.

    python jobs/bench_preprocess.py --cases 240 --memory-cases 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "vital"


def make_cases(workdir: Path, n: int, hours: float) -> Path:
    """``n`` hour-long cases in VitalDB's layout under ``workdir/cases`` (built once, then linked)."""
    import vitaldb

    from biofm import signals
    from biofm.config import ChannelsConfig, load_config
    from biofm.sources.vitaldb import read_tracks

    base_dir, cases = workdir / f"base_{hours:g}h", workdir / "cases"
    channels = load_config(ChannelsConfig, Path(__file__).parents[1] / "configs/channels.yaml").select(["PPG", "ECG"])
    recordings = sorted(REALDATA.glob("*.vital"))
    if not recordings:
        sys.exit(f"bench_preprocess: no real recordings in {REALDATA}; the benchmark needs them")
    base_dir.mkdir(parents=True, exist_ok=True)
    bases = []
    for rec in recordings:
        out = base_dir / f"{rec.stem}.vital"
        if not out.exists():
            vf = vitaldb.VitalFile()
            vf.dtstart = 1.7e9
            vf.dtend = vf.dtstart + hours * 3600
            for name, track in (("PPG", "SNUADC/PLETH"), ("ECG", "SNUADC/ECG_II")):
                x, fs, _ = read_tracks(rec, channels)[name]
                filled, missing = signals.fill_gaps(x)
                y = signals.resample(filled, fs, 500.0)
                y[missing[np.minimum((np.arange(len(y)) * fs / 500).astype(int), len(x) - 1)]] = np.nan
                reps = int(np.ceil(hours * 3600 * 500 / len(y)))
                y = np.tile(y, reps)[: int(hours * 3600 * 500)]
                vf.add_track(track, [{"dt": vf.dtstart, "val": y.astype(np.float32)}], srate=500.0)
            vf.to_vital(str(out), compresslevel=6)
        bases.append(out)
    shutil.rmtree(cases, ignore_errors=True)
    cases.mkdir()
    for i in range(n):
        os.link(bases[i % len(bases)], cases / f"{i + 1}.vital")
    return cases


def run_one(mode: str, num_cpus: int, cases: Path, n: int, outdir: Path) -> dict:
    """One configuration, in this (fresh) process. Returns windows, stage times and peak memory."""
    from biofm.config import ChannelsConfig, WindowsConfig, load_config
    from biofm.preprocess import build_windows, process_case
    from biofm.sources.vitaldb import DirectorySource

    root = Path(__file__).parents[1]
    channels = load_config(ChannelsConfig, root / "configs/channels.yaml").select(["PPG", "ECG"])
    windows = load_config(WindowsConfig, root / "configs/windows.yaml")
    source, ids = DirectorySource(str(cases)), [str(i + 1) for i in range(n)]
    if mode == "sequential":
        (outdir / "train" / "_cases").mkdir(parents=True)
        outcomes = [process_case(c, source, channels, windows, outdir / "train") for c in ids]
    elif mode == "pool":
        import functools
        import multiprocessing

        (outdir / "train" / "_cases").mkdir(parents=True)
        work = functools.partial(process_case, source=source, channels=channels, cfg=windows,
                                 split_dir=outdir / "train")
        with multiprocessing.Pool(num_cpus) as pool:
            outcomes = pool.map(work, ids, chunksize=1)
    else:
        import ray

        ray.init(num_cpus=num_cpus)
        m = build_windows(ids, source, channels, windows, outdir, "train")
        outcomes = list(m["cases"].values())
    stages = {}
    for o in outcomes:
        for k, v in o["timings"].items():
            stages[k] = stages.get(k, 0.0) + v
    return {
        "windows": sum(o["windows_kept"] for o in outcomes),
        "windows_cut": sum(o.get("windows_total", 0) for o in outcomes),
        "stage_s": stages,
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mb": max(o["peak_rss_mb"] for o in outcomes),
    }


def timed_run(mode: str, num_cpus: int, cases: Path, n: int, workdir: Path) -> dict:
    outdir = workdir / f"out_{mode}_{num_cpus}_{n}"
    shutil.rmtree(outdir, ignore_errors=True)
    cmd = [sys.executable, __file__, "--run", mode, "--num-cpus", str(num_cpus), "--n", str(n),
           "--cases-dir", str(cases), "--outdir", str(outdir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(wall_s=wall, windows_per_s=result["windows"] / wall)
    shutil.rmtree(outdir, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=240, help="N: cases per throughput run")
    p.add_argument("--memory-cases", type=int, default=30, help="M: the memory check runs M and 4M cases")
    p.add_argument("--hours", type=float, default=1.0, help="length of each case")
    p.add_argument("--workdir", default="/tmp/biofm-bench")
    p.add_argument("--skip-memory", action="store_true", help="skip the memory check (M and 4M cases)")
    p.add_argument("--run", choices=["sequential", "pool", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--num-cpus", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cases-dir", help=argparse.SUPPRESS)
    p.add_argument("--outdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.num_cpus, Path(args.cases_dir), args.n, Path(args.outdir))))
        return

    workdir = Path(args.workdir)
    n = args.cases
    m = args.memory_cases
    cases = make_cases(workdir, max(n, 4 * m), args.hours)
    print(f"{n} cases of {args.hours:g} h (500 Hz PPG + ECG, from {REALDATA}) on {os.cpu_count()} cores")
    runs = {
        "(a) sequential loop": timed_run("sequential", 1, cases, n, workdir),
        "(b) Ray Data, 1 CPU": timed_run("ray", 1, cases, n, workdir),
        "(c) Ray Data, 2 CPUs": timed_run("ray", 2, cases, n, workdir),
        "(p) process pool of 2": timed_run("pool", 2, cases, n, workdir),
    }
    base = runs["(a) sequential loop"]
    print(f"\n{'run':24s} {'wall s':>8s} {'windows':>8s} {'windows/s':>10s} {'vs (a)':>7s}")
    for name, r in runs.items():
        assert r["windows"] == base["windows"], "every run must produce the same windows"
        print(f"{name:24s} {r['wall_s']:8.1f} {r['windows']:8d} {r['windows_per_s']:10.1f} "
              f"{r['windows_per_s'] / base['windows_per_s']:7.2f}")
    b = runs["(b) Ray Data, 1 CPU"]["windows_per_s"] / base["windows_per_s"]
    c = runs["(c) Ray Data, 2 CPUs"]["windows_per_s"] / base["windows_per_s"]
    pool = runs["(p) process pool of 2"]["windows_per_s"] / base["windows_per_s"]
    print(f"targets: (c)/(a) = {c:.2f} (>= 1.7: {'PASS' if c >= 1.7 else 'FAIL'}), "
          f"(b)/(a) = {b:.2f} (>= 0.9: {'PASS' if b >= 0.9 else 'FAIL'}); "
          f"machine ceiling (p)/(a) = {pool:.2f}, (c)/(p) = {c / pool:.2f}")

    stages, cut = base["stage_s"], base["windows_cut"]
    floor = stages["read"] + stages["resample"] + stages["filter"]
    print(f"\nwhere a window's time goes, run (a), {cut} windows cut ({base['windows']} kept):")
    for k, v in stages.items():
        print(f"  {k:9s} {1e3 * v / cut:7.2f} ms/window  {100 * v / sum(stages.values()):5.1f}%")
    print(f"  floor (read/decode + resample + filter) {1e3 * floor / cut:.2f} ms/window; "
          f"all stages = {sum(stages.values()) / floor:.2f} x floor; "
          f"process wall = {base['wall_s'] / floor:.2f} x floor")

    if not args.skip_memory:
        small, big = (timed_run("ray", 2, cases, k, workdir) for k in (m, 4 * m))
        print(f"\npeak memory (MB), Ray Data on 2 CPUs: {m:>6d} cases {4 * m:>6d} cases  ratio")
        for key, label in (("driver_peak_mb", "driver"), ("worker_peak_mb", "worker")):
            ratio = big[key] / small[key]
            print(f"  {label:36s} {small[key]:12.0f} {big[key]:12.0f} {ratio:6.2f} "
                  f"({'PASS' if ratio <= 1.2 else 'FAIL'}: must not grow with cases)")
        print(f"  sequential loop, {n} cases: {base['driver_peak_mb']:.0f} MB")

if __name__ == "__main__":
    main()
