"""Is pretraining worth it? The fine-tuned model against its baselines, on one split or in a
subject-wise cross-validation.

Variants (all through :func:`biofm.train.finetune.finetune`):
``finetuned`` (the config as given), ``scratch`` (same model, random init, everything trained),
``linear_probe`` (pretrained encoder frozen, only the head trained).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from biofm import storage
from biofm.config import FinetuneConfig
from biofm.errors import BiofmError, ConfigError
from biofm.splits import kfold_groups
from biofm.train.finetune import _data_task, finetune
from biofm.train.metrics import METRICS, slug

VARIANTS = ("finetuned", "scratch", "linear_probe")


def reported(task: dict) -> tuple[str, ...]:
    """The test metrics a comparison shows for ``task``: a binary task's at its threshold (F1 of
    its positive class), the kind's :data:`~biofm.train.metrics.METRICS` otherwise."""
    if task["kind"] == "binary":
        return "auroc", "auprc", "balanced_accuracy", f"f1_{slug(task['classes'][1])}", "accuracy"
    return METRICS[task["kind"]]


def variant_config(cfg: FinetuneConfig, variant: str) -> FinetuneConfig:
    return {"finetuned": cfg, "scratch": dataclasses.replace(cfg, init="scratch"),
            "linear_probe": dataclasses.replace(cfg, init="pretrained", unfreeze_last_n=0)}[variant]


def compare_variants(cfg: FinetuneConfig, pretrained, data_dir: str | Path, output_dir: str | Path,
                     variants=VARIANTS, address: str | None = None) -> dict:
    """Fine-tune each variant on ``data_dir`` into ``output_dir/<variant>`` (``finetuned`` goes
    to ``output_dir`` itself); returns variant -> test metrics and writes ``report.json``."""
    output_dir = storage.normalize(output_dir)
    shown = reported(_data_task(storage.join(storage.normalize(data_dir), "train")))
    report = {}
    for v in variants:
        out = output_dir if v == "finetuned" else storage.join(output_dir, "baselines", v)
        report[v] = finetune(variant_config(cfg, v), pretrained, data_dir, out, address=address)["test"]
    storage.write_text(storage.join(output_dir, "report.json"), json.dumps(report, indent=1))
    print(format_report({v: {k: [m[k]] for k in shown} for v, m in report.items()}, shown))
    return report


def cross_validate(cfg: FinetuneConfig, pretrained, data_dir: str | Path, output_dir: str | Path, folds: int = 5,
                   variants=VARIANTS, seed: int = 0, address: str | None = None) -> dict:
    """Subject-wise ``folds``-fold cross-validation over every window of a prepared task folder
    (its train, val and test pooled): fold i tests on subject fold i, picks the epoch (and a binary
    task's threshold) on fold i + 1, trains on the rest. Writes ``cv_report.json``."""
    from biofm.tasks import Task, _split_key

    dirs = [d for d in storage.list_dirs(data_dir) if storage.list_files(d, ".parquet")]
    files = [f for d in dirs for f in storage.list_files(d, ".parquet")]
    tables = [storage.read_table(f) for f in files]
    if not tables:
        raise BiofmError(f"no labelled windows under {data_dir}: write the task with `biofm prepare-task` first")
    metadata = tables[0].schema.metadata
    table = pa.concat_tables(tables).replace_schema_metadata(metadata)
    task = _data_task(dirs[0])
    values = table.column("target" if task["kind"] == "regression" else "label").to_numpy()
    subjects = np.array(table.column("subject_id").to_pylist())
    key = Task(**{k: tuple(v) if isinstance(v, list) else v for k, v in task.items()})
    rates = {s: _split_key(key, values[subjects == s]) for s in set(subjects)}
    if folds < 3 or folds > len(rates):
        raise ConfigError(f"--folds must be between 3 and the number of subjects ({len(rates)}), got {folds}")
    groups = kfold_groups(rates, folds, seed)
    per_fold = []
    for i in range(folds):
        parts = {"test": groups[i], "val": groups[(i + 1) % folds],
                 "train": [s for j, g in enumerate(groups) if j not in (i, (i + 1) % folds) for s in g]}
        fold_data = storage.join(output_dir, f"fold_{i}", "data")
        for split, members in parts.items():
            part = table.filter(pc.is_in(table.column("subject_id"), pa.array(members)))
            storage.write(storage.join(fold_data, split, "but_ppg.parquet"), lambda f: pq.write_table(part, f))
        print(f"[finetune-cv] fold {i + 1}/{folds}: test subjects {groups[i]}", flush=True)
        result = {"subjects": parts}
        for v in variants:
            result[v] = finetune(variant_config(cfg, v), pretrained, fold_data, storage.join(output_dir, f"fold_{i}", v),
                                 address=address)["test"]
        per_fold.append(result)
    shown = reported(task)
    summary = {v: {k: [f[v][k] for f in per_fold] for k in shown} for v in variants}
    report = {"task": task["name"], "folds": folds, "windows": table.num_rows, "subjects": len(rates),
              "summary": {v: {k: {"mean": float(np.nanmean(x)), "std": float(np.nanstd(x))} for k, x in m.items()}
                          for v, m in summary.items()},
              "per_fold": per_fold}
    storage.write_text(storage.join(output_dir, "cv_report.json"), json.dumps(report, indent=1))
    print(format_report(summary, shown))
    return report


def format_report(summary: dict[str, dict[str, list[float]]], shown: tuple[str, ...]) -> str:
    """Variant -> metric -> values (one per fold) as a table of mean ± std, metrics ``shown``."""
    lines = [f"{'variant':14s} " + " ".join(f"{k:>18s}" for k in shown)]
    for v, m in summary.items():
        cells = [f"{np.nanmean(m[k]):.3f} ± {np.nanstd(m[k]):.3f}" if len(m[k]) > 1 else f"{m[k][0]:.3f}"
                 for k in shown]
        lines.append(f"{v:14s} " + " ".join(f"{c:>18s}" for c in cells))
    return "\n".join(lines)
