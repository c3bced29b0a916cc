"""Binary classification metrics for PPG quality (1 = good): from labels ``y [N]`` and
predicted probabilities of "good" ``p [N]``."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability cut that maximises Youden's J (sensitivity + specificity - 1) on ``y``;
    0.5 when ``y`` holds one class only."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thresholds[best]))


def classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict:
    """accuracy, balanced accuracy, AUROC, AUPRC, F1 of "good", confusion matrix
    ``[[tn, fp], [fn, tp]]``, at ``threshold``. AUROC/AUPRC are NaN with one class only."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    two = len(np.unique(y)) == 2
    return {
        "n": int(len(y)), "positives": int(y.sum()), "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)) if two else float("nan"),
        "auroc": float(skm.roc_auc_score(y, p)) if two else float("nan"),
        "auprc": float(skm.average_precision_score(y, p)) if two else float("nan"),
        "f1_good": float(skm.f1_score(y, pred, zero_division=0)),
        "confusion": skm.confusion_matrix(y, pred, labels=[0, 1]).tolist(),
    }


MIN_RECORDS = 30  # below this many records (or fewer than 5 of a class) a split's metrics mean little


def classifier_warnings(metrics: dict, split: str) -> list[str]:
    """What a reader of ``metrics`` (from :func:`classification_metrics` on ``split``) should be
    warned about: too few records to mean much, or no better than the baselines (chance AUROC,
    always predicting one class: balanced accuracy 0.5)."""
    out = []
    n, good = metrics["n"], metrics["positives"]
    if n < MIN_RECORDS or min(good, n - good) < 5:
        out.append(f"the {split} split has {n} records ({good} good, {n - good} poor): too few for its metrics "
                   f"to mean much (want >= {MIN_RECORDS}, >= 5 of each class)")
    if not metrics["auroc"] > 0.5:
        out.append(f"{split} AUROC {metrics['auroc']:.3f} does not beat chance (0.5)")
    if not metrics["balanced_accuracy"] > 0.5:
        out.append(f"{split} balanced accuracy {metrics['balanced_accuracy']:.3f} does not beat predicting one "
                   "class for every record (0.5)")
    return out
