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


def iter_windows(split_dir: str | Path, channels, batch_size: int = 256, labels: bool = False, split=None):
    """Yield ``(signal [B, C, T] float32, case_ids, window_idx)`` of ``channels`` (one the split
    lacks: zeros), files by name,
    windows in file order (through the training loops' batches); with ``labels``, also each
    window's ``label`` (a task's split). ``split``: a scanned :class:`~biofm.train.batches.Split`
    to read instead (a corpus; each batch then also has the windows' ``source`` indices)."""
    from biofm.train.batches import WindowBatches, scan

    split = split or scan(str(split_dir), channels, absent_ok=True)
    columns = ["signal", "case_id", "window_idx", *(["label"] if labels else []), *(["source"] if split.sources else [])]
    for b in WindowBatches(split, columns, batch_size).epoch(0):
        yield b["signal"].numpy(), b["case_id"].tolist(), b["window_idx"].tolist(), b


def first_windows(split_dir: str | Path, channels, n: int):
    """The first ``n`` windows of a split (deterministic: files by name, windows by index)."""
    xs, cases, idx = [], [], []
    for x, c, i, _ in iter_windows(split_dir, channels):
        xs.append(x), cases.extend(c), idx.extend(i)
        if len(cases) >= n:
            break
    if not cases:
        raise BiofmError(f"no windows in {split_dir}")
    return np.concatenate(xs)[:n], cases[:n], idx[:n]


MIN_WINDOWS = 100  # below this many windows evaluate-ssl's figures mean little
FLOORS = ("zero", "linear_interp", "period_copy")   # tricks a masked model must beat
PERIOD_BPM = (30.0, 200.0)   # the beat periods the one-period copy considers


def interpolate_masked(x: np.ndarray, mask: np.ndarray, patch: int) -> np.ndarray:
    """Floor: fill masked samples ``[B, C, T]`` by linear interpolation between the nearest
    unmasked samples (holding the edge value past the ends)."""
    keep = ~np.repeat(mask, patch, axis=-1)[..., :x.shape[-1]]
    out = np.zeros_like(x)
    t = np.arange(x.shape[-1])
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            if keep[b, c].any():
                out[b, c] = np.interp(t, t[keep[b, c]], x[b, c, keep[b, c]])
    return out


def beat_period(x: np.ndarray, keep: np.ndarray, fs: float) -> np.ndarray:
    """Each row's beat period in samples ``[...]`` from the autocorrelation of its visible samples
    ``x [..., T]`` (``keep``: visible), normalised by the visible pairs at each lag: the lag of
    its maximum within :data:`PERIOD_BPM`."""
    n = x.shape[-1]
    size = 1 << (2 * n - 1).bit_length()
    lo, hi = int(np.ceil(fs * 60 / PERIOD_BPM[1])), int(fs * 60 / PERIOD_BPM[0])
    v, k = np.fft.rfft(x * keep, size), np.fft.rfft(keep.astype(float), size)
    corr = np.fft.irfft(v * v.conj(), size)[..., lo:hi + 1]
    pairs = np.fft.irfft(k * k.conj(), size)[..., lo:hi + 1]
    return lo + np.argmax(np.where(pairs > n / 4, corr / np.maximum(pairs, 1), -np.inf), axis=-1)


def period_copy(x: np.ndarray, mask: np.ndarray, patch: int, fs: float) -> np.ndarray:
    """Floor: each masked sample ``[B, C, T]`` copied from one beat period earlier (period from
    :func:`beat_period`), or where that is not known (the window's first period, or itself
    masked and not yet filled), one period later; repeated until nothing more can be filled
    (a sample with no known source in reach stays 0)."""
    hidden = np.repeat(mask, patch, axis=-1)[..., :x.shape[-1]].reshape(-1, x.shape[-1])
    out = x.reshape(-1, x.shape[-1]) * ~hidden
    period = beat_period(out, ~hidden, fs)[:, None]
    n, r, t = x.shape[-1], np.arange(len(out))[:, None], np.arange(x.shape[-1])[None, :]
    earlier, later = np.clip(t - period, 0, n - 1), np.clip(t + period, 0, n - 1)
    known = ~hidden
    while True:
        from_earlier = ~known & (t - period >= 0) & known[r, earlier]
        from_later = ~known & ~from_earlier & (t + period < n) & known[r, later]
        if not (from_earlier | from_later).any():
            return out.reshape(x.shape)
        out = np.where(from_earlier, out[r, earlier], np.where(from_later, out[r, later], out))
        known = known | from_earlier | from_later


def evaluate_ssl(checkpoint_path: str | Path, data_dir, split: str = "val") -> dict:
    """Masked-cell MSE of the model and of the floors (:data:`FLOORS`: predicting zero, linear
    interpolation, the one-period copy) on the same fixed masks, in the model's target space
    (:func:`~biofm.model.ssl.targets`): overall and per channel, per source of a corpus
    (``data_dir``: a folder, several, or a corpus YAML; a source without this split is left
    out), and per class where the windows are a
    classification task's (``by_class``: e.g. per rhythm)."""
    from biofm.dataset import check_data_spec
    from biofm.model.ssl import patch_samples, recipe_of, targets, window_masks
    from biofm.train.batches import corpus, scan
    from biofm.train.pretrain import corpus_sources

    model = load_pretrained(checkpoint_path)
    desc = checkpoint.load(checkpoint_path)["description"]
    cfg, channels = recipe_of(desc), desc["channels"]
    norm, fs = cfg["target_norm"], desc["data_spec"]["sample_rate_hz"]
    dirs, names, _ = corpus_sources(data_dir)
    if len(dirs) > 1:   # a corpus: its sources with windows in this split (some train only)
        dirs, names = map(list, zip(*[(d, n) for d, n in zip(dirs, names)
                                      if storage.list_files(storage.join(d, split), ".parquet")] or [(dirs[0], names[0])]))
    parts = [scan(storage.join(d, split), channels, absent_ok=True) for d in dirs]
    for d, part in zip(dirs, parts):
        check_data_spec(desc["data_spec"], part.spec, storage.join(d, split))
    classes = {}
    for name, d in zip(names, dirs):
        manifest = storage.join(d, "manifest.json")
        task = json.loads(storage.read_text(manifest)).get("task") or {} if storage.is_file(manifest) else {}
        if task.get("classes"):
            classes[name] = task["classes"]
    labels = len(classes) == len(dirs) and len({tuple(c) for c in classes.values()}) == 1
    patch, patches = model.patch, model.patches
    kinds = ("model", *FLOORS)
    groups: dict[str, np.ndarray] = {}   # group -> squared errors [len(kinds), C] and cell counts [C]

    def add(group: str, sq: np.ndarray, cells: np.ndarray) -> None:
        total = groups.setdefault(group, np.zeros((len(kinds) + 1, len(channels))))
        total[:-1] += sq
        total[-1] += cells

    windows = {n: 0 for n in names}
    for x, cases, idx, batch in iter_windows(None, channels, labels=labels, split=corpus(parts, names)):
        mask = window_masks(cases, idx, len(channels), patches, cfg["mask_ratio"], cfg["val_mask_seed"],
                            cfg["mask_same_across_channels"])
        present = np.abs(x).max(axis=-1) > 0
        with torch.no_grad():
            recon = model(torch.from_numpy(x), mask)[0]
        target = targets(torch.from_numpy(x), patch, norm).numpy()
        preds = [recon.numpy(), *(targets(torch.from_numpy(p), patch, norm).numpy() for p in (
            np.zeros_like(x), interpolate_masked(x, mask.numpy(), patch), period_copy(x, mask.numpy(), patch, fs)))]
        cells = patch_samples(mask, patch, x.shape[-1]).numpy() * present[..., None]
        sq = np.stack([((p - target) ** 2) * cells for p in preds])     # [kinds, B, C, T]
        source = batch["source"].numpy()
        for k, name in enumerate(names):
            mine = source == k
            if mine.any():
                windows[name] += int(mine.sum())
                add(f"source:{name}", sq[:, mine].sum(axis=(1, 3)), cells[mine].sum(axis=(0, 2)))
        if labels:
            y = batch["label"].numpy()
            for c in np.unique(y):
                add(f"class:{classes[names[0]][int(c)]}", sq[:, y == c].sum(axis=(1, 3)), cells[y == c].sum(axis=(0, 2)))
        add("all", sq.sum(axis=(1, 3)), cells.sum(axis=(0, 2)))

    def figures(total: np.ndarray) -> dict:
        out = {"overall": {k: float(total[i].sum() / max(total[-1].sum(), 1)) for i, k in enumerate(kinds)}}
        return out | {ch: {k: float(total[i, c] / total[-1, c]) for i, k in enumerate(kinds)}
                      for c, ch in enumerate(channels) if total[-1, c] > 0}

    n = sum(windows.values())
    result = {"checkpoint": str(checkpoint_path), "split": split, "windows": n, "mask_ratio": cfg["mask_ratio"],
              "target_norm": norm, "masked_mse": figures(groups["all"]),
              "by_source": {name: {"windows": windows[name], **figures(groups[f"source:{name}"])}
                            for name in names if f"source:{name}" in groups} if len(dirs) > 1 else {},
              "by_class": {g.removeprefix("class:"): figures(t) for g, t in groups.items() if g.startswith("class:")}}
    overall = result["masked_mse"]["overall"]
    result["beats"] = [f for f in FLOORS if overall["model"] < overall[f]]
    warnings = [f"the {split} split has {n} windows: too few for these figures to mean much (want >= "
                f"{MIN_WINDOWS})"] if n < MIN_WINDOWS else []
    warnings += [f"{ch}: the model (masked MSE {v['model']:.4f}) does not beat {f} ({v[f]:.4f})"
                 for ch, v in result["masked_mse"].items() if ch != "overall" for f in FLOORS if not v["model"] < v[f]]
    return result | {"warnings": warnings}


def format_table(result: dict) -> str:
    """Masked MSE of the model and the floors: overall and per channel, per source and per class;
    then the warnings."""
    rows = [f"{'':28s} {'model':>8s} {'zero':>8s} {'interp':>8s} {'period':>8s}"]

    def block(prefix: str, figures: dict) -> None:
        for ch, v in figures.items():
            if isinstance(v, dict):
                rows.append(f"{(prefix + ch)[:28]:28s} " + " ".join(f"{v[k]:8.4f}" for k in ("model", *FLOORS)))

    block("", result["masked_mse"])
    for name, figures in result.get("by_source", {}).items():
        block(f"{name}: ", {"overall": figures["overall"]})
    for name, figures in result.get("by_class", {}).items():
        block(f"{name}: ", {"overall": figures["overall"]})
    return "\n".join(rows + [f"warning: {w}" for w in result["warnings"]])


def smoke(data_dir: str | Path, output_dir: str | Path, max_windows: int = 64, batch_size: int = 8,
          seed: int = 0) -> dict:
    """Train one CPU epoch on the first ``max_windows`` real windows and check the model works.

    Writes ``best_model.pt`` and ``smoke_metrics.json`` (each check passed or failed)."""
    from biofm.config import PretrainConfig, to_jsonable
    from biofm.dataset import read_data_spec
    from biofm.model.ssl import random_mask
    from biofm.model.ttm_weights import initial_model
    from biofm.train.pretrain import pretraining_losses

    t0 = time.perf_counter()
    cfg = PretrainConfig(batch_size=batch_size, epochs=1, lr=1e-3, seed=seed)
    split_dir = storage.join(data_dir, "train")
    x, _, _ = first_windows(split_dir, cfg.channels, max_windows)
    if len(x) < batch_size:
        raise BiofmError(f"{split_dir} has {len(x)} windows; the smoke test needs at least {batch_size}")
    spec = read_data_spec(split_dir)
    spec = {**spec, "channels": list(cfg.channels), "filters": {c: spec["filters"][c] for c in cfg.channels}}
    model = initial_model(cfg, x.shape[-1])[0]
    losses = pretraining_losses(model, cfg, spec)
    patches = model.patches
    g = torch.Generator().manual_seed(seed)
    fixed_mask = random_mask(len(x), len(cfg.channels), patches, cfg.mask_ratio, generator=g)
    data = torch.from_numpy(x)

    def loss_on_all():
        model.eval()
        with torch.no_grad():
            return float(losses(data, fixed_mask)[0])

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
        loss = losses(xb, random_mask(len(xb), len(cfg.channels), patches, cfg.mask_ratio, generator=g))[0]
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

    from biofm.model.ssl import MaskedSignalModel, recipe_of

    blob = checkpoint.load(path)
    if blob["description"].get("kind") != "masked_signal_model":
        raise BiofmError(f"{path} is not a pretraining checkpoint")
    desc = blob["description"]
    model = MaskedSignalModel.of(TinyTimeMixerConfig.from_dict(desc["ttm_config"]), recipe_of(desc))
    model.load_state_dict(blob["model"])
    return model.eval()
