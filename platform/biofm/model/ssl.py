"""Masked signal modeling on a Tiny Time Mixer encoder.

Shapes: signals ``[B, C, T]`` (T = 1250 samples: 10 s at 125 Hz, z-scored), patches of
``patch`` samples (125 = 1 s, P = 10 per window), latents ``[B, C, P, D]`` (D = d_model),
masks ``[B, C, P]`` (True = masked cell).

An encoder whose context is longer than the window (IBM's published geometry, see
:mod:`biofm.model.ttm_weights`) sees the window zero-padded at its end; P is then the number of
patches that hold window samples (``ceil(T / patch)``) and the padding's latents are dropped.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig, TinyTimeMixerForPrediction, TinyTimeMixerModel


def ttm_config(num_channels: int, num_layers: int = 4, d_model: int = 192, context: int = 1250,
               patch: int = 125, dropout: float = 0.1, **architecture) -> TinyTimeMixerConfig:
    """TTM encoder config: one patch per second, channels mixed, no built-in scaling.
    ``architecture``: other TinyTimeMixerConfig keys (a published checkpoint's) and
    ``signal_length`` (samples per window, when shorter than ``context``)."""
    return TinyTimeMixerConfig(**{
        "use_positional_encoding": False, "adaptive_patching_levels": 0, **architecture,
        "context_length": context, "patch_length": patch, "patch_stride": patch, "num_input_channels": num_channels,
        "d_model": d_model, "num_layers": num_layers, "mode": "mix_channel", "scaling": False, "dropout": dropout,
        "prediction_length": patch})


class Encoder(nn.Module):
    """TTM encoder: ``[B, C, T]`` -> latents ``[B, C, P, D]``; :meth:`tokens` gives ``[B, P, D]``.

    ``config.signal_length`` (samples per window, default the context length) may be shorter
    than ``config.context_length``: windows are then zero-padded at the end and only the
    ``patches`` that hold window samples are returned."""

    def __init__(self, config: TinyTimeMixerConfig):
        super().__init__()
        self.config = config
        self.ttm = TinyTimeMixerModel(config)
        self.length = getattr(config, "signal_length", None) or config.context_length
        self.patches = math.ceil(self.length / config.patch_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.config.context_length - x.shape[-1]
        if padding < 0:
            raise ValueError(f"windows of {x.shape[-1]} samples: this encoder takes at most {self.config.context_length}")
        if padding:
            x = nn.functional.pad(x, (0, padding))
        return self.ttm(past_values=x.transpose(1, 2)).last_hidden_state[:, :, :self.patches]

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).mean(dim=1)

    def save_pretrained(self, folder) -> None:
        """Save in the form IBM publishes TTM checkpoints, loadable with tsfm_public alone:
        ``TinyTimeMixerForPrediction.from_pretrained(folder).backbone`` is this encoder (its
        forecasting head is as initialised: biofm trains a reconstruction decoder, not a
        forecaster). tsfm_public's bare ``TinyTimeMixerModel`` cannot ``from_pretrained`` with
        transformers 5: it skips the post-init that loading needs."""
        model = TinyTimeMixerForPrediction(self.config)
        model.backbone.load_state_dict(self.ttm.state_dict())
        model.save_pretrained(folder)

    @property
    def layers(self) -> list[nn.Module]:
        """The mixer layers, first to last ("unfreeze the last N" counts these); with adaptive
        patching, every level's layers in the order they run."""
        mixers = self.ttm.encoder.mlp_mixer_encoder.mixers
        if self.config.adaptive_patching_levels > 0:
            return [layer for level in mixers for layer in level.mixer_layers]
        return list(mixers)


def random_mask(batch: int, channels: int, patches: int, ratio: float, same_across_channels: bool = False,
                generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A mask ``[B, C, P]`` with ``round(ratio * cells)`` masked cells per window, chosen uniformly.

    ``same_across_channels`` masks the same ``round(ratio * P)`` patches on every channel.
    """
    cols = patches if same_across_channels else channels * patches
    n_masked = int(round(ratio * cols))
    scores = torch.rand(batch, cols, generator=generator, device=device)
    mask = torch.zeros(batch, cols, dtype=torch.bool, device=device)
    mask.scatter_(1, scores.argsort(dim=1)[:, :n_masked], True)
    if same_across_channels:
        return mask[:, None, :].expand(batch, channels, patches)
    return mask.view(batch, channels, patches)


class MaskedSignalModel(nn.Module):
    """Encoder + linear decoder. Masked cells are zeroed at the input and reconstructed."""

    def __init__(self, config: TinyTimeMixerConfig):
        super().__init__()
        self.patch = config.patch_length
        self.encoder = Encoder(config)
        self.decoder = nn.Linear(config.d_model, config.patch_length)

    @property
    def patches(self) -> int:
        """Patches per window, P."""
        return self.encoder.patches

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, C, T]``, ``mask`` ``[B, C, P]`` -> (reconstruction ``[B, C, T]``, latents)."""
        keep = patch_samples(mask, self.patch, x.shape[-1]).logical_not().to(x.dtype)
        latents = self.encoder(x * keep)
        return self.decoder(latents).flatten(-2)[..., :x.shape[-1]], latents


def patch_samples(mask: torch.Tensor, patch: int, samples: int) -> torch.Tensor:
    """A mask of patches ``[B, C, P]`` as a mask of samples ``[B, C, samples]`` (the last patch
    may run past the window's end)."""
    return mask.repeat_interleave(patch, dim=-1)[..., :samples]


def present_channels(x: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: the channels of windows ``[B, C, T]`` that are not a row of zeros (the absent
    marking: a z-scored channel never is all zeros)."""
    return x.abs().amax(dim=-1) > 0


def masked_mse(recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean squared error over the masked cells' samples only (leave an absent channel's cells
    out of ``mask``)."""
    cells = patch_samples(mask, patch, x.shape[-1]).to(x.dtype)
    return ((recon - x) ** 2 * cells).sum() / cells.sum().clamp(min=1)


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude L1, averaged over STFT resolutions.

    Defaults suit 125 Hz: windows of 64, 128 and 256 samples (0.5, 1 and 2 s), hop = window / 4.
    """

    def __init__(self, ffts: tuple[int, ...] = (64, 128, 256), eps: float = 1e-7):
        super().__init__()
        self.ffts, self.eps = ffts, eps
        for n in ffts:
            self.register_buffer(f"window_{n}", torch.hann_window(n), persistent=False)

    def forward(self, recon: torch.Tensor, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """``recon``, ``x`` ``[B, C, T]``; ``present`` ``[B, C]``: only those rows count. The rows
        are weighted, not selected, so the loss has static shapes (no host sync, one compiled
        graph)."""
        pred, target = recon.flatten(0, -2).float(), x.flatten(0, -2).float()
        rows = (present.flatten().float() if present is not None else pred.new_ones(len(pred)))[:, None, None]
        total = pred.new_zeros(())
        for n in self.ffts:
            window = getattr(self, f"window_{n}")
            spec = [torch.stft(s, n, hop_length=n // 4, window=window, return_complex=True).abs()
                    for s in (pred, target)]
            convergence = ((spec[1] - spec[0]) ** 2 * rows).sum().sqrt() / (spec[1] ** 2 * rows).sum().sqrt().clamp(min=self.eps)
            cells = (rows.sum() * spec[1][0].numel()).clamp(min=1)
            log_mag = ((torch.log(spec[1] + self.eps) - torch.log(spec[0] + self.eps)).abs() * rows).sum() / cells
            total = total + convergence + log_mag
        return total / len(self.ffts)


def window_masks(case_ids, window_idx, channels: int, patches: int, ratio: float, seed: int,
                 same_across_channels: bool = False) -> torch.Tensor:
    """Masks ``[B, C, P]`` fixed per window (seeded by ``seed``, case id and window index), so
    validation and evaluation compare the same cells whatever order the windows arrive in."""
    masks = []
    for case, idx in zip(case_ids, window_idx):
        g = torch.Generator().manual_seed(seed ^ zlib.crc32(f"{case}:{int(idx)}".encode()))
        masks.append(random_mask(1, channels, patches, ratio, same_across_channels, generator=g))
    return torch.cat(masks)
