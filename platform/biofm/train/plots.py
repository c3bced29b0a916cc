"""Pictures of training runs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def plot_loss_curves(history: list[dict], path: Path) -> None:
    """Train and val loss per epoch, with the masked MSE and STFT parts."""
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "val_loss"):
        ax[0].plot(epochs, [h[key] for h in history], marker="o", label=key)
    for key in ("train_mse", "val_masked_mse", "train_stft"):
        ax[1].plot(epochs, [h[key] for h in history], marker=".", label=key)
    for a, title in zip(ax, ("total loss (MSE + w x STFT)", "components")):
        a.set(xlabel="epoch", title=title)
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reconstructions(model, split_dir: Path, description: dict, path: Path, n: int = 3) -> None:
    """Validation windows against their reconstructions; masked patches shaded."""
    from biofm.train.evaluate import first_windows
    from biofm.train.pretrain import window_masks

    spec, cfg = description["data_spec"], description["pretrain_config"]
    x, case_ids, window_idx = first_windows(split_dir, description["channels"], n)
    patches, patch = model.encoder.config.num_patches, model.patch
    mask = window_masks(case_ids, window_idx, x.shape[1], patches, cfg["mask_ratio"], cfg["val_mask_seed"],
                        cfg["mask_same_across_channels"])
    with torch.no_grad():
        recon, _ = model(torch.from_numpy(x), mask)
    t = np.arange(x.shape[-1]) / spec["sample_rate_hz"]
    fig, axes = plt.subplots(len(x), x.shape[1], figsize=(7 * x.shape[1], 2.2 * len(x)), squeeze=False)
    for i in range(len(x)):
        for c, name in enumerate(description["channels"]):
            ax = axes[i, c]
            for p in np.flatnonzero(mask[i, c].numpy()):
                ax.axvspan(p * patch / spec["sample_rate_hz"], (p + 1) * patch / spec["sample_rate_hz"],
                           color="orange", alpha=0.2, lw=0)
            ax.plot(t, x[i, c], lw=0.8, label="original")
            ax.plot(t, recon[i, c].numpy(), lw=0.8, label="reconstruction")
            ax.set_title(f"{name} - case {case_ids[i]} window {window_idx[i]} (shaded: masked)", fontsize=9)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
