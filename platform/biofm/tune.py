"""Ray Tune over fine-tuning schedules, and the analysis of an experiment folder.

:func:`run_search` launches one Ray Train fine-tuning run per trial (the documented
Train-inside-Tune pattern: :func:`biofm.train.finetune.finetune` with Tune's report callback),
stops poor schedules early with ASHA on the task's val figure (AUROC for binary tasks, macro-F1
for multiclass, MAE for regression: ``finetune.SELECTION``), and resumes an interrupted experiment.
:func:`analyse` reads an experiment folder with plain files only (no Ray), so it works on a
folder copied from a cluster, or in place under a URI: a sorted table of trials, the best config as a YAML that
``biofm finetune --config`` accepts, and PNGs.

    <output_dir>/<name>/                     Tune's experiment folder
        biofm_search.json                    the search config and the base fine-tuning config
        <trial folders>/params.json, result.json, error.txt   written by Tune
        trials/<trial_id>/                   the trial's fine-tuning run and artifacts
        trials.csv, best_config.yaml, <metric>_by_epoch.png, <metric>_vs_hyperparameters.png
                                             (<metric>: val_auroc, val_macro_f1 or val_mae)
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import yaml

from biofm import output, storage
from biofm.config import FinetuneConfig, TuneSearchConfig, from_dict, to_jsonable
from biofm.errors import BiofmError

STATE = "biofm_search.json"
SHOWN = {"val_auroc": "val AUROC", "val_macro_f1": "val macro-F1", "val_mae": "val MAE"}


def shown(metric: str, task: dict | None) -> str:
    """A metric's name in the task's words: ``val AUROC (AF vs other rhythm)``, ``val MAE (heart
    rate, bpm)``."""
    if not task:
        return SHOWN[metric]
    if task["kind"] == "binary":
        return f"{SHOWN[metric]} ({task['classes'][1]} vs {task['classes'][0]})"
    if task["kind"] == "multiclass":
        return f"{SHOWN[metric]} ({', '.join(task['classes'])})"
    return f"{SHOWN[metric]} ({', '.join(x for x in (task.get('target'), task.get('unit')) if x) or task['name']})"


def param_space(search: dict) -> dict:
    """``search`` (see :class:`~biofm.config.TuneSearchConfig`) as Ray Tune samplers."""
    from ray import tune

    make = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1), "choice": tune.choice, "grid": tune.grid_search}
    space = {}
    for key, spec in search.items():
        kind, values = next(iter(spec.items()))
        space[key] = make[kind](values)
    return space


def _grid_mode(search: dict) -> dict:
    return {k: {"grid": next(iter(v.values()))} for k, v in search.items()}


def trial_base(tcfg: TuneSearchConfig, base: FinetuneConfig) -> dict:
    """What every trial starts from: ``base`` with the search's epochs and per-trial resources
    (its training worker gets ``cpus_per_trial`` CPUs and ``gpus_per_trial`` of a GPU). Checked
    per trial, once the trial's values are in (head_epochs may exceed max_epochs alone)."""
    return {**to_jsonable(base), "epochs": tcfg.max_epochs, "cpus_per_worker": tcfg.cpus_per_trial,
            "use_gpu": tcfg.gpus_per_trial > 0, "gpus_per_worker": tcfg.gpus_per_trial or 1.0}


def trial_config(base: dict, params: dict) -> FinetuneConfig:
    """The fine-tuning config of a trial: the base config with the trial's values, ``head_epochs``
    clamped to the trial's epochs (a space drawing head_epochs 5 stays valid for 2-epoch trials:
    those train the head only)."""
    merged = {**base, **params}
    if isinstance(merged.get("head_epochs"), int) and isinstance(merged.get("epochs"), int):
        merged["head_epochs"] = min(merged["head_epochs"], merged["epochs"])
    return from_dict(FinetuneConfig, merged, where="trial config")


def finetune_trial(params: dict, base: dict, pretrained: str, data_dir: str, trials_dir: str) -> None:
    """One trial: the same fine-tuning run as ``biofm finetune``, its epochs reported to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from biofm.train.finetune import finetune

    trial_id = ray.tune.get_context().get_trial_id()
    out = storage.join(trials_dir, trial_id)
    run_name = f"train-trial_id={trial_id}"  # fixed per trial, so a restarted trial resumes its run
    finetune(trial_config(base, params), pretrained, data_dir, out, resume=storage.exists(storage.join(out, "ray", run_name)),
             run_name=run_name, callbacks=[TuneReportCallback()])


def run_search(tcfg: TuneSearchConfig, base: FinetuneConfig, pretrained: str | Path, data_dir: str | Path,
               output_dir: str | Path, name: str = "finetune_schedules", resume: bool = False,
               address: str | None = None) -> str:
    """Run (or with ``resume``, finish) the search; returns the experiment folder, analysed.
    ``output_dir``, ``pretrained`` and ``data_dir``: local paths or URIs."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from biofm.ray_connect import ensure_ray

    exp_dir, pretrained, data_dir = storage.join(output_dir, name), storage.normalize(pretrained), storage.normalize(data_dir)
    from biofm.train.finetune import SELECTION, _data_task

    if resume and not storage.is_file(storage.join(exp_dir, STATE)):
        raise BiofmError(f"nothing to resume in {exp_dir}")
    if not resume and storage.exists(exp_dir):
        raise BiofmError(f"{exp_dir} already holds an experiment: pass --resume to finish it, or choose "
                         "another --output-dir / --name")
    if not storage.is_file(pretrained):
        raise BiofmError(f"pretrained checkpoint not found: {pretrained}")
    if not storage.list_files(storage.join(data_dir, "train"), ".parquet"):
        raise BiofmError(f"no labelled windows in {data_dir}/train: write the task with `biofm prepare-task` "
                         "(BUT-PPG: `biofm prepare-butppg`)")
    task = _data_task(storage.join(data_dir, "train"))
    metric, mode = SELECTION[task["kind"]]
    from biofm.dataset import read_data_spec

    channels = read_data_spec(storage.join(data_dir, "train"))["channels"]
    if base.channels and not set(base.channels) & set(channels):  # said once here, not by every trial
        raise BiofmError(f"the fine-tuning channels {list(base.channels)} are none of the data's {channels}")
    base_dict = trial_base(tcfg, base)
    if not resume:
        storage.write_text(storage.join(exp_dir, STATE), json.dumps(
            {"search": to_jsonable(tcfg), "base": base_dict, "pretrained": pretrained, "data_dir": data_dir,
             "metric": metric, "mode": mode, "task": task}, indent=1))
    # Tune saves the experiment state (which trials finished) at most every 5 s, and copies it to
    # the experiment folder at most every sync_period (below): an interruption loses at most that
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    ensure_ray(address)
    trainable = tune.with_resources(
        tune.with_parameters(finetune_trial, base=base_dict, pretrained=pretrained, data_dir=data_dir,
                             trials_dir=storage.join(exp_dir, "trials")),
        {"CPU": 0.01})  # the trial's driver only waits; its training worker asks for cpus_per_trial
    search = _grid_mode(tcfg.search) if tcfg.mode == "grid" else tcfg.search
    if resume:
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(search),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=1 if tcfg.mode == "grid" else tcfg.num_samples,
                # ASHA puts a rung at max_t when max_t / grace_period is a power of the reduction
                # factor; a trial stopped there, at its last epoch, would never write its artifacts.
                # max_t = max_epochs - 1 keeps every rung before the last epoch, and
                # stop_last_trials=False lets a trial past max_t finish by itself.
                # time_attr epoch: a trial resumed from its checkpoint keeps counting its epochs.
                scheduler=ASHAScheduler(time_attr="epoch", max_t=tcfg.max_epochs - 1, grace_period=tcfg.grace_period,
                                        reduction_factor=tcfg.reduction_factor, stop_last_trials=False),
                search_alg=BasicVariantGenerator(random_state=tcfg.seed, max_concurrent=tcfg.max_concurrent_trials)),
            run_config=tune.RunConfig(name=name, storage_path=storage.normalize(output_dir),
                                      failure_config=tune.FailureConfig(max_failures=tcfg.trial_max_failures),
                                      sync_config=tune.SyncConfig(sync_period=5), verbose=output.tune_verbosity()),
        )
    results = tuner.fit()
    failed = [f"{r.metrics.get('trial_id', '?')}: {str(r.error).splitlines()[-1]}" for r in results if r.error]
    analyse(exp_dir, prefix="[tune]")
    if failed:  # the search is not done: a rerun with --resume (the pipeline's, too) retries these
        raise BiofmError(f"{len(failed)} of {len(results)} trials failed ({'; '.join(failed)}); the report above "
                         f"has the others. Fix the cause and rerun with --resume to retry the failed trials")
    return exp_dir


def load_trials(exp_dir: str) -> tuple[dict, list[dict]]:
    """The search state and every trial of ``exp_dir``: params, per-epoch results, status
    (``completed``, ``stopped early`` by ASHA or an interruption, ``error``), error text."""
    state_file = storage.join(exp_dir, STATE)
    if not storage.is_file(state_file):
        raise BiofmError(f"{exp_dir} is not a biofm tune experiment (no {STATE})")
    state = json.loads(storage.read_text(state_file))
    state.setdefault("metric", "val_auroc")  # experiments from before tasks searched BUT-PPG quality
    state.setdefault("mode", "max")
    state.setdefault("task", {"name": "butppg-quality", "kind": "binary", "classes": ["poor", "good"]}
                     if state["metric"] == "val_auroc" else None)
    metric, sign = state["metric"], 1.0 if state["mode"] == "max" else -1.0
    max_epochs = state["search"]["max_epochs"]
    trials = []
    for folder in storage.list_dirs(exp_dir):
        files = {storage.name(f): f for f in storage.list_files(folder)}
        if "params.json" not in files:
            continue

        def read(name: str) -> str:
            return storage.read_text(files[name]) if name in files else ""

        results = [json.loads(line) for line in read("result.json").splitlines() if line.strip()]
        results = [r for r in results if metric in r]
        error = read("error.txt").strip()
        # Tune writes "Failure # n (occurred at <date>)" per failure (a rerun on --resume keeps
        # counting, and keeps only its own); a trial retried after one (its node lost) and
        # reporting later is judged by its epochs, not by the failure
        failures = re.findall(r"Failure # (\d+) \(occurred at ([\d_-]+)\)", error)
        failed_at = [at for _, at in failures]
        recovered = bool(error and failed_at and results and results[-1].get("date", "") > max(failed_at))
        epochs = max((r["epoch"] for r in results), default=0)
        status = "error" if error and not recovered else "completed" if epochs >= max_epochs else "stopped early"
        best = max(results, key=lambda r: (sign * r[metric], -r.get("val_loss", 0.0)), default=None)
        trials.append({
            "trial": results[0]["trial_id"] if results else _trial_id(storage.name(folder)), "folder": storage.name(folder),
            "params": json.loads(read("params.json")),
            "status": status, "epochs": epochs, f"best_{metric}": best[metric] if best else float("nan"),
            "best_epoch": best["epoch"] if best else 0,
            "best_val_loss": best.get("val_loss", float("nan")) if best else float("nan"),
            f"test_{metric[4:]}": _test_figure(storage.join(exp_dir, "trials", results[0]["trial_id"]), metric[4:])
            if results else float("nan"),
            "history": [(r["epoch"], r[metric]) for r in results],
            "failures": max((int(n) for n, _ in failures), default=int(bool(error))), "error": error.splitlines()[-1] if error and not recovered else ""})
    # ties (frequent on small val splits) go to the lower val loss at that epoch
    trials.sort(key=lambda t: (t["status"] == "error", -sign * t[f"best_{metric}"] if t["epochs"] else float("inf"),
                               t["best_val_loss"] if t["epochs"] else 0.0, t["trial"]))
    return state, trials


def _test_figure(trial_run: str, name: str) -> float:
    """A test figure (``auroc``, ``macro_f1``, ``mae``) of a trial's fine-tuning run (written by
    trials that ran to their end)."""
    path = storage.join(trial_run, "test_metrics.json")
    return json.loads(storage.read_text(path))["test"][name] if storage.is_file(path) else float("nan")


def _trial_id(folder_name: str) -> str:
    """Tune names trial folders ``<trainable>_<experiment>_<index>_<params>_<date>``."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})_", folder_name)
    return found.group(1) if found else folder_name


def analyse(exp_dir: str | Path, prefix: str = "[tune-report]") -> dict:
    """Table, ``best_config.yaml``, ``trials.csv`` and PNGs for ``exp_dir``; returns a summary."""
    exp_dir = storage.normalize(exp_dir)
    state, trials = load_trials(exp_dir)
    if not trials:
        raise BiofmError(f"{exp_dir} holds no trials yet")
    metric = state["metric"]
    best_key, test_key = f"best_{metric}", f"test_{metric[4:]}"
    keys = sorted({k for t in trials for k in t["params"]})
    name = shown(metric, state["task"])
    for line in format_table(trials, keys, metric, name).splitlines():
        print(f"{prefix} {line}")
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["trial", "status", "epochs", best_key, "best_epoch", "best_val_loss", test_key, "failures", *keys, "error"])
    for t in trials:
        w.writerow([t["trial"], t["status"], t["epochs"], t[best_key], t["best_epoch"], t["best_val_loss"],
                    t[test_key], t["failures"],
                    *[t["params"].get(k) for k in keys], t["error"]])
    storage.write_text(storage.join(exp_dir, "trials.csv"), table.getvalue())
    ok = [t for t in trials if t["status"] != "error" and t["epochs"] > 0]
    summary = {"trials": len(trials), "completed": sum(t["status"] == "completed" for t in trials),
               "stopped_early": sum(t["status"] == "stopped early" for t in trials),
               "errors": sum(t["status"] == "error" for t in trials), "metric": metric, "metric_name": name}
    if ok:
        best = ok[0]
        config = to_jsonable(trial_config(state["base"], best["params"]))
        header = (f"# Best schedule of {storage.name(exp_dir)}: trial {best['trial']}, {name} {best[best_key]:.4f} "
                  f"at epoch {best['best_epoch']} (ties: the lower val loss).\n# Use it with: biofm finetune --config <this file>\n")
        storage.write_text(storage.join(exp_dir, "best_config.yaml"), header + yaml.safe_dump(config, sort_keys=False))
        summary.update(best_trial=best["trial"], best=best[best_key], best_params=best["params"])
        _plots(exp_dir, ok, keys, metric, name)
    return summary


def format_table(trials: list[dict], keys: list[str], metric: str = "val_auroc", name: str | None = None) -> str:
    """The trials as a text table; ``name``: the metric's name in the task's words (:func:`shown`)."""
    name = name or SHOWN[metric]

    def show(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    best_key, test_key = f"best_{metric}", f"test_{metric[4:]}"
    rows = [["trial", "status", "epochs", f"best {name}", "val loss there", name.replace("val", "test", 1), *keys]]
    rows += [[t["trial"], t["status"], str(t["epochs"]), f"{t[best_key]:.4f}" if t["epochs"] else "-",
              f"{t['best_val_loss']:.4f}" if t["epochs"] else "-",
              "-" if t[test_key] != t[test_key] else f"{t[test_key]:.4f}",  # nan: no test run
              *[show(t["params"].get(k)) for k in keys]]
             for t in trials]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [f"{t['trial']}: {t['error']}" for t in trials if t["error"]]
    return "\n".join(lines)


def _plots(exp_dir: str, trials: list[dict], keys: list[str], metric: str, name: str) -> None:
    from biofm.plotting import plt, save_png

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        epochs, auroc = zip(*t["history"])
        line, = ax.plot(epochs, auroc, marker=".", label=f"{t['trial']} ({t['status']})")
        if t["status"] == "stopped early":
            ax.plot(epochs[-1], auroc[-1], "x", color=line.get_color(), ms=9)
    ax.set(xlabel="epoch", ylabel=name, title=f"{name} per trial (x: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, storage.join(exp_dir, f"{metric}_by_epoch.png"))

    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [t["params"][key] for t in trials]
        y = [t[f"best_{metric}"] for t in trials]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            ax.scatter(values, y)
            if key in ("lr", "head_lr", "weight_decay") and min(values) > 0:
                ax.set_xscale("log")
                ax.tick_params(axis="x", which="both", labelrotation=45, labelsize=7)  # 1e-5 .. 1e-3 labels overlap flat
        else:
            labels = sorted({str(v) for v in values})
            ax.scatter([labels.index(str(v)) for v in values], y)
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set(xlabel=key, ylabel=f"best {name}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, storage.join(exp_dir, f"{metric}_vs_hyperparameters.png"))
