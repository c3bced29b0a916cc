"""Is the foundation model any good? Probes on frozen embeddings over labelled tasks, subject-wise
folds, and bootstrap confidence intervals, against honest baselines.

:func:`benchmark`, per task folder (written by ``biofm prepare-task``):

1. Rows: every encoder given; the same architecture with random weights (``random weights``);
   hand-crafted PPG features, or ECG's where a task has no PPG (:func:`biofm.signals.handcrafted_features`); the trivial answer
   (the training folds' class shares, or their mean target).
2. Embeddings through ``biofm embed``'s path (:func:`biofm.infer.embed`: Ray Data, an actor pool).
3. Subjects dealt into ``folds`` stratified folds (:func:`biofm.splits.kfold_groups`), or the
   task's own split (train + val against test). Every row uses the same folds.
4. Per row and fold, a Ray task fits the probe on the training folds only: logistic regression
   (classes balanced) or ridge regression on standardised features, its regularisation chosen by
   a subject-wise inner CV inside the training folds (log loss, or squared error). Every task's
   probes are submitted before the first is awaited: they run while the next task embeds.
5. The out-of-fold predictions are pooled, and 95% confidence intervals come from resampling
   subjects with replacement (``resamples`` times, seeded; the same draws for every row, so the
   difference of two rows gets its own paired interval).

Metrics: binary AUROC, AUPRC, F1 of the positive class and balanced accuracy (at p = 0.5);
multiclass macro-F1, balanced accuracy and micro-averaged AUROC; regression MAE, RMSE and
Pearson r. Output::

    <output>/benchmark.json        every figure, its CI, the folds and the probes' settings
    <output>/benchmark.md          tasks x rows, headline metric with its CI, and the paired differences
    <output>/forest_<metric>.png   one forest plot per headline metric
    <output>/predictions/<task>.parquet   out-of-fold predictions of every row
    <output>/embeddings/<task>/<row>/     the embeddings (biofm embed's layout)
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biofm import storage
from biofm.errors import ConfigError
from biofm.tasks import MIN_SUBJECTS_PER_CLASS, TASKS, Task, check_labels, read_task
from biofm.train.metrics import METRICS, metrics

HEADLINE = {"binary": "auroc", "multiclass": "macro_f1", "regression": "mae"}
# Published figures on the same data and protocol, shown beside the rows, never re-run here
REFERENCES = {
    "troika-hr": [
        {"row": "TROIKA (Zhang, Pi and Liu, IEEE TBME 62(2), 2015)", "measure": "mae_mean_of_recordings", "value": 2.34},
        {"row": "JOSS (Zhang, IEEE TBME 62(8), 2015)", "measure": "mae_mean_of_recordings", "value": 1.28}],
}
RANDOM, HANDCRAFTED, TRIVIAL, FINETUNED = "random weights", "hand-crafted", "trivial", "fine-tuned"
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)           # logistic regression: inverse regularisation
ALPHA_GRID = (1e-1, 1.0, 10.0, 100.0, 1000.0)    # ridge: regularisation


def subject_draws(subjects: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap weights ``[resamples, N]`` for windows of ``subjects [N]``: each draw takes the
    subjects with replacement, and a window counts as often as its subject was drawn."""
    ids, inverse = np.unique(subjects, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(ids), (resamples, len(ids)))
    counts = np.stack([np.bincount(d, minlength=len(ids)) for d in draws])   # [R, S]
    return counts[:, inverse].astype(np.float32)


def bootstrap(kind: str, y: np.ndarray, pred: np.ndarray, draws: np.ndarray, chunk: int = 100) -> dict[str, np.ndarray]:
    """Each metric on each draw of :func:`subject_draws`: metric -> ``[resamples]`` (NaN where undefined)."""
    parts = [metrics(kind, y, pred, draws[i:i + chunk]) for i in range(0, len(draws), chunk)]
    return {m: np.concatenate([p[m] for p in parts]) for m in METRICS[kind]}


def interval(values: np.ndarray) -> dict:
    """The 95% percentile interval of bootstrap ``values`` (NaN draws left out, and counted)."""
    ok = values[np.isfinite(values)]
    lo, hi = (np.percentile(ok, [2.5, 97.5]).tolist() if len(ok) else [float("nan")] * 2)
    return {"ci95": [lo, hi], "resamples_used": int(len(ok))}


def protocol(task: Task, data: dict, pred: np.ndarray, tested: np.ndarray, draws: np.ndarray) -> dict | None:
    """A task's published measure, beside the benchmark's own, with its 95% CI over the same
    subject draws (a recording, or a record, is a subject in both tasks that have one):

    - ``troika-hr``: the mean over recordings of each recording's MAE (bpm), as TROIKA and JOSS report it;
    - ``cinc2017-rhythm``: the challenge's score, the mean F1 of N, A and O over records, each
      record's class the most probable of its windows' mean probabilities.
    """
    if task.name not in ("troika-hr", "cinc2017-rhythm"):
        return None
    records, first, inverse = np.unique(data["case_id"][tested], return_index=True, return_inverse=True)
    per_record = draws[:, first]   # [R, records]: a record counts as often as its subject was drawn
    y = data["y"][tested]
    if task.name == "troika-hr":
        err = np.bincount(inverse, np.abs(pred[tested] - y)) / np.bincount(inverse)
        point, boot = float(err.mean()), (per_record @ err) / per_record.sum(axis=1)
        return {"measure": "mae_mean_of_recordings", "unit": task.unit, "value": point, **interval(boot),
                "per_recording": dict(zip(records.tolist(), err.round(3).tolist()))}
    mean_p = np.stack([pred[tested][inverse == r].mean(axis=0) for r in range(len(records))])
    truth = np.array([y[inverse == r][0] for r in range(len(records))])
    hard = mean_p.argmax(axis=1)
    from biofm.sources import cinc2017

    scored = [cinc2017.CLASSES.index(c) for c in cinc2017.SCORED]

    def score(w: np.ndarray) -> np.ndarray:   # [R, records] -> [R]
        f1 = []
        for k in scored:
            tp = w @ ((hard == k) & (truth == k))
            f1.append(np.divide(2 * tp, w @ (hard == k) + w @ (truth == k), out=np.zeros(len(w)),
                                where=(w @ (hard == k) + w @ (truth == k)) > 0))
        return np.mean(f1, axis=0)
    return {"measure": "challenge_f1_NAO", "value": float(score(np.ones((1, len(records))))[0]),
            **interval(score(per_record)), "records": int(len(records))}


def undefined(task: Task, y: np.ndarray, fold: np.ndarray, subjects: np.ndarray) -> str:
    """Why a classification task's figures are undefined on these folds, or ``""``: a class absent
    from the tested windows, or from the training folds of a fold (its probes never saw it, so every
    figure that counts that class is meaningless there)."""
    if task.kind == "regression":
        return ""
    tested = fold >= 0
    missing = [task.classes[k] for k in range(len(task.classes)) if not (y[tested] == k).any()]
    if missing:
        return f"no tested window of {', '.join(missing)}"
    for f in sorted(set(fold[tested].tolist())):
        train = (fold != f) if not (fold == -1).any() else (fold == -1)
        absent = [k for k in range(len(task.classes)) if (y == k).any() and not (y[train] == k).any()]
        if absent:
            who = sorted(set(subjects[y == absent[0]].tolist()))
            return (f"fold {f + 1}: no {', '.join(task.classes[k] for k in absent)} window in its training folds "
                    f"(only {len(who)} subject(s) have {task.classes[absent[0]]}: {', '.join(who[:5])}); "
                    f"the protocol needs at least 2 subjects per class ({MIN_SUBJECTS_PER_CLASS} for every fold "
                    "to test one)")
    return ""


def _probe_fold(kind: str, x: np.ndarray, y: np.ndarray, subjects: np.ndarray, train: np.ndarray, test: np.ndarray,
                classes: int, seed: int) -> tuple[np.ndarray, float]:
    """Fit the probe on ``train`` (indices) and predict ``test``; returns the predictions and the
    regularisation the inner CV chose. The inner CV splits ``train``'s subjects only: the test
    fold never reaches the choice (``subjects[train]`` only are dealt into inner folds)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from biofm.splits import kfold_groups

    def path(rows, values):
        """Fit on ``rows`` for each of ``values`` in turn, each fit starting from the last (the
        regularisation path, as glmnet walks it: about 6x faster for logistic regression here)."""
        head = Ridge() if kind == "regression" else LogisticRegression(class_weight="balanced", max_iter=2000,
                                                                       tol=1e-3, warm_start=True)
        m = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(), head)
        for value in values:
            m.set_params(**{m.steps[-1][0] + ("__alpha" if kind == "regression" else "__C"): value})
            yield m.fit(x[rows], y[rows])

    def predict(m, rows):
        if kind == "regression":
            return m.predict(x[rows])
        p = np.zeros((len(rows), classes))
        p[:, m.classes_] = m.predict_proba(x[rows])  # a class absent from the training folds gets 0
        return p[:, 1] if kind == "binary" else p

    def loss(truth, p):
        if kind == "regression":
            return float(np.mean((truth - p) ** 2))
        p = np.column_stack([1 - p, p]) if kind == "binary" else p
        return float(-np.mean(np.log(np.clip(p[np.arange(len(truth)), truth], 1e-12, 1))))

    if kind != "regression" and len(np.unique(y[train])) < 2:  # one class to learn from: its share is the answer
        return _trivial(kind, y[train], len(test), classes), float("nan")
    grid = ALPHA_GRID[::-1] if kind == "regression" else C_GRID  # from the most regularised
    inner_subjects = np.unique(subjects[train])
    k = min(3, len(inner_subjects))
    scores = np.zeros(len(grid))
    if k >= 2:
        key = y[train] if kind == "regression" else y[train] == classes - 1  # as the outer folds: tasks._split_key
        rates = {s: float(np.mean(key[subjects[train] == s])) for s in inner_subjects}
        for fold in kfold_groups(rates, k, seed):
            held = np.isin(subjects[train], fold)
            fit, val = train[~held], train[held]
            if kind != "regression" and len(np.unique(y[fit])) < 2:
                continue
            for g, m in enumerate(path(fit, grid)):
                scores[g] += loss(y[val], predict(m, val))
    best = int(np.argmin(scores)) if scores.any() else len(grid) // 2
    *_, m = path(train, grid[:best + 1])
    return predict(m, test), float(grid[best])


def _trivial(kind: str, y_train: np.ndarray, n: int, classes: int) -> np.ndarray:
    """The answer that ignores the window: the training folds' class shares, or their mean."""
    if kind == "regression":
        return np.full(n, float(np.mean(y_train)))
    shares = np.bincount(y_train, minlength=classes) / len(y_train)
    return np.full(n, shares[1]) if kind == "binary" else np.tile(shares, (n, 1))


def _trivial_fold(kind, x, y, subjects, train, test, classes, seed):
    return _trivial(kind, y[train], len(test), classes), float("nan")


def _read(task_dir: str) -> tuple[Task, dict, list[str]]:
    """A task folder: its task, its windows' ids, values, subjects, fixed split and PPG signal ``[N, T]``
    (in (case_id, window_idx) order), and its split folders."""
    from biofm.splits import SPLITS

    dirs = [storage.join(task_dir, s) for s in SPLITS if storage.list_files(storage.join(task_dir, s), ".parquet")]
    if not dirs:
        raise ConfigError(f"{task_dir} holds no train/val/test windows: write the task with `biofm prepare-task`")
    task = read_task(dirs[0])
    parts = []
    for d in dirs:
        t = storage.read_table(list(storage.list_files(d, ".parquet")),
                               columns=["case_id", "window_idx", "subject_id", task.column, "signal", "present"])
        parts.append((storage.name(d), t))
    from biofm.dataset import read_data_spec

    spec = read_data_spec(dirs[0])
    beat = next((c for c in ("PPG", "ECG") if c in spec["channels"]), spec["channels"][0])
    table = pa.concat_tables([t.append_column("split", pa.array([s] * t.num_rows)) for s, t in parts])
    case = table.column("case_id").to_numpy(zero_copy_only=False).astype(str)
    table = table.take(np.lexsort((table.column("window_idx").to_numpy(), case)))
    values = table.column(task.column).to_numpy(zero_copy_only=False)
    keep = (np.isfinite(values.astype(np.float64)) if task.kind == "regression"
            else (values >= 0) & (values < len(task.classes)))
    table = table.filter(pa.array(keep))
    data = {"case_id": table.column("case_id").to_numpy(zero_copy_only=False).astype(str),
            "window_idx": table.column("window_idx").to_numpy(),
            "subject_id": table.column("subject_id").to_numpy(zero_copy_only=False).astype(str),
            "split": table.column("split").to_numpy(zero_copy_only=False).astype(str),
            "y": table.column(task.column).to_numpy().astype(np.float64 if task.kind == "regression" else np.int64),
            "beat_channel": beat,   # the hand-crafted features' channel: PPG, else ECG
            "beat_signal": table.column("signal").combine_chunks().to_numpy_ndarray()[:, spec["channels"].index(beat)],
            "spec": spec, "dropped": int((~keep).sum()),
            "table": table.drop_columns(["split"]).replace_schema_metadata(parts[0][1].schema.metadata)}
    check_labels(task, data["y"], data["subject_id"], task_dir)
    return task, data, dirs


def _folds(task: Task, data: dict, k: int, seed: int, fixed: bool) -> np.ndarray:
    """Each window's test fold ``[N]``: subjects dealt into ``k`` stratified folds, or the task's
    own split (test = fold 0, the rest never tested)."""
    from biofm.splits import kfold_groups
    from biofm.tasks import _split_key

    if fixed:
        if not (data["split"] == "test").any():
            raise ConfigError("--fixed-split: the task has no test split")
        return np.where(data["split"] == "test", 0, -1)
    subjects = np.unique(data["subject_id"])
    k = min(k, len(subjects))
    rates = {s: _split_key(task, data["y"][data["subject_id"] == s]) for s in subjects}
    fold_of = {s: i for i, members in enumerate(kfold_groups(rates, k, seed)) for s in members}
    return np.array([fold_of[s] for s in data["subject_id"]])


def _encoder_row(text: str, taken: set) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` -> ``(row name, checkpoint path)``; an unnamed checkpoint is named
    after its folder (``.../foundation_model/best_model.pt`` -> ``foundation_model``), numbered
    if that is taken; a name given twice is refused."""
    name, sep, path = text.partition("=")
    if sep and not re.search(r"[/\\]", name):
        if name in taken:
            raise ConfigError(f"--encoder: the name {name!r} is given twice")
        return name, path
    p = Path(text)
    name = base = (p.parent.name if p.name in ("best_model.pt", "model.pt") else p.stem) or "encoder"
    i = 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name, text


def random_encoder(description: dict, path: str, seed: int = 0) -> str:
    """A pretraining checkpoint of the architecture ``description`` gives, with random weights (seeded)."""
    import torch
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    from biofm.model.ssl import MaskedSignalModel
    from biofm.train import checkpoint

    torch.manual_seed(seed)
    model = MaskedSignalModel(TinyTimeMixerConfig.from_dict(description["ttm_config"]))
    desc = {"kind": "masked_signal_model", "ttm_config": description["ttm_config"], "channels": description["channels"],
            "data_spec": description["data_spec"], "init": f"random weights, seed {seed} (benchmark control)"}
    return checkpoint.save(path, model.state_dict(), desc)


def _embeddings(folder: str, data: dict) -> np.ndarray:
    """Embeddings written by :func:`biofm.infer.embed`, in ``data``'s window order ``[N, D]``."""
    t = storage.read_table(list(storage.list_files(storage.join(folder, "embeddings"), ".parquet")),
                           columns=["case_id", "window_idx", "embedding"])
    where = {(c, int(i)): r for r, (c, i) in enumerate(zip(t.column("case_id").to_pylist(), t.column("window_idx").to_pylist()))}
    emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    return emb[[where[(c, int(i))] for c, i in zip(data["case_id"], data["window_idx"])]]


def benchmark(encoders: list[str], task_dirs: list[str], output: str, folds: int = 5, resamples: int = 1000,
              seed: int = 0, fixed_split: bool = False, batch_size: int = 256, finetune=None,
              address: str | None = None) -> dict:
    """Benchmark ``encoders`` (checkpoint paths, or ``NAME=PATH``) on ``task_dirs``; writes
    ``output`` (module docstring) and returns the report. ``finetune``: a
    :class:`~biofm.config.FinetuneConfig`, to add the first encoder fine-tuned with it (its
    channels: the task's) as the ``fine-tuned`` row, on the same folds."""
    import ray

    from biofm.infer import embed, encoder_description
    from biofm.dataset import check_data_spec
    from biofm.ray_connect import ensure_ray
    from biofm.signals import handcrafted_features

    t0 = time.perf_counter()
    output = storage.normalize(output)
    if storage.is_file(storage.join(output, "benchmark.json")):
        raise ConfigError(f"{output} already holds a benchmark: choose another --output, or delete it")
    names: dict[str, str] = {}
    for e in encoders:
        name, path = _encoder_row(e, set(names))
        names[name] = path
    if {RANDOM, HANDCRAFTED, TRIVIAL, FINETUNED} & set(names):
        raise ConfigError(f"an encoder may not be named {RANDOM!r}, {HANDCRAFTED!r}, {TRIVIAL!r} or {FINETUNED!r}: "
                          "those are the benchmark's own rows")
    descriptions = {n: encoder_description(p) for n, p in names.items()}
    first_name = next(iter(names))
    if finetune is not None and descriptions[first_name]["kind"] != "masked_signal_model":
        raise ConfigError(f"--finetune fine-tunes the first encoder, {first_name}: it must be a pretraining checkpoint")
    tasks = {}
    for d in task_dirs:
        task, data, dirs = _read(storage.normalize(d))
        if task.name in tasks:
            raise ConfigError(f"task {task.name} is given twice ({tasks[task.name][2][0]} and {dirs[0]})")
        for n, desc in descriptions.items():
            check_data_spec(desc["data_spec"], data["spec"], where=f"task {task.name} ({d}) vs the encoder {n}")
        tasks[task.name] = (task, data, dirs)
    first = descriptions[first_name]
    models = [*names, *([FINETUNED] if finetune is not None else [])]
    rows = [*models, RANDOM, HANDCRAFTED, TRIVIAL]
    checkpoints = {**names, RANDOM: random_encoder(first, storage.join(output, "encoders", "random_weights.pt"), seed)}
    ensure_ray(address)
    probe, trivial = ray.remote(num_cpus=1)(_probe_fold), ray.remote(num_cpus=1)(_trivial_fold)
    handcrafted = ray.remote(num_cpus=1)(handcrafted_features)
    report = {"encoders": names, "folds": folds, "fixed_split": fixed_split, "resamples": resamples, "seed": seed,
              "probe": {"binary/multiclass": f"logistic regression (balanced classes), C in {list(C_GRID)}",
                        "regression": f"ridge, alpha in {list(ALPHA_GRID)}",
                        "chosen_by": "subject-wise 3-fold inner CV on the training folds (log loss / squared error)"},
              "tasks": {}}
    submitted = {}  # every task's probes are Ray tasks, submitted before the first is awaited
    for name, (task, data, dirs) in tasks.items():
        fold = _folds(task, data, folds, seed, fixed_split)
        hand = handcrafted.remote(data["beat_signal"], data["spec"]["sample_rate_hz"],
                                  tuple(data["spec"]["filters"][data["beat_channel"]]["band_hz"]),
                                  "ecg" if data["beat_channel"] == "ECG" else "ppg")
        features = {}
        for row in [*names, RANDOM]:
            folder = storage.join(output, "embeddings", name, _slug(row))
            embed(checkpoints[row], dirs, folder, batch_size=batch_size, address=address)
            features[row] = _embeddings(folder, data)
        features[HANDCRAFTED] = hand
        features[TRIVIAL] = np.zeros((len(data["y"]), 1))
        pending = {}
        for row in [r for r in rows if r != FINETUNED]:
            x = features[row] if row == HANDCRAFTED else ray.put(features[row].astype(np.float64))
            for f in sorted(set(fold[fold >= 0].tolist())):
                train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)  # fixed split: fold -1 trains
                fn = trivial if row == TRIVIAL else probe
                pending[row, f] = (test, fn.remote(task.kind, x, data["y"], data["subject_id"], train, test,
                                                   len(task.classes), seed + f))
        submitted[name] = fold, pending
    for name, (task, data, dirs) in tasks.items():
        kind, n_classes = task.kind, len(task.classes)
        fold, pending = submitted[name]
        tested = np.flatnonzero(fold >= 0)
        predictions, chosen = {}, {FINETUNED: {}}
        if finetune is not None:
            predictions[FINETUNED] = _finetuned(finetune, names[first_name], task, data, fold, dirs[0].rsplit("/", 1)[0],
                                                storage.join(output, "finetune", name), address)
        for row in [r for r in rows if r != FINETUNED]:
            shape = (len(data["y"]),) if kind != "multiclass" else (len(data["y"]), n_classes)
            pred = np.full(shape, np.nan)
            chosen[row] = {}
            for (r, f), (test, ref) in pending.items():
                if r == row:
                    pred[test], chosen[row][f] = ray.get(ref)
            predictions[row] = pred
        y, subjects = data["y"][tested], data["subject_id"][tested]
        draws = subject_draws(subjects, resamples, seed)
        why = undefined(task, data["y"], fold, data["subject_id"])
        boot = {row: bootstrap(kind, y, predictions[row][tested], draws) for row in rows}
        table = {}
        for row in rows:
            point = metrics(kind, y, predictions[row][tested])
            table[row] = {m: ({"value": None, "ci95": [None, None], "undefined": why} if why else
                              {"value": point[m], **interval(boot[row][m])}) for m in METRICS[kind]}
            table[row]["regularisation"] = {str(f): v for f, v in chosen[row].items()}
            measure = None if why else protocol(task, data, predictions[row], tested, draws)
            if measure:
                table[row]["protocol"] = measure
        head = HEADLINE[kind]
        differences = {}
        for i, a in enumerate(models):
            for b in models[i + 1:] + [RANDOM, HANDCRAFTED]:
                diff = boot[a][head] - boot[b][head]
                differences[f"{a} - {b}"] = ({"metric": head, "value": None, "ci95": [None, None], "undefined": why} if why
                                             else {"metric": head, "value": table[a][head]["value"] - table[b][head]["value"],
                                                   **interval(diff)})
        report["tasks"][name] = {
            "kind": kind, "classes": list(task.classes), "target": task.target, "unit": task.unit,
            "undefined": why, "references": REFERENCES.get(name, []), "folder": dirs[0].rsplit("/", 1)[0],
            "handcrafted_channel": data["beat_channel"],
            "windows": int(len(y)), "subjects": int(len(np.unique(subjects))), "windows_dropped": data["dropped"],
            "folds": int(len(set(fold[fold >= 0].tolist()))), "headline": head, "rows": table, "differences": differences,
            "fold_subjects": {str(f): sorted(set(data["subject_id"][fold == f].tolist())) for f in sorted(set(fold.tolist()))}}
        _write_predictions(storage.join(output, "predictions", f"{name}.parquet"), data, fold, predictions, task)
        print(f"[benchmark] {name}: {len(y)} windows, {report['tasks'][name]['subjects']} subjects, "
              f"{report['tasks'][name]['folds']} folds; {head} " + (f"undefined: {why}" if why else ", ".join(
                  f"{r} {_cell(table[r][head])}" for r in rows)) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    storage.write_text(storage.join(output, "benchmark.json"), json.dumps(report, indent=1))
    storage.write_text(storage.join(output, "benchmark.md"), markdown(report))
    for metric in sorted({t["headline"] for t in report["tasks"].values()}):
        forest_plot(report, metric, storage.join(output, f"forest_{metric}.png"))
    print(f"[benchmark] {len(tasks)} tasks x {len(rows)} rows in {report['seconds']:.0f} s -> "
          f"{storage.join(output, 'benchmark.md')}", flush=True)
    return report


def _finetuned(cfg, pretrained: str, task: Task, data: dict, fold: np.ndarray, task_dir: str, folder: str,
               address: str | None) -> np.ndarray:
    """The staged fine-tuning recipe as a row: per test fold, fine-tuned on the other folds (the
    next fold picks the epoch), predicting the test fold; with the task's own split (fold -1
    trains), one run on the task's folders. Returns the predictions ``[N]`` (or ``[N, K]``)."""
    import pyarrow.compute as pc

    from biofm.train.finetune import by_name, finetune, load_classifier, predict_outputs

    cfg = dataclasses.replace(cfg, channels=tuple(data["spec"]["channels"]))
    folds = sorted(set(fold[fold >= 0].tolist()))
    pred = np.full((len(fold), len(task.classes)) if task.kind == "multiclass" else len(fold), np.nan)
    for f in folds:
        run = storage.join(folder, f"fold_{f}")
        if -1 in fold:  # the task's own split
            data_dir = task_dir
        else:
            val_fold = folds[(folds.index(f) + 1) % len(folds)]
            data_dir = storage.join(run, "data")
            for split, mask in (("train", (fold != f) & (fold != val_fold)), ("val", fold == val_fold), ("test", fold == f)):
                part = data["table"].filter(pa.array(mask))
                storage.write(storage.join(data_dir, split, "windows.parquet"), lambda out: pq.write_table(part, out))
        print(f"[benchmark] {task.name}: fine-tuning for fold {f + 1}/{len(folds)}", flush=True)
        finetune(cfg, pretrained, data_dir, run, address=address)
        model, description = load_classifier(storage.join(run, "best_model.pt"))
        test = data["table"].filter(pa.array(fold == f))
        signal = test.column("signal").combine_chunks().to_numpy_ndarray().astype(np.float32)
        present = np.array(pc.list_flatten(test.column("present")).to_numpy(zero_copy_only=False), bool).reshape(len(signal), -1)
        signal, present = by_name(signal, present, data["spec"]["channels"], description["channels"])
        out = predict_outputs(model, signal, present, description)
        pred[fold == f] = out[:, 1] if task.kind == "binary" else out
    return pred


def _slug(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", row)


def _write_predictions(path: str, data: dict, fold: np.ndarray, predictions: dict, task: Task) -> None:
    columns = {"case_id": data["case_id"], "window_idx": data["window_idx"], "subject_id": data["subject_id"],
               "fold": fold, task.column: data["y"]}
    for row, pred in predictions.items():
        columns[row] = list(pred) if pred.ndim == 2 else pred
    storage.write(path, lambda f: pq.write_table(pa.table(columns), f))


def _cell(m: dict, sign: str = "") -> str:
    if m.get("undefined"):
        return "undefined"
    return f"{m['value']:{sign}.3f} [{m['ci95'][0]:{sign}.3f}, {m['ci95'][1]:{sign}.3f}]"


def markdown(report: dict) -> str:
    """``benchmark.md``: per task, every row's metrics with their 95% CIs (or why they are
    undefined), the task's published measure with the published figures beside it, then the paired
    differences."""
    lines = [f"# Benchmark: {len(report['tasks'])} tasks", "",
             f"Probes on frozen embeddings; {'the tasks own split' if report['fixed_split'] else 'subject-wise folds'}; "
             f"95% CIs from {report['resamples']} subject resamples (seed {report['seed']}).", ""]
    for name, t in report["tasks"].items():
        ms = METRICS[t["kind"]]
        unit = f", {t['unit']}" if t.get("unit") else ""
        lines += [f"## {name} ({t['kind']}; {t['windows']} windows, {t['subjects']} subjects, {t['folds']} folds)", "",
                  "| row | " + " | ".join(f"{m}{unit if m in ('mae', 'rmse') else ''}" for m in ms) + " |",
                  "|---|" + "---|" * len(ms)]
        lines += [f"| {row} | " + " | ".join(_cell(v[m]) for m in ms) + " |" for row, v in t["rows"].items()]
        if t.get("handcrafted_channel", "PPG") != "PPG":
            lines += ["", f"The hand-crafted row's features are the {t['handcrafted_channel']}'s (the task has no PPG)."]
        if t.get("undefined"):
            lines += ["", f"Every figure is undefined: {t['undefined']}."]
        measured = {row: v["protocol"] for row, v in t["rows"].items() if v.get("protocol")}
        if measured:
            first = next(iter(measured.values()))
            lines += ["", f"The published measure, {first['measure']}{unit} (95% CI):", "",
                      "| row | " + first["measure"] + " |", "|---|---|"]
            lines += [f"| {row} | {_cell(m)} |" for row, m in measured.items()]
            lines += [f"| {ref['row']} | {ref['value']:.2f} (published, not re-run) |" for ref in t.get("references", [])]
        elif name in TASKS:
            lines += ["", "No published figure on this data and protocol is verified here: none is shown."]
        lines += ["", f"Paired differences in {t['headline']} (95% CI; an interval that excludes 0 is a difference):", ""]
        lines += [f"- {pair}: {_cell(d, '+')}" for pair, d in t["differences"].items()]
        lines.append("")
    return "\n".join(lines)


def forest_plot(report: dict, metric: str, path: str) -> None:
    """Every task with headline ``metric``: each row's value and 95% CI as a point and a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [(task, row, v[metric]) for task, t in report["tasks"].items() if t["headline"] == metric
               for row, v in t["rows"].items()]
    rows = list(dict.fromkeys(row for _, row, _ in entries))
    colours = {row: plt.get_cmap("tab10")(k % 10) for k, row in enumerate(rows)}  # one colour per row, every task
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(entries) + 1.2))
    for i, (task, row, m) in enumerate(entries):
        if m.get("undefined"):
            ax.text(0.01, -i, "undefined (see benchmark.md)", transform=ax.get_yaxis_transform(), va="center",
                    fontsize=8, color="grey")
            continue
        ax.errorbar(m["value"], -i, xerr=[[m["value"] - m["ci95"][0]], [m["ci95"][1] - m["value"]]], fmt="o",
                    capsize=3, color=colours[row])
    reference = {"auroc": 0.5, "micro_auroc": 0.5}.get(metric)
    if reference is not None:
        ax.axvline(reference, color="grey", ls="--", lw=0.8, label=f"chance ({reference:g})")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks([-i for i in range(len(entries))], [f"{task}: {row}" for task, row, _ in entries])
    ax.set_xlabel(f"{metric} (95% CI over subject resamples)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    storage.write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
