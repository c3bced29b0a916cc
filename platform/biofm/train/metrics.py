"""Metrics of predictions: every task kind's (:func:`metrics`, weighted for subject bootstraps), and
a binary classifier's at a threshold (labels ``y [N]``, 1 = the positive class; predicted
probabilities of it ``p [N]``), named after the task's classes (:func:`slug`)."""

from __future__ import annotations

import re

import numpy as np
from sklearn import metrics as skm


METRICS = {"binary": ("auroc", "auprc", "f1", "balanced_accuracy"),
           "multiclass": ("macro_f1", "balanced_accuracy", "micro_auroc"),
           "regression": ("mae", "rmse", "pearson_r")}


def metrics(kind: str, y: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """:data:`METRICS` of ``kind`` for targets ``y [N]`` and predictions ``pred``: P(positive) ``[N]``
    (binary), class probabilities ``[N, K]`` (multiclass) or values ``[N]`` (regression).

    ``weights [R, N]``: R weightings of the windows at once (a bootstrap draw counts each window
    as often as its subject was drawn), each metric ``[R]``; None: each metric a float, as
    scikit-learn computes it. A metric that is undefined (one class only, no spread) is NaN.
    Hard answers: p >= 0.5 (binary), the most probable class (multiclass)."""
    single = weights is None
    w = np.ones((1, len(y))) if single else np.asarray(weights, dtype=np.float64)
    if kind == "regression":
        out = _regression(y.astype(np.float64), pred.astype(np.float64), w)
    elif kind == "binary":
        y = y.astype(np.int64)
        c = _confusion(y, (pred >= 0.5).astype(np.int64), 2, w)
        tp, fp, fn = c[:, 1, 1], c[:, 0, 1], c[:, 1, 0]
        out = {"auroc": _auroc(y, pred, w), "auprc": _average_precision(y, pred, w),
               "f1": _ratio(2 * tp, 2 * tp + fp + fn, zero=0.0), "balanced_accuracy": _balanced_accuracy(c)}
    else:
        y, k = y.astype(np.int64), pred.shape[1]
        c = _confusion(y, pred.argmax(axis=1), k, w)
        tp = np.diagonal(c, axis1=1, axis2=2)
        f1 = _ratio(2 * tp, c.sum(axis=1) + c.sum(axis=2), zero=0.0)       # per class [R, K]
        onehot = np.eye(k, dtype=np.int64)[y].ravel()
        out = {"macro_f1": f1.mean(axis=1), "balanced_accuracy": _balanced_accuracy(c),
               "micro_auroc": _auroc(onehot, pred.ravel(), np.repeat(w, k, axis=1))}
    return {m: float(v[0]) for m, v in out.items()} if single else out


def _ratio(num: np.ndarray, den: np.ndarray, zero: float = float("nan")) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), zero)


def _confusion(y: np.ndarray, hard: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """Weighted confusion matrices ``[R, K, K]`` (rows: truth, columns: answer)."""
    cells = np.zeros((len(y), k * k))
    cells[np.arange(len(y)), y * k + hard] = 1.0
    return (w @ cells).reshape(-1, k, k)


def _balanced_accuracy(c: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present ``[R]``; NaN with fewer than two present."""
    support = c.sum(axis=2)
    recall = _ratio(np.diagonal(c, axis1=1, axis2=2), support)
    present = support > 0
    with np.errstate(invalid="ignore"):
        return np.where(present.sum(axis=1) >= 2, np.nansum(recall, axis=1) / present.sum(axis=1), np.nan)


def _score_groups(y: np.ndarray, score: np.ndarray, w: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weights of positives and negatives per distinct score ``[R, G]``, scores sorted."""
    order = np.argsort(-score if descending else score, kind="stable")
    s, yy, ww = score[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return np.add.reduceat(ww * yy, starts, axis=1), np.add.reduceat(ww * (1 - yy), starts, axis=1)


def _auroc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted AUROC ``[R]``: the chance a positive outscores a negative, ties counting half."""
    pos, neg = _score_groups(y, score, w, descending=False)
    below = np.cumsum(neg, axis=1) - neg
    return _ratio((pos * (below + 0.5 * neg)).sum(axis=1), pos.sum(axis=1) * neg.sum(axis=1))


def _average_precision(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted average precision ``[R]`` (scikit-learn's: precision at each threshold, weighted by
    the recall it adds); NaN without positives or negatives."""
    pos, neg = _score_groups(y, score, w, descending=True)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    total = tp[:, -1]
    ap = _ratio((pos * _ratio(tp, tp + fp, zero=0.0)).sum(axis=1), total)
    return np.where((total > 0) & (fp[:, -1] > 0), ap, np.nan)


def _regression(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    n = w.sum(axis=1)
    err = pred - y
    mean_y, mean_p = w @ y / n, w @ pred / n
    cov = (w * (y - mean_y[:, None]) * (pred - mean_p[:, None])).sum(axis=1)
    var_y, var_p = (w * (y - mean_y[:, None]) ** 2).sum(axis=1), (w * (pred - mean_p[:, None]) ** 2).sum(axis=1)
    return {"mae": w @ np.abs(err) / n, "rmse": np.sqrt(w @ err ** 2 / n),
            "pearson_r": _ratio(cov, np.sqrt(var_y * var_p))}


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability cut that maximises Youden's J (sensitivity + specificity - 1) on ``y``;
    0.5 when ``y`` holds one class only."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thresholds[best]))


def slug(name: str) -> str:
    """A class or target name as part of a metric key or a column: ``"other rhythm"`` -> ``other_rhythm``."""
    return re.sub(r"\W+", "_", name).strip("_").lower() or "positive"


def classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5, positive: str = "good") -> dict:
    """accuracy, balanced accuracy, AUROC, AUPRC, F1 of the ``positive`` class (``f1_<slug>``),
    confusion matrix ``[[tn, fp], [fn, tp]]``, at ``threshold``. AUROC/AUPRC are NaN with one class only."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    two = len(np.unique(y)) == 2
    return {
        "n": int(len(y)), "positives": int(y.sum()), "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)) if two else float("nan"),
        "auroc": float(skm.roc_auc_score(y, p)) if two else float("nan"),
        "auprc": float(skm.average_precision_score(y, p)) if two else float("nan"),
        f"f1_{slug(positive)}": float(skm.f1_score(y, pred, zero_division=0)),
        "confusion": skm.confusion_matrix(y, pred, labels=[0, 1]).tolist(),
    }


MIN_RECORDS = 30  # below this many records (or fewer than 5 of a class) a split's metrics mean little


def classifier_warnings(metrics: dict, split: str, classes=("poor", "good")) -> list[str]:
    """What a reader of ``metrics`` (from :func:`classification_metrics` on ``split``; ``classes``:
    negative, positive) should be warned about: too few windows to mean much, or no better than
    the baselines (chance AUROC, always predicting one class: balanced accuracy 0.5)."""
    out = []
    n, pos = metrics["n"], metrics["positives"]
    if n < MIN_RECORDS or min(pos, n - pos) < 5:
        out.append(f"the {split} split has {n} windows ({pos} {classes[1]}, {n - pos} {classes[0]}): too few for "
                   f"its metrics to mean much (want >= {MIN_RECORDS}, >= 5 of each class)")
    if not metrics["auroc"] > 0.5:
        out.append(f"{split} AUROC {metrics['auroc']:.3f} does not beat chance (0.5)")
    if not metrics["balanced_accuracy"] > 0.5:
        out.append(f"{split} balanced accuracy {metrics['balanced_accuracy']:.3f} does not beat predicting one "
                   "class for every record (0.5)")
    return out
