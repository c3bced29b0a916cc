"""Masked signal modeling on a Tiny Time Mixer encoder.

Shapes: signals ``[B, C, T]`` (T = 1250 samples: 10 s at 125 Hz, z-scored), patches of
``patch`` samples (125 = 1 s, P = 10 per window), latents ``[B, C, P, D]`` (D = d_model),
masks ``[B, C, P]`` (True = masked cell).
"""

from __future__ import annotations

import torch
from torch import nn
from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig, TinyTimeMixerForPrediction, TinyTimeMixerModel


def ttm_config(num_channels: int, num_layers: int = 4, d_model: int = 192, context: int = 1250,
               patch: int = 125, dropout: float = 0.1) -> TinyTimeMixerConfig:
    """TTM encoder config: one patch per second, channels mixed, no built-in scaling."""
    return TinyTimeMixerConfig(
        context_length=context, patch_length=patch, patch_stride=patch,
        num_input_channels=num_channels, d_model=d_model, num_layers=num_layers,
        mode="mix_channel", scaling=False, dropout=dropout, prediction_length=patch,
        use_positional_encoding=False, adaptive_patching_levels=0,
    )


class Encoder(nn.Module):
    """TTM encoder: ``[B, C, T]`` -> latents ``[B, C, P, D]``; :meth:`tokens` gives ``[B, P, D]``."""

    def __init__(self, config: TinyTimeMixerConfig):
        super().__init__()
        self.config = config
        self.ttm = TinyTimeMixerModel(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ttm(past_values=x.transpose(1, 2)).last_hidden_state

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
    def layers(self) -> nn.ModuleList:
        """The mixer layers, first to last ("unfreeze the last N" counts these)."""
        return self.ttm.encoder.mlp_mixer_encoder.mixers


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, C, T]``, ``mask`` ``[B, C, P]`` -> (reconstruction ``[B, C, T]``, latents)."""
        keep = (~mask).repeat_interleave(self.patch, dim=-1).to(x.dtype)
        latents = self.encoder(x * keep)
        return self.decoder(latents).flatten(-2), latents


def masked_mse(recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean squared error over the masked cells' samples only."""
    cells = mask.repeat_interleave(patch, dim=-1).to(x.dtype)
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

    def forward(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pred, target = recon.flatten(0, -2).float(), x.flatten(0, -2).float()
        total = pred.new_zeros(())
        for n in self.ffts:
            window = getattr(self, f"window_{n}")
            spec = [torch.stft(s, n, hop_length=n // 4, window=window, return_complex=True).abs()
                    for s in (pred, target)]
            convergence = torch.linalg.norm(spec[1] - spec[0]) / torch.linalg.norm(spec[1]).clamp(min=self.eps)
            log_mag = (torch.log(spec[1] + self.eps) - torch.log(spec[0] + self.eps)).abs().mean()
            total = total + convergence + log_mag
        return total / len(self.ffts)
