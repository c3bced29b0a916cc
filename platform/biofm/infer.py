"""Applying trained models to data on Ray Data: embeddings of a windows split, and a fine-tuned model's
predictions on new recordings (:func:`predict`, the training preprocessing reused).

:func:`embed` reads a split written by ``build-windows`` or ``prepare-butppg`` (local or a URI)
and streams it through an actor pool (:class:`Embedder`: the encoder loaded once per actor, on a
GPU where the actors get one) into Parquet::

    <output>/embeddings/*.parquet   case_id (or record_id), window_idx, start_s,
                                    embedding float32 [D] (the classifier's pooling), tokens [P, D]
    <output>/manifest.json          checkpoint and its sha256, data spec, counts, seconds

The model's data spec (rate, window, filters) and channels must match the split's, or it stops
naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from biofm import storage
from biofm.errors import BiofmError, ConfigError, NothingProduced
from biofm.train import checkpoint


def encoder_description(path: str) -> dict:
    """The description of a checkpoint that holds an encoder (pretraining or fine-tuned), read
    without building the model: the driver's checks need no model (and none of its imports)."""
    description = checkpoint.load(path)["description"]
    if description.get("kind") not in ("masked_signal_model", "ppg_quality_classifier"):
        raise BiofmError(f"{path} is neither a pretraining nor a fine-tuned checkpoint "
                         f"(kind {description.get('kind')!r})")
    return description


def load_encoder(path: str, channels: list[str] | None = None):
    """The encoder of a pretraining checkpoint, or of a fine-tuned classifier, and the checkpoint's
    description (CPU, eval mode). ``channels``: a pretraining encoder's channels for the data, by
    :func:`~biofm.model.classifier.channel_plan`: the ones it lacks are added by inflation
    (``preserve``: its own channels' latents stay as pretrained)."""
    from biofm.model.classifier import inflate_encoder
    from biofm.train.evaluate import load_pretrained
    from biofm.train.finetune import load_classifier

    description = encoder_description(path)
    if description["kind"] != "masked_signal_model":
        return load_classifier(path)[0].encoder.eval(), description
    encoder = load_pretrained(path).encoder
    if channels is not None and list(channels) != list(description["channels"]):
        encoder = inflate_encoder(encoder.state_dict(), encoder.config, list(description["channels"]), list(channels))
    return encoder.eval(), description


def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


class _Trimmed:
    """A Ray Data callable class that gives freed memory back to the OS every 16th batch. An actor
    otherwise grows by a quarter over its first ~40,000 windows (freed activation blocks kept in
    glibc's pools) before it holds; trimmed, it stays flat at no measurable cost (bench_inference)."""

    calls = 0

    def trimmed(self, out: dict) -> dict:
        self.calls += 1
        if self.calls % 16 == 0 and _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
        return out


class Embedder(_Trimmed):
    """Ray Data's callable class: the encoder of ``checkpoint`` loaded once per actor. A batch of
    ``signal`` ``[B, C_data, T]`` (+ ``present`` ``[B, C_data]``) -> ``embedding`` ``[B, D]``
    (and ``tokens`` ``[B, P, D]``, the mean over channels), the other columns passed through.
    ``channel_index``: each model channel's row in the data, -1 where the data lacks it (zeros,
    marked absent, as fine-tuning marks them); ``channels``: the model's (a pretraining encoder's
    inflated to them)."""

    def __init__(self, checkpoint_path: str, channels: list[str], channel_index: list[int], tokens: bool, threads: int,
                 batch_size: int = 256, compile: bool | None = None, bf16: bool = False):
        torch.set_num_threads(max(1, threads))
        self.encoder, _ = load_encoder(checkpoint_path, channels)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder.to(self.device)
        self.forward = inference(self.encoder, self.device, batch_size, compile, bf16)
        self.index, self.tokens = channel_index, tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from biofm.model.classifier import pool

        signal = np.asarray(batch["signal"], dtype=np.float32)
        n, have = len(signal), [i for i in self.index if i >= 0]
        x = np.zeros((n, len(self.index), signal.shape[-1]), np.float32)
        x[:, [c for c, i in enumerate(self.index) if i >= 0]] = signal[:, have]
        stored = np.stack(batch["present"]).astype(bool) if "present" in batch else np.ones(signal.shape[:2], bool)
        mask = np.zeros((n, len(self.index)), bool)  # [B, C]; a channel the data lacks is absent
        mask[:, [c for c, i in enumerate(self.index) if i >= 0]] = stored[:, have]
        latents = self.forward(torch.from_numpy(x).to(self.device)).float()
        out = {k: v for k, v in batch.items() if k not in ("signal", "present")}
        out["embedding"] = pool(latents, torch.from_numpy(mask).to(self.device)).cpu().numpy()
        if self.tokens:
            out["tokens"] = latents.mean(dim=1).cpu().numpy()
        out.setdefault("window_idx", np.zeros(n, np.int32))  # one window per record
        out.setdefault("start_s", np.zeros(n, np.float64))
        return self.trimmed(out)


def inference(module: torch.nn.Module, device: torch.device, batch_size: int, compile: bool | None = None,
              bf16: bool = False):
    """``module(x)`` without gradients for batches ``x`` ``[B, C, T]`` on ``device``: compiled for
    batches of ``batch_size`` (``compile``, None: on a GPU; :func:`biofm.train.step.compiled_for_batch`),
    in bf16 autocast when ``bf16`` (outputs then bf16)."""
    from biofm.train.step import compiled_for_batch, use_compile

    fn = compiled_for_batch(module, batch_size, device) if use_compile(compile, device) else module

    def run(x):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return fn(x)
    return run


def _read_windows(batch: dict[str, np.ndarray], columns: list[str]):
    """Ray Data task: the rows of each file in ``batch["path"]`` (``columns`` only), a table per file."""
    for path in batch["path"]:
        yield storage.read_file(path, columns)


def actor_pool(concurrency: int | None = None, num_gpus: float = 0.0) -> tuple[int, int, float]:
    """``(cluster CPUs, actors, CPUs per actor)`` for a pool that holds a model: ``concurrency``
    actors, or one per GPU share with ``num_gpus``, or the free CPUs less one. One free CPU stays
    for the tasks that feed and drain the pool (predict's preprocessing takes a whole CPU per
    task, embed's reads and the writes a quarter): actors holding every CPU would starve them,
    and the job would wait forever. Sized by what is free now, not the cluster's total: other
    work (a placement group another run left reserved) can hold part of it."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    free = ray.available_resources().get("CPU", 0.0)
    gpus = ray.cluster_resources().get("GPU", 0)
    actors = concurrency or (max(1, int(gpus / num_gpus)) if num_gpus else max(1, int(free) - 1))
    return cpus, actors, min(1.0, max(0.0, free - 1) / actors)


def embed(checkpoint_path: str, data_dir: str | list[str], output: str, batch_size: int = 256,
          concurrency: int | None = None, num_gpus: float = 0.0, tokens: bool = False, address: str | None = None,
          compile: bool | None = None, bf16: bool = False) -> dict:
    """Embeddings of every window of ``data_dir`` (a split folder, or several made alike: a task's
    splits) under ``output``; returns the manifest. ``concurrency``: actors (default: the free CPUs
    less one, for the reads; with ``num_gpus``, one actor per GPU share). Besides the ids, a
    task's ``label``/``target`` and ``subject_id`` are passed through. A model channel the data
    lacks is zeros marked absent; a data channel a pretraining encoder lacks is added by inflation
    (:func:`~biofm.model.classifier.channel_plan`, as fine-tuning adds it), a fine-tuned model
    reads its own channels only; a model that reads none of the data's channels is refused.
    ``compile`` (None: on a GPU) and ``bf16``: how the actors run the encoder (:func:`inference`)."""
    import ray

    from biofm.dataset import check_data_spec, same_data
    from biofm.ray_connect import ensure_ray
    from biofm.train.batches import scan

    t0 = time.perf_counter()
    dirs = [storage.normalize(d) for d in (data_dir if isinstance(data_dir, (list, tuple)) else [data_dir])]
    output = storage.normalize(output)
    target = storage.join(output, "embeddings")
    if storage.list_files(target):
        raise BiofmError(f"{target} already holds embeddings: choose another --output, or delete it")
    description = encoder_description(checkpoint_path)
    splits = [scan(d) for d in dirs]
    split = splits[0]
    for d, other in zip(dirs[1:], splits[1:]):
        if not same_data(other.spec, split.spec):
            raise ConfigError(f"{d} was made with other settings than {dirs[0]}")
    files = [f for s in splits for f in s.files]
    where = dirs[0] if len(dirs) == 1 else f"{len(dirs)} folders from {dirs[0]}"
    from biofm.model.classifier import channel_plan

    stored = list(split.spec["channels"])
    own = list(description["channels"])
    needed = channel_plan(own, stored) if description["kind"] == "masked_signal_model" else own
    missing = [c for c in needed if c not in stored]
    if not set(own) & set(stored):
        raise ConfigError(f"{where} has channels {stored}; the model {checkpoint_path} reads {own}: none of them")
    check_data_spec(description["data_spec"], split.spec, where=f"{where} vs the model {checkpoint_path}")
    added = [c for c in needed if c not in own]
    if added:
        print(f"[embed] the encoder has no {', '.join(added)}: added (inflated, its own channels' latents "
              "unchanged)", flush=True)
    left_out = [c for c in stored if c not in needed]
    if left_out:
        print(f"[embed] the model reads {', '.join(needed)}: the data's {', '.join(left_out)} left out", flush=True)
    if missing:
        print(f"[embed] the data has no {', '.join(missing)}: zeros, marked absent", flush=True)
    schema = storage.read_metadata(files[0]).schema.to_arrow_schema()
    id_column = "case_id" if "case_id" in schema.names else "record_id"
    columns = [c for c in (id_column, "window_idx", "start_s", "subject_id", "label", "target", "signal", "present")
               if c in schema.names]

    ensure_ray(address)
    cpus, actors, actor_cpus = actor_pool(concurrency, num_gpus)
    # the scan above knows every file: one read task per file, with the training loops' reader.
    # ray.data.read_parquet reads every footer again first: for 192 files on 2 CPUs the first
    # window reached the model after 16 s instead of 6.5 s (the actor's own start).
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=min(len(files), 4 * cpus))
    ds = ds.map_batches(_read_windows, fn_kwargs={"columns": columns}, batch_size=None, num_cpus=0.25)
    ds = ds.map_batches(Embedder, batch_size=batch_size, batch_format="numpy", concurrency=actors, num_gpus=num_gpus,
                        num_cpus=actor_cpus, fn_constructor_kwargs={
                            "checkpoint_path": storage.normalize(checkpoint_path), "channels": needed,
                            "channel_index": [stored.index(c) if c in stored else -1 for c in needed], "tokens": tokens,
                            "threads": max(1, cpus // actors), "batch_size": batch_size, "compile": compile,
                            "bf16": bf16})
    ds.write_parquet(target, ray_remote_args={"num_cpus": 0.25})
    written = sum(storage.read_metadata(f).num_rows for f in storage.list_files(target, ".parquet"))
    windows_in = sum(s.windows for s in splits)
    manifest = {
        "checkpoint": storage.normalize(checkpoint_path),
        "checkpoint_sha256": hashlib.sha256(storage.read_bytes(checkpoint_path)).hexdigest(),
        "checkpoint_kind": description["kind"], "channels": needed, "channels_added": added, "channels_left_out": left_out,
        "channels_absent": missing, "data_spec": description["data_spec"],
        "data_dir": dirs[0] if len(dirs) == 1 else dirs, "id_column": id_column, "windows_in": windows_in,
        "embeddings": written, "embedding_dim": description["ttm_config"]["d_model"], "tokens": tokens, "pooling":
        "mean over patches, then over present channels (the classifier's)", "actors": actors,
        "compile": compile, "bf16": bf16,
        "seconds": round(time.perf_counter() - t0, 2)}
    if written != windows_in:
        raise BiofmError(f"{written} embeddings written for {windows_in} windows in {where}")
    storage.write_text(storage.join(output, "manifest.json"), json.dumps(manifest, indent=1))
    print(f"[embed] {written} windows -> {target} ({manifest['seconds']:.1f} s, {actors} actor(s))", flush=True)
    return manifest


def model_preprocessing(description: dict):
    """The channels (``ChannelSpec``, in the model's order) and ``WindowsConfig`` that reproduce the
    model's training data: rate, window and filters from its data spec; track names and beat
    detectors from the shipped ``channels.yaml``; quality thresholds from ``windows.yaml``."""
    import dataclasses

    from biofm.config import ChannelsConfig, ChannelSpec, WindowsConfig, load_config
    from biofm.signals import PASS_BAND

    spec = description["data_spec"]
    shipped = load_config(ChannelsConfig, "configs/channels.yaml").channels
    channels = {}
    for name in spec["channels"]:
        f = spec["filters"][name]
        if f.get("edges") != PASS_BAND:
            raise ConfigError(f"the model was trained on {name} windows filtered by an earlier biofm, whose filters "
                              f"passed a narrower band than band_hz {f['band_hz']} says, which windows cut now do not "
                              "reproduce: retrain it on windows built now")
        base = shipped.get(name)
        channels[name] = ChannelSpec(band_hz=tuple(f["band_hz"]), filter_order=f["order"], stopband_db=f["stopband_db"],
                                     tracks=base.tracks if base else (),
                                     aliases=base.aliases if base else (), quality=base.quality if base else "none")
    windows = dataclasses.replace(load_config(WindowsConfig, "configs/windows.yaml"),
                                  sample_rate_hz=spec["sample_rate_hz"], window_s=spec["window_s"],
                                  stride_s=spec["window_s"])
    return channels, windows


def _recording_windows(row: dict, kind: str, source, folder: str, channels: dict, windows, ppg_signal: int,
                       anchor: str) -> list[dict]:
    """One recording -> its windows (``signal [C, T]``, ``present [C]``, ids, quality) through the
    training preprocessing, or one row that records why it was skipped. ``ppg_signal``: which
    signal of a BUT-PPG ``_PPG`` record is the PPG (the model's data spec says). Other recordings
    need the ``anchor`` channel (:func:`anchor_channel`); of the other channels, those every piece
    holding it holds are used, the rest are absent."""
    from biofm.errors import CaseSkipped
    from biofm.preprocess import recording_windows
    from biofm.tasks import process_record

    rid, names = row["recording_id"], list(channels)
    try:
        if kind == "butppg":
            out = process_record(rid, folder, channels, windows, ppg_signal=ppg_signal, label=-1, ref_hr=float("nan"))
            if out["outcome"]["status"] != "ok":
                raise CaseSkipped(out["outcome"]["code"], out["outcome"]["reason"])
            return [{"recording_id": rid, "window_idx": 0, "start_s": 0.0, "signal": out["signal"],
                     "present": out["present"], "skipped": ""}]
        readable = {n: s for n, s in channels.items() if s.tracks or s.aliases}
        recording = source.read(rid, readable)
        anchored = [p for p in recording.pieces if anchor in p.tracks]
        readable = {n: s for n, s in readable.items() if anchored and all(n in p.tracks for p in anchored)}
        columns, reasons = recording_windows(recording.require(readable or [anchor]), readable, windows, {})
        rejected, total = Counter(r for r in reasons if r), len(reasons)
        n = len(columns["window_idx"])
        if n == 0:
            raise CaseSkipped("no_usable_windows", f"all {total} windows failed quality checks ({dict(rejected)})")
        signal = np.zeros((n, len(names), windows.window_samples), np.float32)
        for c, name in enumerate(readable):
            signal[:, names.index(name)] = columns["signal"][:, c]
        present = np.array([name in readable for name in names])
        quality = {k: v for k, v in columns.items() if k not in ("window_idx", "start_s", "signal")}
        return [{"recording_id": rid, "window_idx": int(columns["window_idx"][i]), "start_s": float(columns["start_s"][i]),
                 "signal": signal[i], "present": present, "skipped": "",
                 **{k: float(v[i]) for k, v in quality.items()}} for i in range(n)]
    except CaseSkipped as e:
        reason = f"{e.code}: {e.detail}"
    except Exception as e:  # one bad recording never stops the job; the manifest keeps the cause
        reason = f"error: {type(e).__name__}: {e}"
    return [{"recording_id": rid, "window_idx": -1, "start_s": 0.0, "signal": np.zeros((len(names), windows.window_samples),
             np.float32), "present": np.zeros(len(names), bool), "skipped": reason}]


class Predictor(_Trimmed):
    """Ray Data's callable class: the classifier loaded once per actor, and its answer for each
    window, in its task's words: a binary task's probability of the positive class and the label
    at the checkpoint's threshold; a multiclass task's most probable class and each class's
    probability (``p_<class>``); a regression task's value in the target's unit."""

    def __init__(self, model_path: str, threads: int):
        from biofm.train.finetune import load_classifier, task_of

        torch.set_num_threads(max(1, threads))
        self.model, self.description = load_classifier(model_path)
        self.task = task_of(self.description)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from biofm.train.finetune import predict_outputs
        from biofm.train.metrics import slug

        out = {k: v for k, v in batch.items() if k not in ("signal", "present")}
        answers = predict_outputs(self.model, np.stack(batch["signal"]).astype(np.float32),
                                  np.stack(batch["present"]).astype(bool), self.description, batch_size=len(batch["signal"]))
        if self.task["kind"] == "regression":
            out["value"] = answers
        elif self.task["kind"] == "binary":
            out["probability"] = answers[:, 1]
            out["label"] = (answers[:, 1] >= float(self.description["threshold"])).astype(np.int8)
        else:
            out["label"] = answers.argmax(axis=1).astype(np.int16)
            out |= {f"p_{slug(c)}": answers[:, k] for k, c in enumerate(self.task["classes"])}
        if self.task["kind"] != "regression":
            out["class"] = np.array(self.task["classes"], dtype=object)[out["label"]]
        return self.trimmed(out)


def recordings_in(folder: str) -> tuple[str, object, list[str]]:
    """``(kind, source, record ids)``: ``("butppg", None, ids)`` for a BUT-PPG folder (RECORDS of
    ``<id>/<id>_PPG``), else the format and :func:`~biofm.sources.formats.open_source`'s source for
    a folder of .vital, WFDB, EDF or CSV recordings (a ``wfdb:`` ... prefix names the format)."""
    from biofm.sources.butppg import read_records
    from biofm.sources.formats import open_source

    from biofm.sources.formats import format_prefix

    root = Path(format_prefix(folder)[1])
    if not root.is_dir():
        raise BiofmError(f"{folder} is not a folder of recordings")
    listed = [x.strip() for x in (root / "RECORDS").read_text().splitlines() if x.strip()] \
        if (root / "RECORDS").is_file() else []
    if listed and all(x.endswith("_PPG") for x in listed):
        return "butppg", None, read_records(root)
    source = open_source(folder)
    return getattr(source, "fmt", "vital"), source, source.ids()


def predict(model_path: str, input_dir: str, output: str, batch_size: int = 256, plots: int = 5,
            address: str | None = None) -> dict:
    """The fine-tuned model's answer for every window of every recording in ``input_dir``, in its
    task's words (:class:`Predictor`), under ``output``: ``predictions.parquet``, ``summary.csv``, ``manifest.json``, and a timeline PNG for
    the first ``plots`` recordings. Returns the manifest."""
    import csv
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from biofm.ray_connect import ensure_ray

    t0 = time.perf_counter()
    kind = checkpoint.load(model_path)["description"].get("kind")
    if kind != "ppg_quality_classifier":
        raise BiofmError(f"{model_path} is not a fine-tuned classifier (kind {kind!r}): predict needs the "
                         "best_model.pt of biofm finetune; embeddings of a pretrained model come from biofm embed")
    from biofm.train.finetune import load_classifier

    from biofm.train.finetune import task_of

    description = load_classifier(model_path)[1]  # a checkpoint it cannot load is refused before Ray starts
    task = task_of(description)
    channels, windows = model_preprocessing(description)
    kind, source, ids = recordings_in(str(input_dir))
    ensure_ray(address)
    cpus, actors, actor_cpus = actor_pool()
    ds = ray.data.from_items([{"recording_id": r} for r in ids], override_num_blocks=min(len(ids), 4 * cpus))
    ppg_signal = description["data_spec"].get("ppg_signal", 0)  # only BUT-PPG-trained models record it
    anchor = anchor_channel(description)
    ds = ds.flat_map(_recording_windows, fn_kwargs={"kind": kind, "source": source, "folder": str(input_dir), "channels": channels,
                                                   "windows": windows, "ppg_signal": ppg_signal, "anchor": anchor})
    ds = ds.map_batches(Predictor, batch_size=batch_size, batch_format="numpy", concurrency=actors,
                        num_cpus=actor_cpus, fn_constructor_kwargs={
                            "model_path": storage.normalize(model_path), "threads": max(1, cpus // actors)})
    rows = [r for b in ds.iter_batches(batch_size=None, batch_format="pandas") for r in b.to_dict("records")]
    skipped = {r["recording_id"]: r["skipped"] for r in rows if r["skipped"]}
    kept = [{k: v for k, v in r.items() if k != "skipped"} for r in rows if not r["skipped"]]
    kept.sort(key=lambda r: (r["recording_id"], r["window_idx"]))
    table = pa.Table.from_pylist(kept) if kept else pa.table({"recording_id": pa.array([], pa.string())})
    storage.write(storage.join(output, "predictions.parquet"), lambda f: pq.write_table(table, f))
    summary = io.StringIO(newline="")
    w = csv.writer(summary)
    columns = summary_columns(task)
    w.writerow(["recording_id", "status", "windows", *columns, "reason"])
    for rid in ids:
        mine = [r for r in kept if r["recording_id"] == rid]
        if rid in skipped:
            w.writerow([rid, "skipped", 0, *[""] * len(columns), skipped[rid]])
        else:
            w.writerow([rid, "ok", len(mine), *[round(v, 4) for v in summary_values(task, mine)], ""])
    storage.write_text(storage.join(output, "summary.csv"), summary.getvalue())
    plotted = [rid for rid in ids if rid not in skipped][:plots]
    for rid in plotted:
        _timeline(rid, _raw_track(kind, source, input_dir, rid, channels, ppg_signal, anchor),
                  [r for r in kept if r["recording_id"] == rid], description, storage.join(output, f"timeline_{rid}.png"))
    manifest = {"model": storage.normalize(model_path),
                "model_sha256": hashlib.sha256(storage.read_bytes(model_path)).hexdigest(),
                "input": str(input_dir), "input_kind": kind, "data_spec": description["data_spec"], "task": task,
                "threshold": description.get("threshold"), "recordings_in": len(ids),
                "recordings_ok": len(ids) - len(skipped), "recordings_skipped": len(skipped),
                "skipped": skipped, "windows": len(kept), "timelines": plotted,
                "seconds": round(time.perf_counter() - t0, 2)}
    assert manifest["recordings_in"] == manifest["recordings_ok"] + manifest["recordings_skipped"]
    storage.write_text(storage.join(output, "manifest.json"), json.dumps(manifest, indent=1))
    print(f"[predict] {manifest['recordings_ok']}/{len(ids)} recordings ({len(skipped)} skipped), {len(kept)} windows "
          f"-> {output}", flush=True)
    if not kept:
        reasons = Counter(reason.split(":")[0] for reason in skipped.values())
        raise NothingProduced(f"no window to rate: {len(skipped)} of {len(ids)} recordings skipped "
                              f"({', '.join(f'{code} {n}' for code, n in reasons.most_common()) or 'none kept a window'}); "
                              f"each with its reason in {storage.join(output, 'manifest.json')}")
    return manifest


def anchor_channel(description: dict) -> str:
    """The channel a recording must hold for a fine-tuned model to rate it, and its timelines show:
    PPG where the model was trained on it, else the first channel it was trained on (ECG for a
    CinC 2017 model)."""
    trained = [c for c in description["channels"] if c not in description.get("absent", [])]
    return "PPG" if "PPG" in trained else trained[0]


def _raw_track(kind: str, source, folder: str, rid: str, channels: dict, ppg_signal: int,
               name: str) -> tuple[str, np.ndarray, float]:
    """The recording's ``name`` channel as recorded ``(name, x [n], Hz)``, for its timeline: pieces
    at their offsets, NaN between them."""
    from biofm.sources.butppg import read_record

    if kind == "butppg":
        return (name, *read_record(Path(folder), rid, ppg_signal)[name])
    pieces = [p for p in source.read(rid, {name: channels[name]}).require([name]).pieces if name in p.tracks]
    fs = pieces[0].tracks[name][1]
    x = np.full(max(int(round(p.start_s * fs)) + len(p.tracks[name][0]) for p in pieces), np.nan)
    for p in pieces:
        first = int(round(p.start_s * fs))
        x[first:first + len(p.tracks[name][0])] = p.tracks[name][0]
    return name, x, fs


def summary_columns(task: dict) -> list[str]:
    """summary.csv's figures per recording, named after the task: a binary task's share of windows
    predicted positive and mean probability; a multiclass task's share of windows per class; a
    regression task's mean and SD of the values (with the unit)."""
    from biofm.train.metrics import slug

    if task["kind"] == "binary":
        return [f"share_predicted_{slug(task['classes'][1])}", f"mean_probability_{slug(task['classes'][1])}"]
    if task["kind"] == "multiclass":
        return [f"share_predicted_{slug(c)}" for c in task["classes"]]
    unit = f"_{slug(task['unit'])}" if task.get("unit") else ""
    name = slug(task.get("target") or "value")
    return [f"mean_{name}{unit}", f"sd_{name}{unit}"]


def summary_values(task: dict, rows: list[dict]) -> list[float]:
    if task["kind"] == "binary":
        return [float(np.mean([r["label"] for r in rows])), float(np.mean([r["probability"] for r in rows]))]
    if task["kind"] == "multiclass":
        return [float(np.mean([r["label"] == k for r in rows])) for k in range(len(task["classes"]))]
    values = [r["value"] for r in rows]
    return [float(np.mean(values)), float(np.std(values))]


def _timeline(rid: str, track: tuple[str, np.ndarray, float], rows: list[dict], description: dict, path: str) -> None:
    """The recording's ``track`` (name, samples, Hz) with each window shaded by the model's answer (a class's colour), and
    below each window's probability of the positive class (binary), of its class (multiclass) or
    its value (regression): readable without code."""
    from biofm.plotting import plt, save_png
    from biofm.train.finetune import task_of
    from biofm.train.metrics import slug

    task = task_of(description)
    name, x, fs = track
    step = max(1, int(len(x) / 20000))  # at most ~20,000 points: the shape, not every sample
    t = np.arange(0, len(x), step) / fs
    window_s = description["data_spec"]["window_s"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 4.5), sharex=True, height_ratios=[2, 1])
    classes = task.get("classes", [])
    colours = (["tab:red", "tab:green"] if task["kind"] == "binary"
               else [plt.get_cmap("tab10")(k % 10) for k in range(len(classes))])
    for r in rows:
        if classes:
            for ax in (top, bottom):
                ax.axvspan(r["start_s"], r["start_s"] + window_s, color=colours[int(r["label"])], alpha=0.3, lw=0)
        shown = r["value"] if task["kind"] == "regression" else (
            r["probability"] if task["kind"] == "binary" else r[f"p_{slug(classes[int(r['label'])])}"])
        bottom.plot([r["start_s"], r["start_s"] + window_s], [shown] * 2, color="black", lw=1.5)
    top.plot(t, x[::step], color="black", lw=0.5)
    if task["kind"] == "binary":
        legend = f"green: {classes[1]}, red: {classes[0]}, at the threshold"
        bottom.axhline(description["threshold"], color="grey", ls="--", lw=0.8,
                       label=f"threshold {description['threshold']:.4f}")
        bottom.set(ylabel=f"P({classes[1]})", ylim=(0, 1))
        bottom.legend(loc="upper right", fontsize=8)
    elif classes:
        legend = "shaded by the most probable class"
        top.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.3) for c in colours], labels=list(classes),
                   loc="upper right", fontsize=7, ncol=len(classes))
        bottom.set(ylabel="P(its class)", ylim=(0, 1))
    else:
        legend = f"{task.get('target') or 'value'} per window below"
        bottom.set(ylabel=f"{task.get('target') or 'value'}" + (f", {task['unit']}" if task.get("unit") else ""))
    top.set(ylabel=f"{name} (as recorded)", title=f"{rid}: {task['name']} per {window_s:g} s window\n({legend}; "
                                              "unshaded: rejected by the quality checks)")
    bottom.set(xlabel="seconds from the recording's start")
    fig.tight_layout()
    save_png(fig, path)
