"""Self-supervised pretraining of the TTM encoder on Ray Train (masked signal modeling).

:func:`pretrain` streams ``<data_dir>/{train,val}`` windows through Ray Data into a
``TorchTrainer`` (small splits are cached in the object store instead, see ``cache_mb``); :func:`train_loop` is what every worker runs. Each epoch reports metrics and a
checkpoint (Ray keeps the best by val loss and the last); a failed worker restarts from the last
checkpoint, and rerunning with ``resume`` continues an interrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from biofm import storage
from biofm.config import PretrainConfig, to_jsonable
from biofm.errors import BiofmError, ConfigError
from biofm.model.ssl import MaskedSignalModel, MultiResolutionSTFTLoss, masked_mse, random_mask, ttm_config
from biofm.train import checkpoint
from biofm.train.ray_run import check_run_dir, fit, mixed_precision, worker_print

def window_masks(case_ids, window_idx, channels: int, patches: int, ratio: float, seed: int,
                 same_across_channels: bool = False) -> torch.Tensor:
    """Masks ``[B, C, P]`` fixed per window (seeded by ``seed``, case id and window index), so
    validation and evaluation compare the same cells whatever order the windows arrive in."""
    masks = []
    for case, idx in zip(case_ids, window_idx):
        g = torch.Generator().manual_seed(seed ^ zlib.crc32(f"{case}:{int(idx)}".encode()))
        masks.append(random_mask(1, channels, patches, ratio, same_across_channels, generator=g))
    return torch.cat(masks)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _allreduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. ``config``: ``cfg`` (PretrainConfig fields),
    ``steps_per_epoch``, ``description`` (model config, channels, data spec)."""
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray pins a worker to one torch thread per CPU it reserved; the CPU left for Ray Data's
    # reads is mostly idle, so the node's cores are shared among its workers instead.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    model = MaskedSignalModel(ttm_config(len(cfg.channels), cfg.num_layers, cfg.d_model, dropout=cfg.dropout))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "global_step": 0, "bad_steps": 0, "history": []}
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            blob = checkpoint.load(d)
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["training"]["optimizer"])
        state = {k: blob["training"][k] for k in state}
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    stft = MultiResolutionSTFTLoss(cfg.stft_ffts).to(device)
    autocast, scaler = mixed_precision(cfg.amp, device)
    channels, patches, patch = len(cfg.channels), core.encoder.config.num_patches, core.patch
    total_steps = cfg.epochs * config["steps_per_epoch"]
    warmup = max(1, int(cfg.warmup_epochs * config["steps_per_epoch"]))

    def losses(x, mask):
        with autocast():
            recon, _ = model(x, mask)
        recon = recon.float()
        mse, spec = masked_mse(recon, x, mask, patch), stft(recon, x)
        return mse + cfg.stft_weight * spec, mse, spec

    def skip(reason, step):
        state["bad_steps"] += 1
        optimizer.zero_grad(set_to_none=True)
        if state["bad_steps"] > cfg.max_bad_steps:
            raise FloatingPointError(f"{reason} at epoch {state['epoch'] + 1}, step {step}: "
                                     f"{state['bad_steps']} bad steps (max_bad_steps={cfg.max_bad_steps})")

    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        sums, wait, first_wait, t0 = np.zeros(4), 0.0, 0.0, time.perf_counter()
        batches = ray.train.get_dataset_shard("train").iter_batches(
            batch_size=cfg.batch_size, batch_format="numpy", local_shuffle_buffer_size=4 * cfg.batch_size,
            prefetch_batches=4)
        step, t_wait = 0, time.perf_counter()
        for step, batch in enumerate(batches, 1):
            waited = time.perf_counter() - t_wait
            wait += waited
            if step == 1:
                first_wait = waited
            x = torch.from_numpy(batch["signal"]).float().to(device)
            mask = random_mask(len(x), channels, patches, cfg.mask_ratio, cfg.mask_same_across_channels, device=device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(state["global_step"], warmup, total_steps)
            loss, mse, spec = losses(x, mask)
            if _allreduce([float(not torch.isfinite(loss))], device)[0]:  # every rank skips together
                skip("NaN/Inf loss", step)
            else:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if not torch.isfinite(grad_norm):  # identical on all ranks after DDP's all-reduce
                    skip("NaN/Inf gradient", step)
                    scaler.update()
                else:
                    scaler.step(optimizer)
                    scaler.update()
                    state["global_step"] += 1
                    sums += [loss.item() * len(x), mse.item() * len(x), spec.item() * len(x), len(x)]
            t_wait = time.perf_counter()
        train_s = time.perf_counter() - t0
        loss_sum, mse_sum, spec_sum, n = _allreduce(list(sums), device)

        model.eval()
        vals = np.zeros(3)
        with torch.no_grad():
            for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
                x = torch.from_numpy(batch["signal"]).float().to(device)
                mask = window_masks(batch["case_id"], batch["window_idx"], channels, patches,
                                    cfg.mask_ratio, cfg.val_mask_seed, cfg.mask_same_across_channels).to(device)
                loss, mse, _ = losses(x, mask)
                vals += [loss.item() * len(x), mse.item() * len(x), len(x)]
        val_loss, val_mse, n_val = _allreduce(list(vals), device)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(n, 1), "train_mse": mse_sum / max(n, 1), "train_stft": spec_sum / max(n, 1),
            "val_loss": val_loss / max(n_val, 1), "val_masked_mse": val_mse / max(n_val, 1),
            "windows_per_s": n / max(train_s, 1e-9), "data_wait_fraction": wait / max(train_s, 1e-9),
            "first_batch_wait_s": first_wait, "train_s": train_s,
            "lr": optimizer.param_groups[0]["lr"], "bad_steps": state["bad_steps"], "workers": world,
        }
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                checkpoint.save(Path(d) / checkpoint.FILENAME, core.state_dict(), config["description"],
                                {**state, "optimizer": optimizer.state_dict()})
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        if rank == 0:
            worker_print(f"[pretrain] epoch {epoch + 1}/{cfg.epochs} train {metrics['train_loss']:.4f} "
                         f"val {metrics['val_loss']:.4f} (masked MSE {metrics['val_masked_mse']:.4f}) "
                         f"{metrics['windows_per_s']:.0f} windows/s")


def windows_dataset(split_dir: str, channels: tuple[str, ...], cache_mb: float = 0.0):
    """Ray Dataset of ``signal`` ``[C, T]`` (the requested channels, in order), ``case_id``,
    ``window_idx`` from Parquet, plus the data spec with those channels. Read lazily, or once
    into the object store when the split's files total at most ``cache_mb`` MB: each streamed
    epoch costs Ray Data seconds of start-up (3-5 s for a small split on 2 cores), a cached one
    about 0.1 s."""
    import ray.data

    from biofm.preprocess import read_data_spec

    ray.data.DataContext.get_current().enable_progress_bars = False  # one line per epoch instead
    spec = read_data_spec(split_dir)
    missing = [c for c in channels if c not in spec["channels"]]
    if missing:
        raise ConfigError(f"{split_dir} has channels {spec['channels']}, not {missing}")
    index = [spec["channels"].index(c) for c in channels]
    ds = ray.data.read_parquet(split_dir).select_columns(["signal", "case_id", "window_idx"])
    if index != list(range(len(spec["channels"]))):
        ds = ds.map_batches(lambda b: {**b, "signal": b["signal"][:, index]}, batch_format="numpy")
    if sum(storage.list_files(split_dir, ".parquet").values()) <= cache_mb * 1e6:
        ds = ds.materialize()
    return ds, {**spec, "channels": list(channels), "filters": {c: spec["filters"][c] for c in channels}}


def pretrain(cfg: PretrainConfig, data_dir: str | Path, output_dir: str | Path, resume: bool = False,
             address: str | None = None) -> dict:
    """Pretrain on ``<data_dir>/{train,val}`` and write the artifacts to ``output_dir`` (each a
    local path or a URI); returns the final metrics."""
    from biofm.preprocess import ensure_ray, same_data

    data_dir, output_dir = storage.normalize(data_dir), storage.normalize(output_dir)
    ray_dir = check_run_dir(output_dir, resume, "pretraining")
    ensure_ray(address)
    train_ds, spec = windows_dataset(storage.join(data_dir, "train"), cfg.channels, cfg.cache_mb)
    val_ds, val_spec = windows_dataset(storage.join(data_dir, "val"), cfg.channels, cfg.cache_mb)
    if not same_data(spec, val_spec):
        raise ConfigError(f"train and val windows in {data_dir} were made with different settings")
    n_train = train_ds.count()
    if n_train == 0 or val_ds.count() == 0:
        raise BiofmError(f"{data_dir} has no train or no val windows")
    model_cfg = ttm_config(len(cfg.channels), cfg.num_layers, cfg.d_model, dropout=cfg.dropout).to_dict()
    description = {"kind": "masked_signal_model", "ttm_config": json.loads(json.dumps(model_cfg, default=str)),
                   "channels": list(cfg.channels), "data_spec": spec, "pretrain_config": to_jsonable(cfg)}
    loop_config = {"cfg": dataclasses.asdict(cfg), "description": description,
                   "steps_per_epoch": max(1, math.ceil(n_train / (cfg.batch_size * cfg.num_workers)))}
    best, history = fit(train_loop, loop_config, {"train": train_ds, "val": val_ds}, cfg, ray_dir, "val_loss", "min")
    write_artifacts(output_dir, best, history, cfg, data_dir)
    return history[-1]


def write_artifacts(output_dir: str, best: dict, history: list[dict], cfg: PretrainConfig, data_dir: str) -> None:
    """best_model.pt, training_history.json, training_config.json, encoder/ (Hugging Face), PNGs."""
    from biofm.train.plots import plot_history, plot_reconstructions

    out = functools.partial(storage.join, output_dir)
    checkpoint.save(out("best_model.pt"), best["model"], best["description"])
    storage.write_text(out("training_history.json"), json.dumps(history, indent=1))
    storage.write_text(out("training_config.json"), json.dumps(
        {**to_jsonable(cfg), "data_dir": data_dir, "best_epoch": best["training"]["epoch"]}, indent=1))
    model = load_pretrained(out("best_model.pt"))
    with storage.local_folder(out("encoder")) as d:
        model.encoder.ttm.save_pretrained(d)
    plot_history(history, {"total loss (MSE + w x STFT)": ("train_loss", "val_loss"),
                           "components": ("train_mse", "val_masked_mse", "train_stft")}, out("loss_curves.png"))
    plot_reconstructions(model, storage.join(data_dir, "val"), best["description"], out("reconstruction.png"))


def load_pretrained(path: str | Path) -> MaskedSignalModel:
    """A :class:`MaskedSignalModel` from a pretraining checkpoint (CPU, eval mode)."""
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    blob = checkpoint.load(path)
    if blob["description"].get("kind") != "masked_signal_model":
        raise BiofmError(f"{path} is not a pretraining checkpoint")
    model = MaskedSignalModel(TinyTimeMixerConfig.from_dict(blob["description"]["ttm_config"]))
    model.load_state_dict(blob["model"])
    return model.eval()
