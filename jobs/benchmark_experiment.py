"""Is the foundation model any good? The real experiment, on every built-in task, held-out subjects.

1. The corpus: ``configs/corpus_realdata.yaml`` built from ``--realdata`` (``biofm build-corpus``):
   every unlabelled recording that is no benchmark subject, among them 15 of the 35 arrhythmia
   patients and 14 of the 42 CapnoBase cases (their labels unused). An encoder of ``--channels``
   (PPG ECG) is pretrained on it with ``--config`` (default: the shipped recipe).
2. Every built-in task whose data is there, on the subjects the corpus does not hold: BUT-PPG
   quality and heart rate, AF and the six rhythms (the other 20 patients), PPG-BP blood pressure
   and hypertension, TROIKA heart rate, CapnoBase respiratory rate (the other 28 cases), CinC 2017
   rhythm. PPG-BP's 2.1 s segments become a window by the fit that serves the encoder best on the
   PPG-BP tasks' own validation split (train against val; the test split is never read for it):
   ``fit_choice`` in ``experiment.json``.
3. ``biofm benchmark`` of the encoder against random weights, hand-crafted features and the
   trivial answer, on subject-wise folds with 95% bootstrap CIs; with ``--finetune``, also the
   encoder fine-tuned in stages on every fold (``--finetune-epochs``, half of them head only, at
   batch 64 and lr 1e-3: a recipe sized for a CPU).

    python jobs/benchmark_experiment.py --realdata ../shared/realdata --workdir /tmp/biofm-experiment

Writes ``<workdir>/benchmark/benchmark.md`` (and .json, forest plots) and ``<workdir>/experiment.json``
(the corpus, the pretraining's figures, the fit comparison and the timings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

TASK_DATA = {"butppg-quality": "butppg", "butppg-hr": "butppg", "arrhythmia-af": None, "arrhythmia-rhythm": None,
             "ppgbp-sbp": "ppg_bp", "ppgbp-dbp": "ppg_bp", "ppgbp-hypertension": "ppg_bp",
             "troika-hr": "troika/Training_data", "capnobase-rr": "capnobase/data", "cinc2017-rhythm": "cinc2017"}
PPGBP = ("ppgbp-sbp", "ppgbp-dbp", "ppgbp-hypertension")


def held_out(real: Path, work: Path, corpus_yaml: Path) -> dict[str, Path]:
    """Folders of links to the recordings of the arrhythmia set and CapnoBase that the corpus does
    not hold: the benchmark's subjects of those two tasks."""
    from biofm.config import CorpusConfig, load_config
    from biofm.corpus import link_recordings
    from biofm.sources.formats import format_prefix

    out = {}
    for source in load_config(CorpusConfig, corpus_yaml).sources:
        if source.name not in ("arrhythmia", "capnobase"):
            continue
        out[source.name] = link_recordings(real / format_prefix(source.raw)[1], work / "raw" / source.name,
                                           source.cases, others=True)
    return out


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
    p.add_argument("--config", default="configs/ssl_pretrain.yaml", help="the pretraining recipe (YAML)")
    p.add_argument("--epochs", type=int, default=20, help="pretraining epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus's val split, the folds and the bootstrap")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--finetune", action="store_true", help="also fine-tune the encoder on every fold")
    p.add_argument("--finetune-epochs", type=int, default=4, help="fine-tuning epochs (half of them head only)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray's own lines too")
    args = p.parse_args()
    from biofm import output

    output.configure(args.verbose, own_process=True)

    from biofm.benchmark import benchmark
    from biofm.config import ChannelsConfig, FinetuneConfig, PretrainConfig, WindowsConfig, load_config, resolve
    from biofm.corpus import build_corpus
    from biofm.train.pretrain import pretrain

    real, work = Path(args.realdata).resolve(), Path(args.workdir)
    if not (real / "ppg_arrhythmia").is_dir():
        raise SystemExit(f"benchmark_experiment: {real}/ppg_arrhythmia is absent: point --realdata at shared/realdata")
    if work.exists():
        shutil.rmtree(work)
    t0, timings = time.perf_counter(), {}
    channels = load_config(ChannelsConfig, "configs/channels.yaml")
    windows = load_config(WindowsConfig, "configs/windows.yaml")
    corpus = build_corpus(resolve("configs/corpus_realdata.yaml"), real, work / "corpus", channels, windows, args.seed,
                          args.address)
    raws = held_out(real, work, work / "corpus" / "corpus.yaml")
    timings["corpus_s"] = round(time.perf_counter() - t0, 1)

    cfg = dataclasses.replace(load_config(PretrainConfig, args.config), channels=tuple(args.channels),
                              epochs=args.epochs, warmup_epochs=1.0)
    result = pretrain(cfg, str(work / "corpus" / "corpus.yaml"), str(work / "foundation_model"), address=args.address)
    timings["pretrain_s"] = round(time.perf_counter() - t0 - timings["corpus_s"], 1)
    encoder = str(work / "foundation_model" / "best_model.pt")

    names = [n for n in (args.tasks or TASK_DATA) if TASK_DATA[n] is None or (real / TASK_DATA[n]).is_dir()]
    fit = choose_fit(encoder, real, work, channels, windows, args.seed, args.address) if set(PPGBP) & set(names) else None
    raw_of = {"arrhythmia-af": raws["arrhythmia"], "arrhythmia-rhythm": raws["arrhythmia"], "capnobase-rr": raws["capnobase"]}
    task_dirs = [prepare(n, raw_of.get(n) or real / TASK_DATA[n], work / "tasks" / n, channels, windows, args.seed,
                         args.address, fit["kept"] if n in PPGBP else None) for n in names]
    t1 = time.perf_counter()
    finetune = dataclasses.replace(load_config(FinetuneConfig, "configs/finetune_butppg.yaml"), epochs=args.finetune_epochs,
                                   head_epochs=args.finetune_epochs // 2, batch_size=64, lr=1e-3, head_lr=1e-3)
    report = benchmark([f"pretrained={encoder}"], task_dirs, str(work / "benchmark"), resamples=args.resamples,
                       seed=args.seed, finetune=finetune if args.finetune else None, address=args.address)
    timings["benchmark_s"] = round(time.perf_counter() - t1, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    summary = {"corpus": corpus, "channels": args.channels, "config": args.config,
               "pretrain": {"epochs": args.epochs, **result},
               "ssl_evaluation": json.loads((work / "foundation_model" / "ssl_evaluation.json").read_text()),
               "fit_choice": fit, "timings": timings, "benchmark": str(work / "benchmark" / "benchmark.md")}
    (work / "experiment.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[benchmark] experiment done in {timings['total_s']:.0f} s: {work / 'benchmark' / 'benchmark.md'}; "
          f"{len(report['tasks'])} tasks", flush=True)


if __name__ == "__main__":
    main()
