"""Pictures of training runs (matplotlib, no display needed), written as PNG to a local path or
a URI."""

from __future__ import annotations

import numpy as np
import torch

from biofm.plotting import plt, save_png


def plot_history(history: list[dict], panels: dict[str, tuple[str, tuple[str, ...]]], path: str,
                 mark_epoch: tuple[int, str] | None = None) -> None:
    """Metrics per epoch, one panel (its own y axis) per title -> (y label, history keys), epochs
    as whole numbers; ``mark_epoch``: a dashed line before that epoch, with its label."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, (ylabel, keys)) in zip(axes[0], panels.items()):
        for key in keys:
            ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
        if mark_epoch is not None:
            ax.axvline(mark_epoch[0] - 0.5, color="grey", ls="--", lw=0.8, label=mark_epoch[1])
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def plot_reconstructions(model, split_dir: str, description: dict, path: str, n: int = 3) -> None:
    """Validation windows against their reconstructions under the validation masks: the
    reconstruction of the masked cells (shaded) in red, of the visible cells (which the loss
    does not score) in thin grey; a patch-normalised target is shown in the window's units (each
    patch's own mean and SD put back)."""
    from biofm.model.ssl import recipe_of, window_masks
    from biofm.train.evaluate import first_windows

    spec, cfg = description["data_spec"], recipe_of(description)
    x, case_ids, window_idx = first_windows(split_dir, description["channels"], n)
    patches, patch = model.patches, model.patch
    mask = window_masks(case_ids, window_idx, x.shape[1], patches, cfg["mask_ratio"], cfg["val_mask_seed"],
                        cfg["mask_same_across_channels"])
    with torch.no_grad():
        recon = model(torch.from_numpy(x), mask)[0].numpy()
    if cfg["target_norm"] == "patch":
        p = x.reshape(*x.shape[:-1], -1, patch)
        recon = (recon.reshape(p.shape) * (p.std(axis=-1, ddof=1, keepdims=True) + 1e-2)
                 + p.mean(axis=-1, keepdims=True)).reshape(x.shape)
    hidden = np.repeat(mask.numpy(), patch, axis=-1)[..., :x.shape[-1]]
    t = np.arange(x.shape[-1]) / spec["sample_rate_hz"]
    fig, axes = plt.subplots(len(x), x.shape[1], figsize=(7 * x.shape[1], 2.2 * len(x)), squeeze=False)
    for i in range(len(x)):
        for c, name in enumerate(description["channels"]):
            ax = axes[i, c]
            for k in np.flatnonzero(mask[i, c].numpy()):
                ax.axvspan(k * patch / spec["sample_rate_hz"], min((k + 1) * patch, x.shape[-1]) / spec["sample_rate_hz"],
                           color="orange", alpha=0.2, lw=0)
            ax.plot(t, x[i, c], color="black", lw=0.8, label="original")
            ax.plot(t, np.where(hidden[i, c], np.nan, recon[i, c]), color="grey", lw=0.5,
                    label="reconstruction, visible cells (not scored)")
            ax.plot(t, np.where(hidden[i, c], recon[i, c], np.nan), color="tab:red", lw=1.0,
                    label="reconstruction, masked cells")
            absent = not np.abs(x[i, c]).max() > 0
            ax.set_title(f"{name} - case {case_ids[i]} window {window_idx[i]} "
                         + ("(absent in this source: zeros, not scored)" if absent else "(shaded: masked)"), fontsize=9)
            ax.set_ylabel(f"{name} (z-score)", fontsize=8)  # each window is z-scored per channel
    axes[0, 0].legend(loc="upper right", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("seconds from the window's start")
    fig.tight_layout()
    save_png(fig, path, dpi=90)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str, title: str) -> None:
    """ROC curves, one per name -> (labels [N], probabilities of the positive class [N])."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, p) in curves.items():
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, p):.3f}, n={len(y)})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
