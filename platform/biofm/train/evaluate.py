"""Evaluating a pretrained model: masked-cell MSE against simple baselines, and the smoke test."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from biofm import storage
from biofm.errors import BiofmError
from biofm.train import checkpoint


def iter_windows(split_dir: str | Path, channels, batch_size: int = 256):
    """Yield ``(signal [B, C, T] float32, case_ids, window_idx)`` of ``channels``, files by name,
    windows in file order (through the training loops' batches)."""
    from biofm.train.batches import WindowBatches, scan

    batches = WindowBatches(scan(str(split_dir), channels), ["signal", "case_id", "window_idx"], batch_size)
    for b in batches.epoch(0):
        yield b["signal"].numpy(), b["case_id"].tolist(), b["window_idx"].tolist()


def first_windows(split_dir: str | Path, channels, n: int):
    """The first ``n`` windows of a split (deterministic: files by name, windows by index)."""
    xs, cases, idx = [], [], []
    for x, c, i in iter_windows(split_dir, channels):
        xs.append(x), cases.extend(c), idx.extend(i)
        if len(cases) >= n:
            break
    if not cases:
        raise BiofmError(f"no windows in {split_dir}")
    return np.concatenate(xs)[:n], cases[:n], idx[:n]


MIN_WINDOWS = 100  # below this many windows evaluate-ssl's figures mean little


def interpolate_masked(x: np.ndarray, mask: np.ndarray, patch: int) -> np.ndarray:
    """Baseline: fill masked samples ``[B, C, T]`` by linear interpolation between the nearest
    unmasked samples (holding the edge value past the ends)."""
    keep = ~np.repeat(mask, patch, axis=-1)[..., :x.shape[-1]]
    out = np.zeros_like(x)
    t = np.arange(x.shape[-1])
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            if keep[b, c].any():
                out[b, c] = np.interp(t, t[keep[b, c]], x[b, c, keep[b, c]])
    return out


def evaluate_ssl(checkpoint_path: str | Path, data_dir: str | Path, split: str = "val") -> dict:
    """Masked-cell MSE per channel of the model, of predicting zero (the z-scored mean) and of
    linear interpolation, on the same fixed masks."""
    from biofm.model.ssl import patch_samples
    from biofm.dataset import check_data_spec, read_data_spec
    from biofm.model.ssl import window_masks

    model = load_pretrained(checkpoint_path)
    desc = checkpoint.load(checkpoint_path)["description"]
    cfg, channels = desc["pretrain_config"], desc["channels"]
    split_dir = storage.join(data_dir, split)
    check_data_spec(desc["data_spec"], read_data_spec(split_dir), str(split_dir))
    patch, patches = model.patch, model.patches
    sq = {k: np.zeros(len(channels)) for k in ("model", "zero", "linear_interp")}
    count, windows = np.zeros(len(channels)), 0
    for x, cases, idx in iter_windows(split_dir, channels):
        mask = window_masks(cases, idx, len(channels), patches, cfg["mask_ratio"], cfg["val_mask_seed"],
                            cfg["mask_same_across_channels"])
        with torch.no_grad():
            recon = model(torch.from_numpy(x), mask)[0].numpy()
        cells = patch_samples(mask, patch, x.shape[-1]).numpy()
        for name, pred in (("model", recon), ("zero", np.zeros_like(x)),
                           ("linear_interp", interpolate_masked(x, mask.numpy(), patch))):
            sq[name] += (((pred - x) ** 2) * cells).sum(axis=(0, 2))
        count += cells.sum(axis=(0, 2))
        windows += len(x)
    per_channel = {ch: {k: float(v[c] / count[c]) for k, v in sq.items()} for c, ch in enumerate(channels)}
    overall = {k: float(v.sum() / count.sum()) for k, v in sq.items()}
    warnings = [f"the {split} split has {windows} windows: too few for these figures to mean much (want >= "
                f"{MIN_WINDOWS})"] if windows < MIN_WINDOWS else []
    warnings += [f"{ch}: the model (masked MSE {v['model']:.4f}) does not beat {name} ({v[name]:.4f})"
                 for ch, v in per_channel.items() for name in ("zero", "linear_interp") if not v["model"] < v[name]]
    return {"checkpoint": str(checkpoint_path), "split": split, "windows": windows,
            "mask_ratio": cfg["mask_ratio"], "masked_mse": {"overall": overall, **per_channel}, "warnings": warnings}


def format_table(result: dict) -> str:
    """Masked MSE per channel of the model and its baselines, then the warnings."""
    rows = [f"{'channel':10s} {'model':>10s} {'zero':>10s} {'interp':>10s}"]
    for ch, v in result["masked_mse"].items():
        rows.append(f"{ch:10s} {v['model']:10.4f} {v['zero']:10.4f} {v['linear_interp']:10.4f}")
    return "\n".join(rows + [f"warning: {w}" for w in result["warnings"]])


def smoke(data_dir: str | Path, output_dir: str | Path, max_windows: int = 64, batch_size: int = 8,
          seed: int = 0) -> dict:
    """Train one CPU epoch on the first ``max_windows`` real windows and check the model works.

    Writes ``best_model.pt`` and ``smoke_metrics.json`` (each check passed or failed)."""
    from biofm.config import PretrainConfig, to_jsonable
    from biofm.model.ssl import MaskedSignalModel, MultiResolutionSTFTLoss, masked_mse, random_mask, ttm_config
    from biofm.dataset import read_data_spec

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    cfg = PretrainConfig(batch_size=batch_size, epochs=1, lr=1e-3)
    split_dir = storage.join(data_dir, "train")
    x, _, _ = first_windows(split_dir, cfg.channels, max_windows)
    if len(x) < batch_size:
        raise BiofmError(f"{split_dir} has {len(x)} windows; the smoke test needs at least {batch_size}")
    model = MaskedSignalModel(ttm_config(len(cfg.channels), cfg.num_layers, cfg.d_model, dropout=cfg.dropout))
    stft = MultiResolutionSTFTLoss(cfg.stft_ffts)
    patches, patch = model.patches, model.patch
    g = torch.Generator().manual_seed(seed)
    fixed_mask = random_mask(len(x), len(cfg.channels), patches, cfg.mask_ratio, generator=g)
    data = torch.from_numpy(x)

    def loss_on_all():
        model.eval()
        with torch.no_grad():
            recon, _ = model(data, fixed_mask)
            return float(masked_mse(recon, data, fixed_mask, patch) + cfg.stft_weight * stft(recon, data))

    before = loss_on_all()
    with torch.no_grad():
        probe = data[:batch_size]
        shapes = {"input": list(probe.shape), "tokens": list(model.encoder.tokens(probe).shape),
                  "output": list(model(probe, fixed_mask[:batch_size])[0].shape)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    step_losses = []
    for start in range(0, len(x) - batch_size + 1, batch_size):
        xb = data[start:start + batch_size]
        mask = random_mask(len(xb), len(cfg.channels), patches, cfg.mask_ratio, generator=g)
        recon, _ = model(xb, mask)
        loss = masked_mse(recon, xb, mask, patch) + cfg.stft_weight * stft(recon, xb)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step_losses.append(loss.item())
    after = loss_on_all()
    finite = all(np.isfinite(step_losses + [before, after])) and all(
        torch.isfinite(p).all() for p in model.parameters())
    T, C = x.shape[-1], len(cfg.channels)
    checks = {
        "input_shape": shapes["input"] == [batch_size, C, T],
        "token_shape": shapes["tokens"] == [batch_size, patches, cfg.d_model],
        "output_shape": shapes["output"] == [batch_size, C, T],
        "finite": bool(finite),
        "loss_decreased": after < before,
    }
    spec = read_data_spec(split_dir)
    spec = {**spec, "channels": list(cfg.channels), "filters": {c: spec["filters"][c] for c in cfg.channels}}
    checkpoint.save(storage.join(output_dir, "best_model.pt"), model.state_dict(), {
        "kind": "masked_signal_model", "channels": list(cfg.channels), "data_spec": spec,
        "ttm_config": json.loads(json.dumps(model.encoder.config.to_dict(), default=str)),
        "pretrain_config": to_jsonable(cfg)})
    metrics = {"windows": len(x), "batch_size": batch_size, "shapes": shapes, "loss_before": before,
               "loss_after": after, "step_losses": step_losses, "checks": checks,
               "passed": all(checks.values()), "runtime_s": round(time.perf_counter() - t0, 2)}
    storage.write_text(storage.join(output_dir, "smoke_metrics.json"), json.dumps(metrics, indent=1))
    return metrics


def load_pretrained(path: str | Path):
    """A :class:`~biofm.model.ssl.MaskedSignalModel` from a pretraining checkpoint (CPU, eval mode)."""
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    from biofm.model.ssl import MaskedSignalModel

    blob = checkpoint.load(path)
    if blob["description"].get("kind") != "masked_signal_model":
        raise BiofmError(f"{path} is not a pretraining checkpoint")
    model = MaskedSignalModel(TinyTimeMixerConfig.from_dict(blob["description"]["ttm_config"]))
    model.load_state_dict(blob["model"])
    return model.eval()
