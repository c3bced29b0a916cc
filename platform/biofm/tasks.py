"""Labelled tasks as data: windows, each with a label (a class) or a target (a number), and the
subject to split by.

:func:`prepare_task` reads a built-in task's recordings (:data:`TASKS`) or those a label table
names (:func:`table_task`), prepares every labelled window as a 10 s record with the training
preprocessing (:func:`biofm.windows.record_signal`, the data spec of
:func:`biofm.dataset.data_spec`), checks its quality without dropping it
(:func:`biofm.windows.record_quality`: the label may be the quality itself), splits the subjects
into train/val/test and writes the windows layout::

    <outdir>/<split>/<subject_id>.parquet   case_id (the recording), window_idx, start_s [s], subject_id,
                                            label int16 (an index into the task's classes) | target float32,
                                            signal [C, T] float32 z-scored, present [C] bool,
                                            <ch>_<index> quality columns, quality_reason ("" where all pass)
    <outdir>/manifest.json                  the task, data spec, every recording's outcome, skipped windows

Each file's schema metadata holds the data spec (``biofm``, as build-windows writes it) and the
task (``biofm_task``), so pretraining reads a task's windows as any others (labels unused).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biofm import storage
from biofm.config import ChannelSpec, WindowsConfig
from biofm.errors import CaseSkipped, ConfigError, NothingProduced
from biofm.sources.arrhythmia import RHYTHMS
from biofm.task_readers import READERS
from biofm.windows import record_signal

TASK_KEY = b"biofm_task"
KINDS = ("binary", "multiclass", "regression")


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task's windows are labelled with. ``classes``: label i is ``classes[i]`` (binary:
    0 negative, 1 positive); ``target``: a regression target's meaning, ``unit`` its unit.
    ``source``: the reader of its recordings (:data:`biofm.task_readers.READERS`); ``channels``:
    the default channels (None: the BUT-PPG config's)."""

    name: str
    kind: str
    source: str
    description: str
    classes: tuple[str, ...] = ()
    target: str = ""
    channels: tuple[str, ...] | None = ("PPG",)
    unit: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if (self.kind == "regression") == bool(self.classes) or (self.kind == "binary" and len(self.classes) != 2):
            raise ConfigError(f"task {self.name}: a {self.kind} task needs "
                              + ("no classes" if self.kind == "regression" else "two classes" if self.kind == "binary"
                                 else "its class names") + f", got {list(self.classes)}")

    @property
    def column(self) -> str:
        return "target" if self.kind == "regression" else "label"

    @property
    def positive(self) -> str:
        """A binary task's positive class (label 1)."""
        return self.classes[1] if self.kind == "binary" else ""


TASKS = {t.name: t for t in (
    Task("butppg-quality", "binary", "butppg", "BUT-PPG: the experts' PPG quality rating (quality-hr-ann.csv, Quality)",
         classes=("poor", "good"), channels=None),
    Task("butppg-hr", "regression", "butppg", "BUT-PPG: the annotated heart rate (quality-hr-ann.csv, HR)",
         target="heart rate", unit="bpm", channels=None),
    Task("arrhythmia-af", "binary", "arrhythmia", "PPG arrhythmia set: atrial fibrillation against every other rhythm",
         classes=("other rhythm", "AF")),
    Task("arrhythmia-rhythm", "multiclass", "arrhythmia", "PPG arrhythmia set: the six rhythms, read from the ECG",
         classes=RHYTHMS),
    Task("ppgbp-sbp", "regression", "ppgbp", "PPG-BP: systolic blood pressure from a 2.1 s fingertip PPG segment",
         target="systolic blood pressure", unit="mmHg"),
    Task("ppgbp-dbp", "regression", "ppgbp", "PPG-BP: diastolic blood pressure from a 2.1 s fingertip PPG segment",
         target="diastolic blood pressure", unit="mmHg"),
    Task("ppgbp-hypertension", "binary", "ppgbp", "PPG-BP: hypertension (the table's stage 1 or 2, systolic "
         ">= 140 mmHg, JNC 7) against normal and prehypertension", classes=("no hypertension", "hypertension")),
    Task("troika-hr", "regression", "troika", "IEEE SPC 2015 (TROIKA): heart rate of each 8 s window from wrist PPG "
         "and ACC while running; the ECG, where the reference comes from, is not an input",
         target="heart rate", unit="bpm", channels=("ACC_X", "ACC_Y", "ACC_Z", "PPG")),
    Task("capnobase-rr", "regression", "capnobase", "CapnoBase: respiratory rate (the capnogram's) at the window's "
         "centre, from PPG and ECG", target="respiratory rate", unit="breaths/min", channels=("PPG", "ECG")),
    Task("cinc2017-rhythm", "multiclass", "cinc2017", "PhysioNet/CinC 2017: the record's rhythm from one ECG lead "
         "(the challenge's N, A, O, ~: normal, AF, other rhythm, too noisy)", classes=("normal", "AF", "other", "noisy"),
         channels=("ECG",)),
)}


def builtin_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: the built-in tasks are {', '.join(TASKS)}; for your own labels "
                          "pass --labels TABLE (a CSV or Parquet label table) with a name of your choice")
    return TASKS[name]


LABEL_COLUMNS = ("recording", "start_s", "subject_id")


def table_task(name: str, labels_path: str | Path, classes: list[str] | None = None) -> tuple[Task, list[dict]]:
    """A task from a label table (CSV or Parquet): one row per window, columns ``recording`` (a
    ``.vital`` file's name in the raw folder, with or without its suffix), ``start_s`` (seconds
    from the recording's start), ``subject_id`` and either ``label`` (class names or numbers) or
    ``target`` (a number). ``classes``: the class list in label order (default: the labels seen,
    sorted); a label outside it is an error naming it. Returns the task and its rows."""
    import pyarrow.csv

    path = Path(storage.normalize(labels_path))
    if not path.is_file():
        raise ConfigError(f"label table {path} not found")
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pyarrow.csv.read_csv(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path} is not a readable CSV or Parquet table ({type(e).__name__}: {e})") from None
    names = table.column_names
    value = [c for c in ("label", "target") if c in names]
    missing = [c for c in LABEL_COLUMNS if c not in names]
    if missing or len(value) != 1:
        raise ConfigError(f"{path} has columns {names}: a label table needs {', '.join(LABEL_COLUMNS)} and one of "
                          "label (classes) or target (a number)")
    rows = table.select([*LABEL_COLUMNS, value[0]]).to_pylist()
    if value[0] == "target":
        task = Task(name, "regression", "table", f"label table {path.name}", target="target", channels=("PPG", "ECG"))
        for r in rows:
            r["target"] = float("nan") if r["target"] is None else float(r["target"])
        return task, rows
    seen = sorted({str(r["label"]) for r in rows})
    classes = list(classes) if classes else seen
    outside = Counter(str(r["label"]) for r in rows if str(r["label"]) not in classes)
    if outside:
        raise ConfigError(f"{path}: labels {dict(outside)} (label: rows) are not among the classes {classes}")
    if len(classes) < 2:
        raise ConfigError(f"{path}: every row has the label {classes}: a task needs two classes or more")
    task = Task(name, "binary" if len(classes) == 2 else "multiclass", "table", f"label table {path.name}",
                classes=tuple(classes), channels=("PPG", "ECG"))
    for r in rows:
        r["label"] = classes.index(str(r["label"]))
    return task, rows


def _process_item(row: dict, task: Task, raw_dir: str, channels, cfg, extra: dict) -> dict:
    """Ray Data task: one recording -> its outcome (JSON) and its windows (pickled). Never raises."""
    from biofm.task_readers import READERS

    item, t0 = row["item"], time.perf_counter()
    outcome: dict = {"recording": item}
    windows: list = []
    try:
        windows, skipped = READERS[task.source][1](item, task, Path(raw_dir), channels, cfg, extra)
        outcome.update(status="ok" if windows else "skipped", windows=len(windows), windows_skipped=dict(skipped))
        if not windows:
            outcome.update(code=next(iter(skipped), "no_windows"), reason=f"no usable window ({dict(skipped)})")
    except CaseSkipped as e:
        outcome.update(status="skipped", code=e.code, reason=e.detail)
    except Exception as e:  # one bad recording never stops the job; the manifest keeps the cause
        outcome.update(status="skipped", code="error", reason=f"{type(e).__name__}: {e}")
    outcome["seconds"] = round(time.perf_counter() - t0, 4)
    return {"outcome": json.dumps(outcome), "windows": pickle.dumps(windows)}


def task_table(rows: list[dict], spec: dict, task: Task, quality_columns: list[str]) -> pa.Table:
    """Parquet table of a task's windows (module docstring), data spec and task in its metadata."""
    value_type = pa.float32() if task.kind == "regression" else pa.int16()
    table = pa.table({
        "case_id": pa.array([r["case_id"] for r in rows], pa.string()),
        "window_idx": pa.array([r["window_idx"] for r in rows], pa.int32()),
        "start_s": pa.array([r["start_s"] for r in rows], pa.float64()),
        "subject_id": pa.array([r["subject_id"] for r in rows], pa.string()),
        task.column: pa.array([r[task.column] for r in rows], value_type),
        "signal": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(np.stack([r["signal"] for r in rows]))),
        "present": pa.array([r["present"].tolist() for r in rows], pa.list_(pa.bool_(), len(spec["channels"]))),
        **{c: pa.array([r["quality"].get(c, np.nan) for r in rows], pa.float32()) for c in quality_columns},
        "quality_reason": pa.array([r["quality_reason"] for r in rows], pa.string()),
    })
    from biofm.dataset import SCHEMA_KEY

    return table.replace_schema_metadata({SCHEMA_KEY: json.dumps(spec).encode(),
                                          TASK_KEY: json.dumps(dataclasses.asdict(task)).encode()})


def read_task(path: str) -> Task:
    """The task stored in a task file's (or folder's first file's) schema metadata."""
    files = [path] if storage.is_file(path) else list(storage.list_files(path, ".parquet"))
    metadata = storage.read_metadata(files[0]).metadata or {} if files else {}
    if TASK_KEY not in metadata:
        raise ConfigError(f"{path} holds no labelled task: write one with `biofm prepare-task`")
    fields = json.loads(metadata[TASK_KEY])
    return Task(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _split_key(task: Task, values: list) -> float:
    """What subjects are stratified by: the share of the last class (AF, good, the positive), or
    the mean target."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.mean(v == len(task.classes) - 1)) if task.classes else float(np.nanmean(v))


def prepare_task(task: Task, raw_dir: str | Path, outdir: str | Path, channels: dict[str, ChannelSpec],
                 cfg: WindowsConfig, split_ratios=(0.7, 0.15, 0.15), seed: int = 0, ppg_signal: int = 0,
                 label_rows: list[dict] | None = None, address: str | None = None, fit: str | None = None,
                 rate_hz: float | None = None, classes_in_every_split: bool = True) -> dict:
    """The windows of ``task`` from ``raw_dir`` -> ``outdir`` (module docstring); returns the manifest.

    Recordings are read and prepared in parallel with Ray Data (:mod:`biofm.task_readers`). A
    recording that cannot be read is skipped with its reason; so is a window without a usable label
    or target (counted by reason). Subjects are split by ``split_ratios`` (train, val, test) with
    ``seed``, stratified by :func:`_split_key`. ``label_rows``: a label table's rows
    (:func:`table_task`); ``ppg_signal``: which PPG signal of a recording that has several (BUT-PPG's
    colour channel, TROIKA's second wrist PPG); ``fit``: how PPG-BP's short segments become a window;
    ``rate_hz``: the rate of CSV files without a time column. Rebuilding replaces the previous
    output. A task left with one class or one subject is refused, and so is a split without a
    subject, or (unless ``classes_in_every_split`` is false: a pretraining corpus, whose labels are
    not evaluated) without a class of a classification task (:func:`check_splits`)."""
    from biofm.preprocess import Progress
    from biofm.dataset import code_version, data_spec
    from biofm.ray_connect import ensure_ray
    from biofm.sources.butppg import raw_folder
    from biofm.splits import SPLITS, split_groups

    raw_dir, outdir = raw_folder(raw_dir).resolve(), storage.normalize(outdir)
    if not raw_dir.is_dir():
        raise ConfigError(f"--raw-dir {raw_dir} is not a folder")
    spec = data_spec(channels, cfg) | ({"ppg_signal": ppg_signal} if task.source == "butppg" else {})
    options = {"ppg_signal": ppg_signal, "fit": fit, "rate_hz": rate_hz, "label_rows": label_rows}
    items, outcomes, extra = READERS[task.source][0](raw_dir, task, options)
    todo = [r for r in items if r not in outcomes]
    progress = Progress("prepare-task", len(todo), units=("recordings", "windows"))
    t0, rows = time.perf_counter(), []
    if todo:
        import ray

        ensure_ray(address)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        per_task = max(1, min(64, len(todo) // (4 * cpus)))  # BUT-PPG records are small: amortise Ray's per-task cost
        ds = ray.data.from_items([{"item": r} for r in todo], override_num_blocks=-(-len(todo) // per_task))
        kwargs = {"task": task, "raw_dir": str(raw_dir), "channels": channels, "cfg": cfg, "extra": extra}
        for row in ds.map(_process_item, fn_kwargs=kwargs).iter_rows():
            outcome = json.loads(row["outcome"])
            outcomes[outcome.pop("recording")] = outcome
            rows += pickle.loads(row["windows"])
            progress.update({"status": outcome["status"], "windows_kept": outcome.get("windows", 0)})
    skipped_windows = Counter()
    for o in outcomes.values():
        skipped_windows.update(o.get("windows_skipped", {}))
    if not rows:
        reasons = Counter(o["code"] for o in outcomes.values())
        raise NothingProduced(f"task {task.name}: no usable window in {raw_dir} (recordings skipped: {dict(reasons)}"
                              f"; windows skipped: {dict(skipped_windows)})")
    values: dict[str, list] = {}
    for r in rows:
        values.setdefault(r["subject_id"], []).append(r[task.column])
    check_labels(task, [r[task.column] for r in rows], [r["subject_id"] for r in rows], f"task {task.name}")
    split_of = {s: name for name, ids in split_groups(list(values), split_ratios, seed, positive_rate={
        s: _split_key(task, v) for s, v in values.items()}).items() for s in ids}
    check_splits(task, split_of, values if classes_in_every_split else {}, split_ratios, seed)
    quality_columns = sorted({k for r in rows for k in r["quality"]})
    for name in SPLITS:
        storage.remove_tree(storage.join(outdir, name))
    summary = {}
    for name in SPLITS:
        part = sorted((r for r in rows if split_of[r["subject_id"]] == name),
                      key=lambda r: (r["subject_id"], r["case_id"], r["window_idx"]))
        summary[name] = {"windows": len(part), "subjects": sorted({r["subject_id"] for r in part}, key=str),
                         **_value_summary(task, [r[task.column] for r in part])}
        for subject in summary[name]["subjects"]:
            mine = [r for r in part if r["subject_id"] == subject]
            storage.write(storage.join(outdir, name, f"{subject}.parquet"),
                          lambda f: pq.write_table(task_table(mine, spec, task, quality_columns), f))
    manifest = {
        "task": dataclasses.asdict(task), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code_version": code_version(), "raw_dir": str(raw_dir), "data_spec": spec,
        "config": {"split_ratios": list(split_ratios), "seed": seed, "ppg_signal": ppg_signal, "fit": extra.get("fit", fit),
                   "rate_hz": rate_hz},
        "records_in": len(items), "records_ok": sum(o["status"] == "ok" for o in outcomes.values()),
        "records_skipped": sum(o["status"] != "ok" for o in outcomes.values()),
        "skip_reasons": dict(Counter(o["code"] for o in outcomes.values() if o["status"] != "ok").most_common()),
        "windows": len(rows), "windows_skipped": dict(skipped_windows.most_common()),
        "quality_failed": dict(Counter(r["quality_reason"] for r in rows if r["quality_reason"]).most_common()),
        "splits": summary, "timings": {"wall_s": round(time.perf_counter() - t0, 3)},
        "records": {r: outcomes[r] for r in items},
    }
    storage.write_text(storage.join(outdir, "manifest.json"), json.dumps(manifest, indent=1))
    print(f"[prepare-task] {task.name}: {len(rows)} windows from {manifest['records_ok']}/{len(items)} recordings"
          + (f", {sum(skipped_windows.values())} windows skipped ({dict(skipped_windows)})" if skipped_windows else "")
          + "; " + ", ".join(f"{n}: {s['windows']} windows, {len(s['subjects'])} subjects" for n, s in summary.items())
          + f" -> {outdir}", flush=True)
    return manifest


def _value_summary(task: Task, values: list) -> dict:
    if task.kind == "regression":
        return {"target_mean": float(np.mean(values)) if values else float("nan")}
    counts = np.bincount(np.asarray(values, dtype=np.int64), minlength=len(task.classes)) if values else np.zeros(len(task.classes), int)
    return {"classes": dict(zip(task.classes, counts.tolist()))}


MIN_SUBJECTS_PER_CLASS = 5  # the benchmark's five subject-wise folds each test a subject of every class


def check_splits(task: Task, split_of: dict[str, str], values: dict[str, list], ratios, seed: int) -> None:
    """Refuse a split (train, val, test) given a share of the subjects that holds none, or that lacks
    a class of a classification task, naming the counts and what to change (``values``: each
    subject's labels; empty: classes not checked). A split of share 0 is meant to be empty."""
    from biofm.splits import SPLITS

    per_class = {}
    if task.kind != "regression":
        for s, v in values.items():
            for c in set(v):
                per_class.setdefault(task.classes[c], set()).add(s)
    for name, ratio in zip(SPLITS, ratios):
        members = [s for s, n in split_of.items() if n == name]
        if ratio == 0:
            continue
        if not members:
            raise ConfigError(f"task {task.name}: the {name} split gets none of the {len(split_of)} subjects with "
                              f"--split-ratios {' '.join(f'{r:g}' for r in ratios)}: raise its share, or add subjects")
        if task.kind != "regression":
            held = {c for s in members for c in values.get(s, ())}
            lacking = [task.classes[c] for c in range(len(task.classes)) if c not in held and task.classes[c] in per_class]
            if lacking:
                counts = ", ".join(f"{c}: {len(per_class[c])}" for c in per_class)
                raise ConfigError(f"task {task.name}: the {name} split ({len(members)} subjects) has no window of "
                                  f"{', '.join(lacking)} (subjects with each class: {counts}; seed {seed}): "
                                  f"change --seed or --split-ratios, or add subjects (at least "
                                  f"{MIN_SUBJECTS_PER_CLASS} per class for the benchmark's folds)")


def check_labels(task: Task, values, subjects, where: str) -> None:
    """Refuse a task that cannot be evaluated: one subject, or one class (with the counts)."""
    n_subjects = len(set(subjects))
    if n_subjects < 2:
        raise ConfigError(f"{where}: all {len(subjects)} windows come from one subject ({subjects[0]}): a task "
                          "needs two subjects or more to split by")
    if task.kind != "regression":
        counts = dict(zip(task.classes, np.bincount(np.asarray(values, np.int64), minlength=len(task.classes)).tolist()))
        if sum(n > 0 for n in counts.values()) < 2:
            raise ConfigError(f"{where}: only one class has windows ({counts}): a task needs two classes or more")


def prepare_butppg(raw_dir: str | Path, outdir: str | Path, channels: dict[str, ChannelSpec], cfg: WindowsConfig,
                   butppg, address: str | None = None) -> dict:
    """The ``butppg-quality`` task with a :class:`~biofm.config.ButppgConfig`'s split and PPG colour channel."""
    return prepare_task(TASKS["butppg-quality"], raw_dir, outdir, channels, cfg, butppg.split_ratios, butppg.seed,
                        butppg.ppg_signal, address=address)


def process_record(record_id: str, raw_dir: str, channels: dict[str, ChannelSpec], cfg: WindowsConfig,
                   ppg_signal: int, label: int, ref_hr: float) -> dict:
    """Read and prepare one BUT-PPG record for predict (a task's records: :mod:`biofm.tasks`); never
    raises for a bad record. Returns its outcome (JSON-able) plus ``signal`` ``[C, T]`` and
    ``present`` ``[C]`` when it is usable."""
    from biofm.sources.butppg import read_record, subject_of

    t0 = time.perf_counter()
    outcome = {"record_id": record_id, "subject_id": subject_of(record_id), "label": label, "ref_hr": ref_hr}
    try:
        record = read_record(Path(raw_dir), record_id, ppg_signal)
        signal, present = record_signal(record, channels, cfg)
        outcome.update(status="ok", present=dict(zip(channels, present.tolist())),
                       rates_hz={n: rate for n, (_, rate) in record.items()})
    except CaseSkipped as e:
        outcome.update(status="skipped", code=e.code, reason=e.detail)
        signal, present = None, None
    except Exception as e:  # one bad record never stops the job; the manifest keeps the cause
        outcome.update(status="skipped", code="error", reason=f"{type(e).__name__}: {e}")
        signal, present = None, None
    outcome["seconds"] = round(time.perf_counter() - t0, 4)
    return {"outcome": outcome, "signal": signal, "present": present}
