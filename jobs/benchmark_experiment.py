"""Is the foundation model any good? The real experiment, on every built-in task, held-out subjects.

1. The 35 patients of the PPG arrhythmia set are split once, by patient (``--seed``):
   ``--pretrain-patients`` of them (labels unused) join the pretraining corpus; the others are
   for the benchmark only.
2. The corpus: those patients (PPG), the Vital Recorder files, BIDMC 01 and NeuroKit (PPG + ECG)
   and the MIMIC-II record's ECG, each windowed in its own folder (a channel a source lacks is
   absent); none of them is in any task. An encoder of ``--channels`` (PPG ECG) is pretrained on it.
3. Every built-in task whose data is there: BUT-PPG quality and heart rate, AF and the six rhythms
   (the held-out patients only), PPG-BP blood pressure and hypertension, TROIKA heart rate,
   CapnoBase respiratory rate, CinC 2017 rhythm. PPG-BP's 2.1 s segments become a window by the
   fit that serves the encoder best on the PPG-BP tasks' own validation split (train against
   val; the test split is never read for it): ``fit_choice`` in ``experiment.json``.
4. ``biofm benchmark`` of the encoder against random weights, hand-crafted features and the
   trivial answer, on subject-wise folds with 95% bootstrap CIs; with ``--finetune``, also the
   encoder fine-tuned in stages on every fold (``--finetune-epochs``, half of them head only, at
   batch 64 and lr 1e-3: a recipe sized for a CPU).

    python jobs/benchmark_experiment.py --realdata ../shared/realdata --workdir /tmp/biofm-experiment

Writes ``<workdir>/benchmark/benchmark.md`` (and .json, forest plots) and ``<workdir>/experiment.json``
(the patient split, the corpus, the pretraining's figures, the fit comparison and the timings).
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

TASK_DATA = {"butppg-quality": "butppg", "butppg-hr": "butppg", "arrhythmia-af": None, "arrhythmia-rhythm": None,
             "ppgbp-sbp": "ppg_bp", "ppgbp-dbp": "ppg_bp", "ppgbp-hypertension": "ppg_bp",
             "troika-hr": "troika/Training_data", "capnobase-rr": "capnobase/data", "cinc2017-rhythm": "cinc2017"}
PPGBP = ("ppgbp-sbp", "ppgbp-dbp", "ppgbp-hypertension")


def build_corpus(real: Path, work: Path, channels, windows, patients_dir: Path, seed: int, address) -> list[str]:
    """The pretraining sources, each windowed in its own folder (train, and val where it has one);
    returns the folders."""
    from biofm.preprocess import build_windows
    from biofm.sources.formats import open_source
    from biofm.tasks import TASKS, prepare_task

    both, ppg, ecg = channels.select(["PPG", "ECG"]), channels.select(["PPG"]), channels.select(["ECG"])
    out = []
    vital = open_source(str(real / "vital"))
    for part, cases in (("train", vital.ids()[1:]), ("val", vital.ids()[:1])):
        build_windows(cases, vital, both, windows, str(work / "corpus" / "vital"), part, address=address)
    out.append(str(work / "corpus" / "vital"))
    for name, where, chans, rate in (("bidmc", f"csv:{real / 'bidmc'}", both, None),
                                     ("neurokit", str(real / "neurokit"), both, 100.0),
                                     ("mimic2", str(real / "mimic2_wdb"), ecg, None)):
        if Path(where.removeprefix("csv:")).is_dir():
            source = open_source(where, rate_hz=rate)
            build_windows(source.ids(), source, chans, windows, str(work / "corpus" / name), "train", address=address)
            out.append(str(work / "corpus" / name))
    prepare_task(TASKS["arrhythmia-af"], patients_dir, work / "corpus" / "arrhythmia", ppg, windows, (0.8, 0.2, 0.0),
                 seed, address=address)
    return out + [str(work / "corpus" / "arrhythmia")]


def prepare(name: str, raw: Path, outdir: Path, channels, windows, seed: int, address, fit: str | None = None) -> str:
    from biofm.config import ButppgConfig
    from biofm.tasks import TASKS, prepare_task

    task = TASKS[name]
    prepare_task(task, raw, outdir, channels.select(task.channels or ButppgConfig().channels), windows, seed=seed,
                 address=address, fit=fit)
    return str(outdir)


def choose_fit(encoder: str, real: Path, work: Path, channels, windows, seed: int, address) -> dict:
    """Each fit of PPG-BP's segments, judged on the PPG-BP tasks' own validation split: probes
    trained on train, scored on val (the folder's ``test`` is a link to ``val``; test is never
    read). The fit kept: the best mean rank of the encoder's row over the three tasks."""
    from biofm.benchmark import HEADLINE, benchmark
    from biofm.sources.ppgbp import FITS
    from biofm.tasks import TASKS

    scores = {}
    for fit in FITS:
        dirs = []
        for name in PPGBP:
            done = Path(prepare(name, real / "ppg_bp", work / "fit" / fit / name, channels, windows, seed, address, fit))
            judged = work / "fit" / fit / f"{name}-on-val"
            judged.mkdir()
            (judged / "train").symlink_to(done / "train")
            (judged / "test").symlink_to(done / "val")
            dirs.append(str(judged))
        report = benchmark([f"pretrained={encoder}"], dirs, str(work / "fit" / fit / "benchmark"), resamples=200,
                           seed=seed, fixed_split=True, address=address)
        scores[fit] = {name: {row: v[HEADLINE[TASKS[name].kind]]["value"] for row, v in t["rows"].items()}
                       for name, t in report["tasks"].items()}
    ranks = {fit: [] for fit in FITS}
    for name in PPGBP:
        sign = -1 if TASKS[name].kind == "regression" else 1      # MAE: lower is better
        order = sorted(FITS, key=lambda f: -sign * scores[f][name]["pretrained"])
        for rank, fit in enumerate(order):
            ranks[fit].append(rank + 1)
    kept = min(FITS, key=lambda f: (np.mean(ranks[f]), FITS.index(f)))
    print("[benchmark] PPG-BP fits on the validation split (pretrained row): " + "; ".join(
        f"{fit}: " + ", ".join(f"{n} {scores[fit][n]['pretrained']:.3f}" for n in PPGBP) + f" (mean rank {np.mean(ranks[fit]):.1f})"
        for fit in FITS) + f" -> {kept}", flush=True)
    return {"kept": kept, "scores": scores, "mean_rank": {f: float(np.mean(r)) for f, r in ranks.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realdata", default="../shared/realdata", help="the shared real-data folder")
    p.add_argument("--channels", nargs="+", default=["PPG", "ECG"], help="the encoder's channels")
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASK_DATA), help="the tasks (default: all whose data is there)")
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
    from biofm.sources.arrhythmia import patients
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
    sources = build_corpus(real, work, channels, windows, work / "raw" / "pretrain", args.seed, args.address)
    timings["corpus_s"] = round(time.perf_counter() - t0, 1)

    cfg = dataclasses.replace(load_config(PretrainConfig, "configs/ssl_pretrain.yaml"), channels=tuple(args.channels),
                              epochs=args.epochs, warmup_epochs=1.0)
    result = pretrain(cfg, sources, str(work / "foundation_model"), address=args.address)
    timings["pretrain_s"] = round(time.perf_counter() - t0 - timings["corpus_s"], 1)
    encoder = str(work / "foundation_model" / "best_model.pt")

    names = [n for n in (args.tasks or TASK_DATA) if TASK_DATA[n] is None or (real / TASK_DATA[n]).is_dir()]
    fit = choose_fit(encoder, real, work, channels, windows, args.seed, args.address) if set(PPGBP) & set(names) else None
    task_dirs = [prepare(n, real / TASK_DATA[n] if TASK_DATA[n] else work / "raw" / "benchmark", work / "tasks" / n,
                         channels, windows, args.seed, args.address, fit["kept"] if n in PPGBP else None) for n in names]
    t1 = time.perf_counter()
    finetune = dataclasses.replace(load_config(FinetuneConfig, "configs/finetune_butppg.yaml"), epochs=args.finetune_epochs,
                                   head_epochs=args.finetune_epochs // 2, batch_size=64, lr=1e-3, head_lr=1e-3)
    report = benchmark([f"pretrained={encoder}"], task_dirs, str(work / "benchmark"), resamples=args.resamples,
                       seed=args.seed, finetune=finetune if args.finetune else None, address=args.address)
    timings["benchmark_s"] = round(time.perf_counter() - t1, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    summary = {"patients": split, "corpus": sources, "channels": args.channels, "pretrain": {"epochs": args.epochs, **result},
               "corpus_windows": {Path(d).name: {part: sum(pq.read_metadata(f).num_rows for f in (Path(d) / part).glob("*.parquet"))
                                                 for part in ("train", "val")} for d in sources},
               "fit_choice": fit, "timings": timings, "benchmark": str(work / "benchmark" / "benchmark.md")}
    (work / "experiment.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[benchmark] experiment done in {timings['total_s']:.0f} s: {work / 'benchmark' / 'benchmark.md'}; "
          f"{len(report['tasks'])} tasks", flush=True)


if __name__ == "__main__":
    main()
