"""Which pretraining recipe learns? The study behind ``configs/ssl_pretrain.yaml``'s defaults.

Three parts (``--parts``), each writing under ``--workdir``:

``why``: the measurement of the issue, with the project's own functions. 25 of the 35
    arrhythmia patients train and 10 validate (PPG only, the shipped geometry, batch 128, AdamW
    5e-4, one warm-up epoch, ``--why-epochs`` epochs): the seed's loss (masked MSE + 0.3 x STFT)
    against masked MSE alone, the validation masked MSE after every epoch, and the floors on the
    same masks (predicting zero, linear interpolation, copying one beat period earlier), overall
    and on sinus-rhythm windows.
``grid``: every recipe of :data:`GRID` (each one change from the base, masked MSE alone) pretrained
    for ``--epochs`` at ``--batch-size`` (64: twice the steps per epoch of the shipped 128, on a
    CPU; the learning rate stays the shipped 5e-4) on the real corpus (``configs/corpus_realdata.yaml``: every unlabelled
    recording that is no benchmark subject), then measured three ways: the validation masked MSE
    against the floors (``evaluate-ssl`` on the corpus's val windows), the benchmark's probe
    (5 subject-wise folds, 200 resamples) on the validation tasks, and seconds per epoch.
``long``: the base, the best of the grid and the grid's winning changes combined, for
    ``--long-epochs``; the recipe chosen among them is ``choice`` in ``study.json``.

Validation tasks: AF, the six rhythms and CapnoBase's respiratory rate, on the corpus's own 15
arrhythmia patients and 14 CapnoBase cases (their labels never reach pretraining); no benchmark
subject is read. The order of the recipes (:func:`score`): first those whose validation masked MSE
beats every floor on their own masks (a model that has not learned the masked signal is not the
foundation model this study looks for; this rule was added after the first grid, where the best
probe rank went to a recipe that does not beat its one-period copy), then by mean rank over the
validation tasks' headline figures (AUROC, macro-F1, MAE), ties broken by the masked MSE over the
one-period copy's. The grid's first is ``grid_choice`` in ``study.json``. The held-out benchmark is
``jobs/benchmark_experiment.py`` with the chosen recipe: read once, after this.

    python jobs/pretrain_study.py --realdata ../shared/realdata --workdir /tmp/biofm-study

On a GPU: the same command with ``--epochs 30 --long-epochs 200 --batch-size 128``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

BASE = {"mse_weight": 1.0, "stft_weight": 0.0, "spectral_weight": 0.0, "align_weight": 0.0, "mask_input": "zeros",
        "patch_length": 125, "target_norm": "window", "decoder": "linear", "mask_ratio": 0.4}
GRID = {   # name -> its changes from BASE
    "seed: MSE + 0.3 STFT": {"stft_weight": 0.3},
    "MSE alone (base)": {},
    "MSE + in-band spectral": {"spectral_weight": 1.0},
    "mask token": {"mask_input": "token"},
    "patch 50": {"patch_length": 50},
    "patch 25": {"patch_length": 25},
    "per-patch target": {"target_norm": "patch"},
    "mixer decoder": {"decoder": "mixer"},
    "mask ratio 0.25": {"mask_ratio": 0.25},
    "mask ratio 0.6": {"mask_ratio": 0.6},
    "PPG-ECG alignment alone": {"mse_weight": 0.0, "align_weight": 1.0},
    "MSE + PPG-ECG alignment": {"align_weight": 0.5},
}
VAL_TASKS = ("arrhythmia-af", "arrhythmia-rhythm", "capnobase-rr")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def base_config(path: str, channels, overrides: dict):
    from biofm.config import PretrainConfig, with_overrides

    return with_overrides(PretrainConfig, path, {"channels": list(channels), "warmup_epochs": 1.0, **BASE, **overrides},
                          "pretrain_study")


def validation_tasks(real: Path, corpus_yaml: Path, work: Path, channels, windows, seed: int, address) -> list[str]:
    """The validation tasks on the corpus's own patients and cases (folders of links)."""
    from biofm.config import CorpusConfig, load_config
    from biofm.corpus import link_recordings
    from biofm.sources.formats import format_prefix
    from biofm.tasks import TASKS, prepare_task

    sources = {s.name: s for s in load_config(CorpusConfig, corpus_yaml).sources}
    dirs = []
    for name in VAL_TASKS:
        task = TASKS[name]
        source = sources["arrhythmia" if task.source == "arrhythmia" else "capnobase"]
        raw = link_recordings(real / format_prefix(source.raw)[1], work / "raw" / name, source.cases, where=name)
        out = work / name
        prepare_task(task, raw, out, channels.select(task.channels or ["PPG"]), windows, (1.0, 0.0, 0.0), seed,
                     address=address)   # the probe's folds split the subjects
        dirs.append(str(out))
    return dirs


def measure(cfg, corpus_yaml: Path, tasks: list[str], out: Path, seed: int, address) -> dict:
    """Pretrain ``cfg`` on the corpus; its validation masked MSE against the floors, its probe on
    the validation tasks (against random weights) and its seconds per epoch."""
    from biofm.benchmark import HEADLINE, benchmark
    from biofm.train.evaluate import evaluate_ssl
    from biofm.train.pretrain import pretrain

    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    pretrain(cfg, str(corpus_yaml), str(out / "model"), address=address)
    history = json.loads((out / "model" / "training_history.json").read_text())
    ssl = evaluate_ssl(out / "model" / "best_model.pt", str(corpus_yaml), "val")
    report = benchmark([f"pretrained={out / 'model' / 'best_model.pt'}"], tasks, str(out / "probe"), resamples=200,
                       seed=seed, address=address)
    probe = {}
    for name, t in report["tasks"].items():
        head = t["headline"]
        probe[name] = {"metric": head, "pretrained": t["rows"]["pretrained"][head],
                       "random weights": t["rows"]["random weights"][head],
                       "hand-crafted": t["rows"]["hand-crafted"][head],
                       "difference": t["differences"]["pretrained - random weights"]}
    overall = ssl["masked_mse"]["overall"]
    return {"config": dataclasses.asdict(cfg), "epochs": len(history), "best_epoch": int(np.argmin([h["val_loss"] for h in history])) + 1,
            "val_masked_mse_by_epoch": [h["val_masked_mse"] for h in history],
            "masked_mse": overall, "by_source": {s: v["overall"] for s, v in ssl["by_source"].items()},
            "by_class": {c: v["overall"] for c, v in ssl["by_class"].items()}, "beats": ssl["beats"],
            "seconds_per_epoch": float(np.mean([h["train_s"] for h in history])), "probe": probe,
            "wall_s": round(time.perf_counter() - t0, 1), "headline": {n: HEADLINE[t["kind"]] for n, t in report["tasks"].items()}}


def ranks(rows: dict[str, dict]) -> dict[str, float]:
    """Each recipe's mean rank over the validation tasks (1: best), then its masked MSE over the
    one-period copy's as the tie-break (recipes without a decoder loss: none)."""
    names, per_task = list(rows), []
    for task in rows[names[0]]["probe"]:
        sign = -1 if rows[names[0]]["probe"][task]["metric"] == "mae" else 1
        order = sorted(names, key=lambda n: -sign * rows[n]["probe"][task]["pretrained"]["value"])
        per_task.append({n: order.index(n) + 1 for n in names})
    return {n: float(np.mean([r[n] for r in per_task])) for n in names}


def learns(row: dict) -> bool:
    """Whether a recipe's validation masked MSE beats every floor on its own masks."""
    m = row["masked_mse"]
    return row["config"]["mse_weight"] > 0 and m["model"] < min(m["zero"], m["linear_interp"], m["period_copy"])


def score(rows: dict[str, dict]) -> list[str]:
    """The recipes, best first: those that :func:`learns` first, then :func:`ranks`, then the masked
    MSE relative to the period copy."""
    mean_rank = ranks(rows)

    def tie(n):
        m = rows[n]["masked_mse"]
        return m["model"] / m["period_copy"] if rows[n]["config"]["mse_weight"] > 0 else np.inf
    return sorted(rows, key=lambda n: (not learns(rows[n]), mean_rank[n], tie(n)))


def table(rows: dict[str, dict]) -> str:
    """The study's markdown table, in :func:`score`'s order: masked MSE (bold where it beats every
    floor) and its floors, probe figures (pretrained and the paired difference to random weights),
    seconds per epoch."""
    tasks = list(next(iter(rows.values()))["probe"])
    mean_rank = ranks(rows)
    head = ("| recipe | val masked MSE | zero | interp | period copy | "
            + " | ".join(f"{t} ({rows[next(iter(rows))]['probe'][t]['metric']}), pretrained - random" for t in tasks)
            + " | mean rank | s/epoch |")
    lines = [head, "|---" * (7 + len(tasks)) + "|"]

    def cell(c):
        return "undefined" if c.get("value") is None else f"{c['value']:.3f}"

    for name in score(rows):
        r, m = rows[name], rows[name]["masked_mse"]
        mse = f"{m['model']:.3f}" if r["config"]["mse_weight"] > 0 else f"({m['model']:.3f}, no decoder loss)"
        mse = f"**{mse}**" if learns(r) else mse   # bold: beats every floor
        probes = " | ".join(f"{cell(r['probe'][t]['pretrained'])}, {cell(r['probe'][t]['difference'])} "
                            f"[{r['probe'][t]['difference']['ci95'][0]:+.3f}, {r['probe'][t]['difference']['ci95'][1]:+.3f}]"
                            if r["probe"][t]["difference"].get("value") is not None else "undefined" for t in tasks)
        lines.append(f"| {name} | {mse} | {m['zero']:.3f} | {m['linear_interp']:.3f} | {m['period_copy']:.3f} | {probes} | "
                     f"{mean_rank[name]:.1f} | {r['seconds_per_epoch']:.0f} |")
    return "\n".join(lines)


def why(real: Path, work: Path, channels, windows, pretrain_yaml: str, epochs: int, seed: int, address) -> dict:
    """The issue's measurement: 25 patients train, 10 validate; the seed's loss against masked MSE
    alone, per epoch, and the floors overall and on sinus windows."""
    from biofm.sources.arrhythmia import patients
    from biofm.tasks import TASKS, prepare_task
    from biofm.train.evaluate import evaluate_ssl
    from biofm.train.pretrain import pretrain

    ids = patients(real / "ppg_arrhythmia")
    order = np.random.default_rng(seed).permutation(len(ids))
    data = work / "why" / "arrhythmia"
    for part, members in (("train", order[:25]), ("val", order[25:])):
        raw = work / "why" / "raw" / part
        raw.mkdir(parents=True, exist_ok=True)
        for i in members:
            if not (raw / f"{ids[i]}.mat").exists():
                (raw / f"{ids[i]}.mat").symlink_to(real / "ppg_arrhythmia" / f"{ids[i]}.mat")
    task = TASKS["arrhythmia-rhythm"]
    for part in ("train", "val"):   # each part whole into its split: exactly 25 and 10 patients
        prepare_task(task, work / "why" / "raw" / part, work / "why" / f"part_{part}", channels.select(["PPG"]), windows,
                     (1.0, 0.0, 0.0), seed, address=address, classes_in_every_split=False)
        (data / part).parent.mkdir(parents=True, exist_ok=True)
        if not (data / part).exists():
            (data / part).symlink_to(work / "why" / f"part_{part}" / "train")
    shutil.copy(work / "why" / "part_val" / "manifest.json", data / "manifest.json")   # the task's classes
    out = {}
    for name, changes in (("seed: MSE + 0.3 STFT", {"stft_weight": 0.3}), ("MSE alone", {})):
        cfg = dataclasses.replace(base_config(pretrain_yaml, ["PPG"], changes), epochs=epochs, batch_size=128, lr=5e-4)
        folder = work / "why" / slug(name)
        if folder.exists():
            shutil.rmtree(folder)
        pretrain(cfg, str(data), str(folder), address=address)
        history = json.loads((folder / "training_history.json").read_text())
        ssl = evaluate_ssl(folder / "best_model.pt", str(data), "val")
        out[name] = {"val_masked_mse_by_epoch": [h["val_masked_mse"] for h in history], "masked_mse": ssl["masked_mse"]["overall"],
                     "sinus": ssl["by_class"].get("sinus", {}).get("overall"), "reconstruction": str(folder / "reconstruction.png")}
    return out


def why_table(result: dict) -> str:
    epochs = len(next(iter(result.values()))["val_masked_mse_by_epoch"])
    lines = ["| loss | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |", "|---" + "|---:" * epochs + "|"]
    lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["val_masked_mse_by_epoch"]) + " |" for name, r in result.items()]
    floors = next(iter(result.values()))
    lines += ["", "Floors on the same masks (validation windows; sinus-rhythm windows):",
              f"zero {floors['masked_mse']['zero']:.3f} ({floors['sinus']['zero']:.3f}), linear interpolation "
              f"{floors['masked_mse']['linear_interp']:.3f} ({floors['sinus']['linear_interp']:.3f}), one-period copy "
              f"{floors['masked_mse']['period_copy']:.3f} ({floors['sinus']['period_copy']:.3f}); the models' best "
              + ", ".join(f"{n} {r['masked_mse']['model']:.3f} ({r['sinus']['model']:.3f})" for n, r in result.items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realdata", default="../shared/realdata", help="the shared real-data folder")
    p.add_argument("--workdir", default="/tmp/biofm-study", help="everything the study writes")
    p.add_argument("--parts", nargs="+", default=["why", "grid", "long"], choices=["why", "grid", "long"])
    p.add_argument("--config", default="configs/ssl_pretrain.yaml", help="the pretraining YAML the recipes change")
    p.add_argument("--channels", nargs="+", default=["PPG", "ECG"], help="the encoder's channels")
    p.add_argument("--why-epochs", type=int, default=4, help="epochs of the why part")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each grid recipe")
    p.add_argument("--long-epochs", type=int, default=30, help="epochs of the long part")
    p.add_argument("--batch-size", type=int, default=64,
                   help="the grid's and the long part's batch (64: twice the shipped config's steps per epoch, for a CPU)")
    p.add_argument("--recipes", nargs="+", default=list(GRID), choices=list(GRID), metavar="RECIPE",
                   help="the grid's recipes to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray's own lines too")
    args = p.parse_args()
    from biofm import output

    output.configure(args.verbose, own_process=True)
    from biofm.config import ChannelsConfig, WindowsConfig, load_config, resolve
    from biofm.corpus import build_corpus

    real, work = Path(args.realdata).resolve(), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    channels = load_config(ChannelsConfig, "configs/channels.yaml")
    windows = load_config(WindowsConfig, "configs/windows.yaml")
    state_file = work / "study.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}

    def save():
        state_file.write_text(json.dumps(state, indent=1, default=str))

    if "why" in args.parts:
        state["why"] = why(real, work, channels, windows, args.config, args.why_epochs, args.seed, args.address)
        save()
        print(why_table(state["why"]), flush=True)
    corpus_yaml = work / "corpus" / "corpus.yaml"
    if {"grid", "long"} & set(args.parts):
        if not corpus_yaml.exists():
            state["corpus"] = build_corpus(resolve("configs/corpus_realdata.yaml"), real, work / "corpus", channels, windows,
                                           args.seed, args.address)
            save()
        tasks = validation_tasks(real, corpus_yaml, work / "val_tasks", channels, windows, args.seed, args.address)
    if "grid" in args.parts:
        state.setdefault("grid", {})
        for name, changes in GRID.items():
            if name in state["grid"] or name not in args.recipes:
                continue
            cfg = dataclasses.replace(base_config(args.config, args.channels, changes), epochs=args.epochs,
                                      batch_size=args.batch_size)
            state["grid"][name] = measure(cfg, corpus_yaml, tasks, work / "grid" / slug(name), args.seed, args.address)
            save()
            print(f"[study] {name}: masked MSE {state['grid'][name]['masked_mse']['model']:.3f}", flush=True)
        state["grid_choice"] = score(state["grid"])[0]
        save()
        (work / "grid.md").write_text(table(state["grid"]) + "\n")
        print(table(state["grid"]), flush=True)
    if "long" in args.parts:
        grid = state["grid"]
        order = [n for n in score(grid) if grid[n]["config"]["mse_weight"] > 0 or n == score(grid)[0]]
        base_rank = ranks(grid)["MSE alone (base)"]
        better = [n for n in GRID if GRID[n] and ranks(grid)[n] < base_rank and "alignment alone" not in n]
        combined = {}
        for n in better:   # one value per option: the better-ranked change wins
            for key, value in GRID[n].items():
                combined.setdefault(key, value)
        candidates = {"MSE alone (base)": {}, order[0]: GRID[order[0]], "combined: " + " + ".join(better) if better else "": combined}
        state.setdefault("long", {})
        for name, changes in candidates.items():
            if not name or name in state["long"]:
                continue
            cfg = dataclasses.replace(base_config(args.config, args.channels, changes), epochs=args.long_epochs,
                                      batch_size=args.batch_size)
            state["long"][name] = measure(cfg, corpus_yaml, tasks, work / "long" / slug(name), args.seed, args.address)
            save()
        state["choice"] = {"recipe": score(state["long"])[0], "changes": candidates[score(state["long"])[0]],
                           "rule": "beats every floor, then mean rank over the validation tasks, then masked MSE / one-period copy"}
        save()
        (work / "long.md").write_text(table(state["long"]) + "\n")
        print(table(state["long"]) + f"\n\nchosen: {state['choice']['recipe']}", flush=True)


if __name__ == "__main__":
    main()
