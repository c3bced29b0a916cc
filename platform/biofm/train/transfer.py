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
from biofm.train.finetune import finetune

VARIANTS = ("finetuned", "scratch", "linear_probe")
REPORTED = ("auroc", "auprc", "balanced_accuracy", "f1_good", "accuracy")


def variant_config(cfg: FinetuneConfig, variant: str) -> FinetuneConfig:
    return {"finetuned": cfg, "scratch": dataclasses.replace(cfg, init="scratch"),
            "linear_probe": dataclasses.replace(cfg, init="pretrained", unfreeze_last_n=0)}[variant]


def compare_variants(cfg: FinetuneConfig, pretrained, data_dir: str | Path, output_dir: str | Path,
                     variants=VARIANTS, address: str | None = None) -> dict:
    """Fine-tune each variant on ``data_dir`` into ``output_dir/<variant>`` (``finetuned`` goes
    to ``output_dir`` itself); returns variant -> test metrics and writes ``report.json``."""
    output_dir = storage.normalize(output_dir)
    report = {}
    for v in variants:
        out = output_dir if v == "finetuned" else storage.join(output_dir, "baselines", v)
        report[v] = finetune(variant_config(cfg, v), pretrained, data_dir, out, address=address)["test"]
    storage.write_text(storage.join(output_dir, "report.json"), json.dumps(report, indent=1))
    print(format_report({v: {k: [m[k]] for k in REPORTED} for v, m in report.items()}))
    return report


def cross_validate(cfg: FinetuneConfig, pretrained, data_dir: str | Path, output_dir: str | Path, folds: int = 5,
                   variants=VARIANTS, seed: int = 0, address: str | None = None) -> dict:
    """Subject-wise ``folds``-fold cross-validation over every record of a prepared BUT-PPG
    folder (its train, val and test pooled): fold i tests on subject fold i, picks the epoch
    and threshold on fold i + 1, trains on the rest. Writes ``cv_report.json``."""
    files = [f for d in storage.list_dirs(data_dir) for f in storage.list_files(d, ".parquet")]
    tables = [storage.read_table(f) for f in files]
    if not tables:
        raise BiofmError(f"no BUT-PPG records under {data_dir}: run `biofm prepare-butppg` first")
    metadata = tables[0].schema.metadata
    table = pa.concat_tables(tables).replace_schema_metadata(metadata)
    subjects, labels = table.column("subject_id").to_pylist(), table.column("label").to_numpy()
    rates = {s: float(np.mean([lab for sub, lab in zip(subjects, labels) if sub == s])) for s in set(subjects)}
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
    summary = {v: {k: [f[v][k] for f in per_fold] for k in REPORTED} for v in variants}
    report = {"folds": folds, "records": table.num_rows, "good": int(labels.sum()), "subjects": len(rates),
              "summary": {v: {k: {"mean": float(np.nanmean(x)), "std": float(np.nanstd(x))} for k, x in m.items()}
                          for v, m in summary.items()},
              "per_fold": per_fold}
    storage.write_text(storage.join(output_dir, "cv_report.json"), json.dumps(report, indent=1))
    print(format_report(summary))
    return report


def format_report(summary: dict[str, dict[str, list[float]]]) -> str:
    """Variant -> metric -> values (one per fold) as a table of mean ± std."""
    lines = [f"{'variant':14s} " + " ".join(f"{k:>18s}" for k in REPORTED)]
    for v, m in summary.items():
        cells = [f"{np.nanmean(m[k]):.3f} ± {np.nanstd(m[k]):.3f}" if len(m[k]) > 1 else f"{m[k][0]:.3f}"
                 for k in REPORTED]
        lines.append(f"{v:14s} " + " ".join(f"{c:>18s}" for c in cells))
    return "\n".join(lines)
