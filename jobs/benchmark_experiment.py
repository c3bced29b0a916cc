"""Is the PPG foundation model any good? The real experiment, on held-out patients.

1. The 35 patients of the PPG arrhythmia set are split once, by patient (``--seed``):
   ``--pretrain-patients`` of them join the Vital Recorder recordings (PPG only) as the
   pretraining corpus (their labels unused); the others are for the benchmark only.
2. A PPG-only encoder (``--channels PPG``) is pretrained on that corpus.
3. The four tasks are prepared: ``arrhythmia-af`` and ``arrhythmia-rhythm`` from the held-out
   patients only, ``butppg-quality`` and ``butppg-hr`` from the BUT-PPG subset. No patient is
   both in pretraining and in a test fold.
4. ``biofm benchmark`` of the encoder against random weights, hand-crafted features and the
   trivial answer, on subject-wise folds with 95% bootstrap CIs; with ``--finetune``, also the
   encoder fine-tuned in stages on every fold (``--finetune-epochs``, half of them head only, at
   batch 64 and lr 1e-3: a recipe sized for a CPU).

    python jobs/benchmark_experiment.py --realdata ../shared/realdata --workdir /tmp/biofm-experiment

Writes ``<workdir>/benchmark/benchmark.md`` (and .json, forest plots) and ``<workdir>/experiment.json``
(the patient split, the pretraining's figures and the timings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realdata", default="../shared/realdata", help="folder with ppg_arrhythmia/, vital/, butppg/")
    p.add_argument("--workdir", default="/tmp/biofm-experiment", help="everything the experiment writes")
    p.add_argument("--pretrain-patients", type=int, default=15, help="arrhythmia patients used (unlabelled) to pretrain")
    p.add_argument("--epochs", type=int, default=20, help="pretraining epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split, the folds and the bootstrap")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--finetune", action="store_true", help="also fine-tune the encoder on every fold")
    p.add_argument("--finetune-epochs", type=int, default=4, help="fine-tuning epochs (half of them head only)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray's own lines too")
    args = p.parse_args()
    from biofm import output

    output.configure(args.verbose, own_process=True)

    from biofm.benchmark import benchmark
    from biofm.config import ChannelsConfig, FinetuneConfig, PretrainConfig, WindowsConfig, load_config
    from biofm.preprocess import build_windows
    from biofm.sources.arrhythmia import patients
    from biofm.sources.vitaldb import DirectorySource
    from biofm.tasks import TASKS, prepare_task
    from biofm.train.pretrain import pretrain

    real, work = Path(args.realdata).resolve(), Path(args.workdir)
    if not (real / "ppg_arrhythmia").is_dir():
        raise SystemExit(f"benchmark_experiment: {real}/ppg_arrhythmia is absent: point --realdata at shared/realdata")
    if work.exists():
        shutil.rmtree(work)
    t0, timings = time.perf_counter(), {}
    ids = patients(real / "ppg_arrhythmia")
    order = np.random.default_rng(args.seed).permutation(len(ids))
    split = {"pretrain": sorted(ids[i] for i in order[:args.pretrain_patients]),
             "benchmark": sorted(ids[i] for i in order[args.pretrain_patients:])}
    for part, members in split.items():  # one folder of links per part: each reader sees its patients only
        (work / "raw" / part).mkdir(parents=True)
        for pid in members:
            (work / "raw" / part / f"{pid}.mat").symlink_to(real / "ppg_arrhythmia" / f"{pid}.mat")

    channels = load_config(ChannelsConfig, "configs/channels.yaml")
    windows = load_config(WindowsConfig, "configs/windows.yaml")
    ppg = channels.select(["PPG"])
    corpus = work / "corpus"
    vital = sorted(f.stem for f in (real / "vital").glob("*.vital"))
    for part, cases in (("train", vital[1:]), ("val", vital[:1])):
        build_windows(cases, DirectorySource(str(real / "vital")), ppg, windows, str(corpus), part, address=args.address)
    prepare_task(TASKS["arrhythmia-af"], work / "raw" / "pretrain", work / "arrhythmia_pretrain", ppg, windows,
                 (0.8, 0.2, 0.0), args.seed, address=args.address)
    for part in ("train", "val"):  # the same data spec: pretraining reads them as one corpus
        for f in (work / "arrhythmia_pretrain" / part).glob("*.parquet"):
            shutil.copy(f, corpus / part / f.name)
    timings["corpus_s"] = round(time.perf_counter() - t0, 1)

    cfg = dataclasses.replace(load_config(PretrainConfig, "configs/ssl_pretrain.yaml"), channels=("PPG",),
                              epochs=args.epochs, warmup_epochs=1.0)
    result = pretrain(cfg, str(corpus), str(work / "foundation_model"), address=args.address)
    timings["pretrain_s"] = round(time.perf_counter() - t0 - timings["corpus_s"], 1)

    five = channels.select(["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"])
    task_dirs = []
    for name, raw, chans in (("butppg-quality", real / "butppg", five), ("butppg-hr", real / "butppg", five),
                             ("arrhythmia-af", work / "raw" / "benchmark", ppg),
                             ("arrhythmia-rhythm", work / "raw" / "benchmark", ppg)):
        prepare_task(TASKS[name], raw, work / "tasks" / name, chans, windows, seed=args.seed, address=args.address)
        task_dirs.append(str(work / "tasks" / name))
    t1 = time.perf_counter()
    finetune = dataclasses.replace(load_config(FinetuneConfig, "configs/finetune_butppg.yaml"), epochs=args.finetune_epochs,
                                   head_epochs=args.finetune_epochs // 2, batch_size=64, lr=1e-3, head_lr=1e-3)
    report = benchmark([f"pretrained={work / 'foundation_model' / 'best_model.pt'}"], task_dirs, str(work / "benchmark"),
                       resamples=args.resamples, seed=args.seed, finetune=finetune if args.finetune else None,
                       address=args.address)
    timings["benchmark_s"] = round(time.perf_counter() - t1, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    summary = {"patients": split, "vital_recordings": vital, "pretrain": {"epochs": args.epochs, **result},
               "corpus_windows": {part: sum(pq.read_metadata(f).num_rows for f in (corpus / part).glob("*.parquet"))
                                  for part in ("train", "val")},
               "timings": timings, "benchmark": str(work / "benchmark" / "benchmark.md")}
    (work / "experiment.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[benchmark] experiment done in {timings['total_s']:.0f} s: {work / 'benchmark' / 'benchmark.md'}; "
          f"{len(report['tasks'])} tasks", flush=True)


if __name__ == "__main__":
    main()
