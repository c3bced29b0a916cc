"""Self-supervised pretraining of the TTM encoder on Ray Train (masked signal modeling).

:func:`pretrain` scans ``<data_dir>/{train,val}`` once and runs :func:`train_loop` on every
worker, which reads its share of the windows itself (:mod:`biofm.train.batches`: streamed from
Parquet, or held in memory for splits up to ``cache_mb``). Each epoch reports metrics and a
checkpoint (Ray keeps the best by val loss and the last); a failed worker restarts from the last
checkpoint, and rerunning with ``resume`` continues an interrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

import torch

from biofm import output, storage
from biofm.config import PretrainConfig, to_jsonable
from biofm.errors import BiofmError, ConfigError
from biofm.model.ssl import (MaskedSignalModel, MultiResolutionSTFTLoss, alignment_loss, band_bins, band_spectral_mse,
                              masked_mse, patch_samples, present_channels, random_mask, targets, window_masks)
from biofm.model.ttm_weights import describe as describe_init
from biofm.model.ttm_weights import initial_model
from biofm.train import checkpoint
from biofm.train.batches import Split, WaitClock, WindowBatches, corpus, data_wait_note, reader_threads, scan
from biofm.train.ray_run import (check_run_dir, fit, mixed_precision, report_epoch, restored_training, seed_epoch,
                                 worker_print)
from biofm.train.step import adamw, compiled_for_batch, set_tf32, step, use_compile, where_kept
from biofm.train.tracking import Tracker

def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _allreduce(values: torch.Tensor, device) -> list[float]:
    """``values`` summed over the DDP ranks, read back (the one host sync of an epoch's sums)."""
    t = values.to(device, torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


TERMS = ("loss", "mse", "stft", "spectral", "align")  # what pretraining_losses returns, in order


def pretraining_losses(model, cfg: PretrainConfig, spec: dict, device="cpu", autocast=contextlib.nullcontext):
    """``losses(x, mask)``: the 0-d terms :data:`TERMS` stacked, of ``model`` (a MaskedSignalModel,
    or it wrapped by DDP) on windows ``x`` ``[B, C, T]`` under ``mask`` ``[B, C, P]``: the loss
    (``cfg``'s weighted sum), the masked MSE of :func:`~biofm.model.ssl.targets`, the seed's STFT
    term, the in-band spectral term (``spec``: the data spec, its filters' bands) and the PPG-ECG
    alignment; a term of weight 0 is not computed (0). Absent channels (rows of zeros: a source
    without them) are input as zeros, as in fine-tuning, and left out of every term."""
    core = model.module if hasattr(model, "module") else model
    patch, zero = core.patch, torch.zeros((), device=device)
    stft = MultiResolutionSTFTLoss(cfg.stft_ffts).to(device) if cfg.stft_weight else None
    bins = band_bins([spec["filters"][c]["band_hz"] for c in cfg.channels], spec["window_samples"],
                     spec["sample_rate_hz"]).to(device) if cfg.spectral_weight else None
    pair = (list(cfg.channels).index("PPG"), list(cfg.channels).index("ECG")) if cfg.align_weight else None

    def losses(x, mask):
        present = present_channels(x)
        masked = mask & present[..., None]
        with autocast():
            recon, _ = model(x, mask)
            align = alignment_loss(core, x, present, *pair, cfg.align_temperature) if pair else zero
        recon, target = recon.float(), targets(x, patch, cfg.target_norm)
        mse = masked_mse(recon, target, masked, patch)
        spectrum = stft(recon, target, present) if stft is not None else zero
        band = (band_spectral_mse(recon, target, patch_samples(masked, patch, x.shape[-1]).float(), bins)
                if bins is not None else zero)
        terms = torch.stack([mse, spectrum, band, align.float()])
        weights = torch.tensor([cfg.mse_weight, cfg.stft_weight, cfg.spectral_weight, cfg.align_weight], device=terms.device)
        return torch.cat([(weights * terms).sum()[None], terms])
    return losses


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. ``config``: ``cfg`` (PretrainConfig fields), ``train`` and
    ``val`` (:class:`~biofm.train.batches.Split`), ``description`` (model config, channels, data spec),
    ``initial_state`` (the weights to start from), ``output_dir`` (for TensorBoard)."""
    import ray.train
    import ray.train.torch
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    output.configure_worker(config["quiet"])
    cfg = PretrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray pins a worker to one torch thread per CPU it reserved; the CPU left for Ray Data's
    # reads is mostly idle, so the node's cores are shared among its workers instead.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    model = MaskedSignalModel.of(TinyTimeMixerConfig.from_dict(config["description"]["ttm_config"]), config["cfg"])
    model.load_state_dict(config["initial_state"])
    optimizer = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast, scaler = mixed_precision(cfg.amp, device)
    set_tf32(cfg.tf32)
    state = {"epoch": 0, "global_step": 0, "bad_steps": 0, "history": [], "attempts": 0}
    blob = restored_training()
    if blob:
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["training"]["optimizer"])
        if blob["training"].get("scaler"):  # empty where AMP was off (CPU, bf16); absent before it was saved
            scaler.load_state_dict(blob["training"]["scaler"])
        state |= {k: blob["training"][k] for k in state if k in blob["training"]}  # "attempts": absent in older runs
        if rank == 0:
            worker_print(f"[pretrain] continuing from the checkpoint of epoch {state['epoch']}")
    state["attempts"] += 1
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    channels, patches, patch = len(cfg.channels), core.patches, core.patch
    sources = config["train"].sources
    train_batches, val_batches = loaders(cfg, config["train"], config["val"], rank, world, device,
                                         ctx.get_local_world_size())
    tracker = Tracker(config["output_dir"], "pretrain", config["cfg"]) if rank == 0 else None
    total_steps = cfg.epochs * len(train_batches)
    warmup = max(1, int(cfg.warmup_epochs * len(train_batches)))
    peak_lr = cfg.peak_lr(world)

    losses = pretraining_losses(model, cfg, config["description"]["data_spec"], device, autocast)
    compiling = use_compile(cfg.compile, device)
    forward = compiled_for_batch(losses, cfg.batch_size, device, world) if compiling else losses
    params, first_step_s, started = list(model.parameters()), None, time.perf_counter()
    for epoch in range(state["epoch"], cfg.epochs):
        seed_epoch(cfg.seed, rank, epoch)
        model.train()
        clock = WaitClock(train_batches.epoch(epoch))
        sums = torch.zeros(len(TERMS) + 2, dtype=torch.float64, device=device)  # TERMS (x windows), windows, skipped
        per_source = torch.zeros(len(sources), dtype=torch.float64, device=device)
        for batch in clock:
            x = batch["signal"]
            mask = random_mask(len(x), channels, patches, cfg.mask_ratio, cfg.mask_same_across_channels, device=device)
            for group in optimizer.param_groups:
                group["lr"] = peak_lr * _lr_factor(state["global_step"], warmup, total_steps)
            terms = forward(x, mask)
            skipped = step(terms[0], optimizer, scaler, params, cfg.grad_clip)
            kept = 1 - skipped
            sums[:len(TERMS)] += where_kept(skipped, terms.detach().double() * len(x))
            sums[len(TERMS):] += torch.stack([kept * len(x), skipped])
            per_source.index_add_(0, batch["source"], kept.double().expand(len(x)))
            state["global_step"] += 1
            first_step_s = first_step_s or time.perf_counter() - started
        ingest = clock.metrics()
        *train_sums, n, bad = _allreduce(torch.cat([sums[:-1], sums[-1:] / world]), device)
        source_windows = _allreduce(per_source, device)
        state["bad_steps"] += round(bad)
        if state["bad_steps"] > cfg.max_bad_steps:
            raise FloatingPointError(f"NaN/Inf loss or gradient in {state['bad_steps']} steps by the end of epoch "
                                     f"{epoch + 1} (max_bad_steps={cfg.max_bad_steps})")

        model.eval()
        vals = torch.zeros(3, dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in val_batches.epoch(epoch):
                x = batch["signal"]
                mask = window_masks(batch["case_id"], batch["window_idx"], channels, patches,
                                    cfg.mask_ratio, cfg.val_mask_seed, cfg.mask_same_across_channels).to(device)
                terms = forward(x, mask)
                vals[:2] += terms[:2].double() * len(x)
                vals[2] += len(x)
        val_loss, val_mse, n_val = _allreduce(vals, device)
        metrics = {
            "epoch": epoch + 1,
            **{f"train_{term}": total / max(n, 1) for term, total in zip(TERMS, train_sums)},
            "val_loss": val_loss / max(n_val, 1), "val_masked_mse": val_mse / max(n_val, 1),
            "windows_per_s": n / ingest["train_s"], **ingest,
            "lr": optimizer.param_groups[0]["lr"], "bad_steps": state["bad_steps"], "workers": world,
            "attempt": state["attempts"],  # 1 for the run's first start, +1 per restart or resume
            "compiled": compiling, "first_step_s": first_step_s,  # this attempt's first; compiled: the compile time
            **{f"train_windows_{name}": int(k) for name, k in zip(sources, source_windows)},
        }
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        report_epoch(metrics, rank, lambda path: checkpoint.save(
            path, core.state_dict(), config["description"],
            {**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}))
        if rank == 0:
            tracker.log(metrics, epoch + 1)
            worker_print(f"[pretrain] epoch {epoch + 1}/{cfg.epochs} train {metrics['train_loss']:.4f} "
                         f"val {metrics['val_loss']:.4f} (masked MSE {metrics['val_masked_mse']:.4f}) "
                         f"{metrics['windows_per_s']:.0f} windows/s, {data_wait_note(metrics)}")
    if tracker:
        tracker.close()


def loaders(cfg: PretrainConfig, train: Split, val: Split, rank: int = 0, world: int = 1,
            device=None, local_workers: int = 1) -> tuple[WindowBatches, WindowBatches]:
    """Worker ``rank``'s batches: training windows (shuffled, an equal share per worker) and
    validation windows with their ids (in order, each once), held in memory up to ``cache_mb``,
    read by :func:`~biofm.train.batches.reader_threads` threads (``local_workers``: on the node)."""
    kw = {"rank": rank, "world": world, "cache_mb": cfg.cache_mb, "device": device,
          "read_ahead": reader_threads(local_workers)}
    return (WindowBatches(train, ["signal", "source"], cfg.batch_size, train=True, seed=cfg.seed,
                          shuffle_buffer=cfg.shuffle_buffer, **kw),
            WindowBatches(val, ["signal", "case_id", "window_idx"], cfg.batch_size, **kw))


def pretrain(cfg: PretrainConfig, data_dir: str | Path | list, output_dir: str | Path, resume: bool = False,
             address: str | None = None) -> dict:
    """Pretrain on ``<data_dir>/{train,val}`` (several, or a corpus YAML with a sampling weight per
    source: one corpus; a source lacking a channel of
    ``cfg.channels`` gives it as absent, a source without ``val/`` trains only) and write the
    artifacts to ``output_dir`` (each a local path or a URI); returns the final metrics."""
    from biofm.dataset import same_data
    from biofm.ray_connect import ensure_ray

    dirs, names, weights = corpus_sources(data_dir)
    output_dir = storage.normalize(output_dir)
    ray_dir = check_run_dir(output_dir, resume, "pretraining")
    absent_ok = len(dirs) > 1
    trains = [scan(storage.join(d, "train"), cfg.channels, absent_ok) for d in dirs]
    with_val = [k for k, d in enumerate(dirs) if len(dirs) == 1 or storage.list_files(storage.join(d, "val"), ".parquet")]
    vals = [scan(storage.join(dirs[k], "val"), cfg.channels, absent_ok) for k in with_val or [0]]
    for k, part in zip(with_val, vals):
        if not same_data(part.spec, trains[k].spec):
            raise ConfigError(f"train and val windows in {dirs[k]} were made with different settings")
    train, val = corpus(trains, names, weights), corpus(vals, [names[k] for k in with_val])
    spec = {k: v for k, v in train.spec.items() if len(dirs) > 1 or k != "sources"}
    if train.windows < cfg.num_workers or val.windows == 0:
        raise BiofmError(f"{', '.join(dirs)} has {train.windows} train and {val.windows} val windows: too few "
                         f"for {cfg.num_workers} worker(s)")
    if len(dirs) > 1:
        print(f"[pretrain] corpus of {len(dirs)} sources, train windows: " + ", ".join(
            f"{k} {n}" + (f" (weight {w:g})" if w != 1 else "") for (k, n), w in zip(train.windows_per_source().items(),
                                                                                  weights)), flush=True)
    model, init = initial_model(cfg, spec["window_samples"])
    ensure_ray(address)
    model_cfg = model.encoder.config
    cfg = dataclasses.replace(cfg, d_model=model_cfg.d_model, num_layers=model_cfg.num_layers,
                              patch_length=model_cfg.patch_length)
    if not resume:   # a resumed run's workers say which checkpoint they continue from
        print(f"[pretrain] starting from {describe_init(init)}", flush=True)
    description = {"kind": "masked_signal_model",
                   "ttm_config": json.loads(json.dumps(model_cfg.to_dict(), default=str)),
                   "channels": list(cfg.channels), "data_spec": spec, "pretrain_config": to_jsonable(cfg),
                   "init": {k: v for k, v in init.items() if k not in ("new", "unused")}}
    loop_config = {"cfg": dataclasses.asdict(cfg), "description": description, "initial_state": model.state_dict(),
                   "train": train, "val": val, "output_dir": output_dir}
    best, history = fit(train_loop, loop_config, cfg, ray_dir, "val_loss", "min")
    write_artifacts(output_dir, best, history, cfg, dirs, init, [dirs[k] for k in with_val or [0]])
    return history[-1]


def loss_formula(cfg: PretrainConfig) -> str:
    """The loss in words: ``MSE + 0.3 x STFT``."""
    terms = [(cfg.mse_weight, "MSE"), (cfg.stft_weight, "STFT"), (cfg.spectral_weight, "spectral"),
             (cfg.align_weight, "alignment")]
    return " + ".join(name if w == 1 else f"{w:g} x {name}" for w, name in terms if w)


def corpus_sources(data_dir: str | Path | list) -> tuple[list[str], list[str], list[float]]:
    """``(folders, names, weights)`` of a data folder, a list of them, or a corpus YAML
    (:class:`~biofm.config.CorpusConfig`; its relative paths from the YAML's folder). A name is the
    folder's (the path where two share one), as the history names its windows."""
    from biofm.config import CorpusConfig, load_config

    if isinstance(data_dir, (str, Path)) and str(data_dir).endswith((".yaml", ".yml")):
        cfg, base = load_config(CorpusConfig, data_dir), Path(data_dir).parent
        dirs = [s.path if storage.is_uri(s.path) or Path(s.path).is_absolute() else str(base / s.path) for s in cfg.sources]
        given, weights = [s.name for s in cfg.sources], [s.weight for s in cfg.sources]
    else:
        dirs = list(data_dir) if isinstance(data_dir, (list, tuple)) else [data_dir]
        given, weights = [""] * len(dirs), [1.0] * len(dirs)
    dirs = [storage.normalize(d) for d in dirs]
    names = [g or storage.name(d) for g, d in zip(given, dirs)]
    if len(set(names)) < len(names):
        names = [g or d for g, d in zip(given, dirs)]
    if len(set(names)) < len(names):
        raise ConfigError(f"two corpus sources are named alike: {names}")
    return dirs, names, weights


def write_artifacts(output_dir: str, best: dict, history: list[dict], cfg: PretrainConfig, dirs: list[str],
                    init: dict, val_dirs: list[str]) -> None:
    """best_model.pt, training_history.json, training_config.json, encoder/ (Hugging Face),
    ssl_evaluation.json (the best model's masked MSE against the floors on the val windows of
    ``val_dirs``: :func:`~biofm.train.evaluate.evaluate_ssl`), PNGs (the reconstructions of the val
    windows of the first source that holds the most of the model's channels)."""
    from biofm.train.evaluate import FLOORS, evaluate_ssl, load_pretrained
    from biofm.train.plots import plot_history, plot_reconstructions

    out = functools.partial(storage.join, output_dir)
    checkpoint.save(out("best_model.pt"), best["model"], best["description"])
    storage.write_text(out("training_history.json"), json.dumps(history, indent=1))
    storage.write_text(out("training_config.json"), json.dumps(
        {**to_jsonable(cfg), "init": init, "data_dir": dirs[0] if len(dirs) == 1 else dirs,
         "best_epoch": best["training"]["epoch"]}, indent=1))
    model = load_pretrained(out("best_model.pt"))
    with storage.local_folder(out("encoder")) as d:
        model.encoder.save_pretrained(d)
    weighted = {"stft": ("the seed's multi-resolution STFT loss", cfg.stft_weight),
                "spectral": ("in-band spectral error of the masked cells", cfg.spectral_weight),
                "align": ("PPG-ECG alignment (InfoNCE)", cfg.align_weight)}
    plot_history(history, {f"total loss ({loss_formula(cfg)})": ("loss", ("train_loss", "val_loss")),
                           "masked-cell MSE": (f"MSE ({cfg.target_norm}-normalised target)", ("train_mse", "val_masked_mse")),
                           **{title: (term, (f"train_{term}",)) for term, (title, w) in weighted.items() if w}},
                 out("loss_curves.png"))
    from biofm.dataset import read_data_spec

    shown = max(val_dirs, key=lambda d: len(set(cfg.channels) & set(read_data_spec(storage.join(d, "val"))["channels"])))
    plot_reconstructions(model, storage.join(shown, "val"), best["description"], out("reconstruction.png"))
    result = evaluate_ssl(out("best_model.pt"), val_dirs, "val")
    storage.write_text(out("ssl_evaluation.json"), json.dumps(result, indent=1))
    v, words = result["masked_mse"]["overall"], {"zero": "zeros", "linear_interp": "linear interpolation",
                                                 "period_copy": "the one-period copy"}
    beaten, not_beaten = ([f"{words[f]} {v[f]:.3f}" for f in FLOORS if (f in result["beats"]) == b] for b in (True, False))
    print(f"[pretrain] best model's val masked MSE {v['model']:.3f} ({cfg.target_norm}-normalised target, "
          f"{result['windows']} windows): " + "; ".join(
              part for part in (f"beats {', '.join(beaten)}" if beaten else "",
                                f"does not beat {', '.join(not_beaten)}" if not_beaten else "") if part)
          + f" ({out('ssl_evaluation.json')})", flush=True)
