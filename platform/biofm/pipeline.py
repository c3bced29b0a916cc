"""The end-to-end pipeline from one config: prepare-splits -> build-windows (train, val) ->
pretrain -> prepare-butppg -> finetune [-> tune] [-> embed], each stage the same library call as its
``biofm`` command.

A stage records what it was made from in ``<its folder>/pipeline_stage.json`` (a hash of its
resolved settings and of the stages it reads). A rerun skips a stage whose record says ``done``
with the same hash, continues one that was interrupted with the same hash, and rebuilds one whose
settings changed; ``force`` reruns the named stages.

    <output_dir>/splits/splits_<mode>.json
    <output_dir>/vitaldb_windows/{train,val}/     manifest.json
    <output_dir>/foundation_model/                best_model.pt, ...
    <output_dir>/but_ppg/{train,val,test}/        manifest.json
    <output_dir>/but_ppg_finetuned/               best_model.pt, test_metrics.json, ...
    <output_dir>/tune/finetune_schedules/         (with a tune section)
    <output_dir>/embeddings/                      (with an embed section) embeddings/, manifest.json
    <output_dir>/pipeline.json                    per stage: ran or skipped, hash, seconds

``output_dir`` is a local (or shared) path or a URI (``s3://bucket/prefix``, :mod:`biofm.storage`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

from biofm import storage, tasks
from biofm.config import (
    EMBED_KEYS, STAGES, ButppgConfig, ChannelsConfig, FinetuneConfig, PipelineConfig, PretrainConfig, TuneSearchConfig,
    WindowsConfig, load_config, to_jsonable, with_overrides,
)
from biofm.errors import BiofmError, ConfigError, SourceUnreachable

MARKER = "pipeline_stage.json"


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_sources(cfg: PipelineConfig, pre: PretrainConfig) -> None:
    """Stop before any work when a source the pipeline needs cannot be reached (the recordings,
    and the published weights pretraining starts from), naming every one at once and the settings
    that point the run at local copies, as one command line."""
    from biofm.sources import butppg
    from biofm.sources.formats import open_source

    problems, fixes = [], {}
    try:
        open_source(cfg.vital_source, cfg.api_url).check_reachable()
    except (SourceUnreachable, ConfigError) as e:  # ConfigError: a folder without recordings
        problems.append(str(e))
        fixes["vital_source"] = "<folder of .vital files>"
        if not Path(cfg.case_set).exists():  # a vitaldb case set names the API's cases, not the folder's
            fixes["case_set"] = "<the same folder>"
    raw = butppg.raw_folder(cfg.butppg_raw_dir)
    if not (raw / "RECORDS").is_file():
        if not cfg.butppg_download:
            problems.append(f"no BUT-PPG in {raw} (no RECORDS file), and butppg_download is false")
            fixes["butppg_raw_dir"] = "<BUT-PPG 2.0.0 folder>"
        else:
            try:
                butppg.check_reachable(cfg.physionet_url)
            except SourceUnreachable as e:
                problems.append(str(e))
                fixes["butppg_raw_dir"] = "<BUT-PPG 2.0.0 folder>"
    if pre.init != "random":
        from biofm.model import ttm_weights

        try:
            ttm_weights.fetch(*ttm_weights.parse(pre.init))
        except BiofmError as e:
            problems.append(str(e))
            fixes["pretrain"] = '"{init: <folder of the TTM checkpoint>}"'
    if problems:
        flags = " ".join(f"--set {k}={v}" for k, v in fixes.items())
        # each cause without its own advice, which names the flags of the stage's own command
        causes = [p.split(". ")[0].rstrip(".") for p in problems]
        raise SourceUnreachable("\n  ".join([f"nothing was started; to run from local copies, add to the same "
                                              f"command: {flags}" if flags else "nothing was started:", *causes]))


def run_stage(name: str, folder: str | Path, settings: dict, force: bool, run) -> dict:
    """Run ``run(resume: bool)`` for stage ``name`` unless ``folder`` already holds its output
    made from ``settings``. Returns ``{"stage", "hash", "status": ran|skipped, "seconds"}``."""
    digest = settings_hash(settings)
    marker = storage.join(folder, MARKER)
    previous = json.loads(storage.read_text(marker)) if storage.is_file(marker) else None
    if previous and previous["hash"] == digest and previous["status"] == "done" and not force:
        print(f"[pipeline] {name}: up to date ({digest}), skipped", flush=True)
        return {"stage": name, "hash": digest, "status": "skipped", "seconds": 0.0}
    if previous is None and (storage.list_files(folder) or storage.list_dirs(folder)):
        raise BiofmError(f"{folder} exists and was not made by the pipeline: move it away or choose another "
                         "output_dir (the pipeline does not delete what it did not write)")
    resume = bool(previous and previous["hash"] == digest and not force)
    if previous and not resume:
        why = "forced" if force else "its settings changed"
        print(f"[pipeline] {name}: {why}, rebuilding {storage.normalize(folder)}", flush=True)
        storage.remove_tree(folder)
    record = {"stage": name, "hash": digest, "settings": settings}
    storage.write_text(marker, json.dumps({**record, "status": "running"}, indent=1, default=str))
    print(f"[pipeline] {name}: {'continuing' if resume else 'running'} ({digest})", flush=True)
    t0 = time.perf_counter()
    run(resume)
    seconds = round(time.perf_counter() - t0, 1)
    storage.write_text(marker, json.dumps({**record, "status": "done", "seconds": seconds}, indent=1, default=str))
    print(f"[pipeline] {name}: done in {seconds:.0f} s", flush=True)
    return {"stage": name, "hash": digest, "status": "ran", "seconds": seconds}


def run_pipeline(cfg: PipelineConfig, force: tuple[str, ...] = (), address: str | None = None) -> list[dict]:
    """Run every stage of ``cfg`` in order (see the module docstring); returns the stage records."""
    unknown = [s for s in force if s not in STAGES]
    if unknown:
        raise ConfigError(f"--force: unknown stage(s) {unknown} (stages: {', '.join(STAGES)})")
    out = storage.normalize(cfg.output_dir)
    channels = load_config(ChannelsConfig, cfg.channels_yaml)
    windows = load_config(WindowsConfig, cfg.windows_yaml)
    pre = with_overrides(PretrainConfig, cfg.pretrain_config, cfg.pretrain, "pipeline pretrain")
    but = with_overrides(ButppgConfig, cfg.butppg_config, cfg.butppg, "pipeline butppg")
    fine = with_overrides(FinetuneConfig, cfg.finetune_config, cfg.finetune, "pipeline finetune")
    search = None if cfg.tune is None else with_overrides(TuneSearchConfig, cfg.tune_config, cfg.tune, "pipeline tune")
    check_sources(cfg, pre)  # before the heavy imports below: offline, it answers in a second
    storage.check_writable(out)

    from biofm.infer import embed
    from biofm.preprocess import build_windows
    from biofm.ray_connect import ensure_ray
    from biofm.sources.butppg import download, raw_folder
    from biofm.sources.formats import open_source
    from biofm.splits import load_split, prepare_splits
    from biofm.train.finetune import finetune
    from biofm.train.pretrain import pretrain
    from biofm.train.ray_run import RUN_NAME
    from biofm.tune import STATE, run_search

    ensure_ray(address)

    records, hashes = [], {}

    def stage(name, folder, settings, run, after=()):
        settings = {**settings, "after": {a: hashes[a] for a in after}}
        records.append(run_stage(name, folder, settings, name in force, run))
        hashes[name] = records[-1]["hash"]

    at = functools.partial(storage.join, out)

    stage("splits", at("splits"),
          {"case_set": cfg.case_set, "mode": cfg.split_mode, "seed": cfg.split_seed, "ratios": cfg.split_ratios},
          lambda resume: prepare_splits(cfg.split_mode, cfg.case_set, at("splits"), cfg.split_seed,
                                        cfg.split_ratios))

    def build(resume):
        selected = channels.select(pre.channels)
        for split in ("train", "val"):
            cases = load_split(at("splits", f"splits_{cfg.split_mode}.json"), split)[:cfg.max_cases.get(split)]
            build_windows(cases, open_source(cfg.vital_source, cfg.api_url), selected, windows,
                          at("vitaldb_windows"), split, inputs={"pipeline": out, "source": cfg.vital_source})

    stage("windows", at("vitaldb_windows"),
          {"channels": to_jsonable(channels), "windows": to_jsonable(windows), "source": cfg.vital_source,
           "api_url": cfg.api_url, "max_cases": cfg.max_cases, "channels_used": pre.channels}, build, after=["splits"])
    stage("pretrain", at("foundation_model"), to_jsonable(pre),
          lambda resume: pretrain(pre, at("vitaldb_windows"), at("foundation_model"),
                                  resume=resume and storage.exists(at("foundation_model", "ray", RUN_NAME))),
          after=["windows"])

    raw = raw_folder(cfg.butppg_raw_dir)

    def prepare_butppg(resume):
        if not (raw / "RECORDS").is_file():
            download(raw, cfg.physionet_url)
        tasks.prepare_butppg(raw, at("but_ppg"), channels.select(but.channels), windows, but)

    stage("butppg", at("but_ppg"),
          {"butppg": to_jsonable(but), "channels": to_jsonable(channels), "windows": to_jsonable(windows),
           "raw_dir": str(raw)}, prepare_butppg)
    pretrained = at("foundation_model", "best_model.pt")
    stage("finetune", at("but_ppg_finetuned"), to_jsonable(fine),
          lambda resume: finetune(fine, pretrained, at("but_ppg"), at("but_ppg_finetuned"),
                                  resume=resume and storage.exists(at("but_ppg_finetuned", "ray", RUN_NAME))),
          after=["pretrain", "butppg"])
    if search is not None:
        stage("tune", at("tune"), {"search": to_jsonable(search), "base": to_jsonable(fine)},
              lambda resume: run_search(search, fine, pretrained, at("but_ppg"), at("tune"),
                                        resume=resume and storage.is_file(at("tune", "finetune_schedules", STATE))),
              after=["pretrain", "butppg"])
    if cfg.embed is not None:
        emb = {**EMBED_KEYS, **cfg.embed}

        def run_embed(resume):
            storage.remove_tree(at("embeddings", "embeddings"))  # an interrupted run's part: cheap to redo
            embed(pretrained, at("vitaldb_windows", emb["split"]), at("embeddings"), batch_size=emb["batch_size"],
                  tokens=emb["tokens"])

        stage("embed", at("embeddings"), emb, run_embed, after=["windows", "pretrain"])
    storage.write_text(at("pipeline.json"), json.dumps({"config": to_jsonable(cfg), "stages": records}, indent=1))
    ran = [r["stage"] for r in records if r["status"] == "ran"]
    print(f"[pipeline] done: ran {', '.join(ran) or 'nothing'}; skipped "
          f"{', '.join(r['stage'] for r in records if r['status'] == 'skipped') or 'nothing'} -> {out}", flush=True)
    for line in summary(out):
        print(f"[pipeline] {line}", flush=True)
    return records


def summary(out: str) -> list[str]:
    """What the pipeline in ``out`` built, read back from its artifacts (those present): counts,
    the headline figures with how much they can be trusted, what to open first, the next command."""
    at = functools.partial(storage.join, out)

    def read(*names):
        return json.loads(storage.read_text(at(*names))) if storage.is_file(at(*names)) else None

    lines, windows = [], read("vitaldb_windows", "manifest.json")
    if windows and {"train", "val"} <= set(windows["splits"]):
        train, val = windows["splits"]["train"], windows["splits"]["val"]
        lines.append(f"windows: {train['windows_kept']} train + {val['windows_kept']} val from "
                     f"{train['cases_ok'] + val['cases_ok']} VitalDB cases -> {at('vitaldb_windows')} "
                     "(manifest.json: what was rejected and why)")
    history = read("foundation_model", "training_history.json")
    if history:
        best = min(history, key=lambda h: h["val_loss"])
        lines.append(f"foundation model: best val loss {best['val_loss']:.4f} (masked MSE {best['val_masked_mse']:.4f}; "
                     f"1.0 = predicting zero) at epoch {best['epoch']} of {len(history)} -> "
                     f"{at('foundation_model', 'best_model.pt')}")
    metrics = read("but_ppg_finetuned", "test_metrics.json")
    if metrics:
        test = metrics["test"]
        lines.append(f"PPG quality: test AUROC {test['auroc']:.3f}, balanced accuracy {test['balanced_accuracy']:.3f} "
                     f"on {test['n']} BUT-PPG records ({test['positives']} good) -> "
                     f"{at('but_ppg_finetuned', 'test_metrics.json')}")
        if test["n"] < 30 or (history and len(history) < 10):
            lines.append("this was a smoke test of the installation, not a result: with so few records and epochs "
                         "the figures vary from run to run (README: what these figures mean)")
    if storage.is_file(at("tune", "finetune_schedules", "best_config.yaml")):
        lines.append(f"schedule search: the best trial's config -> {at('tune', 'finetune_schedules', 'best_config.yaml')}")
    embedded = read("embeddings", "manifest.json")
    if embedded:
        lines.append(f"embeddings: {embedded['embeddings']} windows -> {at('embeddings')}")
    if metrics:
        lines += [f"open first: {at('but_ppg_finetuned', 'learning_curves.png')} and "
                  f"{at('foundation_model', 'reconstruction.png')}",
                  f"next: biofm predict --model {at('but_ppg_finetuned', 'best_model.pt')} --input <folder of "
                  "recordings> --output predictions"]
    return lines
