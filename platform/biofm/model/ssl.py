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


class MixerDecoder(nn.Module):
    """A small decoder: one mixer block over the latents ``[B, C, P, D]`` (an MLP across the
    patches, then one across the features, each after a layer norm, with a residual), then a
    linear map of each latent to its patch's ``patch`` samples."""

    def __init__(self, d_model: int, patches: int, patch: int, expansion: int = 2):
        super().__init__()
        self.norm_patches, self.norm_features = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.across_patches = nn.Sequential(nn.Linear(patches, expansion * patches), nn.GELU(),
                                            nn.Linear(expansion * patches, patches))
        self.across_features = nn.Sequential(nn.Linear(d_model, expansion * d_model), nn.GELU(),
                                             nn.Linear(expansion * d_model, d_model))
        self.out = nn.Linear(d_model, patch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.across_patches(self.norm_patches(z).transpose(-1, -2)).transpose(-1, -2)
        return self.out(z + self.across_features(self.norm_features(z)))


MASK_INPUTS, DECODERS = ("zeros", "token"), ("linear", "mixer")


class MaskedSignalModel(nn.Module):
    """Encoder + decoder: masked cells are hidden at the input and reconstructed.

    ``mask_input``: what a masked cell holds at the input, ``zeros`` or ``token`` (a learned
    patch of samples per channel, ``mask_token [C, patch]``: after the patch projection, a
    learned embedding, as MOMENT's and TSPulse's mask tokens). ``decoder``: ``linear`` (one
    latent -> its patch) or ``mixer`` (:class:`MixerDecoder`). ``align_dim`` > 0 adds a projection
    per channel ``[D] -> [align_dim]`` for cross-modal alignment (:func:`alignment_loss`)."""

    def __init__(self, config: TinyTimeMixerConfig, mask_input: str = "zeros", decoder: str = "linear",
                 align_dim: int = 0):
        super().__init__()
        if mask_input not in MASK_INPUTS or decoder not in DECODERS:
            raise ValueError(f"mask_input must be one of {MASK_INPUTS} and decoder one of {DECODERS}, "
                             f"got {mask_input!r}, {decoder!r}")
        self.patch = config.patch_length
        self.encoder = Encoder(config)
        channels = config.num_input_channels
        self.mask_token = nn.Parameter(torch.zeros(channels, self.patch)) if mask_input == "token" else None
        self.decoder = (nn.Linear(config.d_model, self.patch) if decoder == "linear"
                        else MixerDecoder(config.d_model, self.encoder.patches, self.patch))
        self.align = nn.ModuleList(nn.Linear(config.d_model, align_dim) for _ in range(channels)) if align_dim else None

    @classmethod
    def of(cls, config: TinyTimeMixerConfig, recipe: dict | None = None) -> "MaskedSignalModel":
        """The model of a pretraining config (a dict: a checkpoint's ``pretrain_config``, completed
        by :func:`recipe_of`)."""
        recipe = {**EARLIER_RECIPE, **(recipe or {})}
        return cls(config, recipe["mask_input"], recipe["decoder"], ALIGN_DIM if recipe["align_weight"] > 0 else 0)

    @property
    def patches(self) -> int:
        """Patches per window, P."""
        return self.encoder.patches

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, C, T]``, ``mask`` ``[B, C, P]`` -> (reconstruction ``[B, C, T]``, latents)."""
        hidden = patch_samples(mask, self.patch, x.shape[-1]).to(x.dtype)
        x_in = x * (1 - hidden)
        if self.mask_token is not None:
            token = self.mask_token.repeat(1, self.patches)[None, :, :x.shape[-1]].to(x.dtype)
            x_in = x_in + hidden * token
        latents = self.encoder(x_in)
        return self.decoder(latents).flatten(-2)[..., :x.shape[-1]], latents


ALIGN_DIM = 128  # the alignment projections' size (CLIP-style heads are 128-512)

# what a checkpoint that does not say had: the seed's recipe (checkpoints before these options,
# and the benchmark's random-weights control)
EARLIER_RECIPE = {"mask_ratio": 0.4, "val_mask_seed": 1234, "mask_same_across_channels": False, "target_norm": "window",
                  "mask_input": "zeros", "decoder": "linear", "align_weight": 0.0}


def recipe_of(description: dict) -> dict:
    """A pretraining checkpoint's ``pretrain_config``, with :data:`EARLIER_RECIPE` for what it lacks."""
    return {**EARLIER_RECIPE, **(description.get("pretrain_config") or {})}


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
    out of ``mask``); ``x``: the target (:func:`targets`)."""
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


TARGET_NORMS = ("window", "patch")


def targets(x: torch.Tensor, patch: int, norm: str) -> torch.Tensor:
    """What the model reconstructs, ``[B, C, T]``: the window as it is (``window``: z-scored per
    window and channel) or each patch z-scored on its own (``patch``: MAE's normalised-pixel
    target; T must be whole patches). Also maps any prediction (the floors') into that space."""
    if norm == "window":
        return x
    p = x.unflatten(-1, (-1, patch))
    mean, sd = p.mean(dim=-1, keepdim=True), p.std(dim=-1, keepdim=True)
    return ((p - mean) / (sd + PATCH_SD_EPS)).flatten(-2)


PATCH_SD_EPS = 1e-2  # z-scored windows: a patch's SD is ~0.2-2; a flat patch stays near zero, not inf


def band_bins(bands_hz, samples: int, fs: float) -> torch.Tensor:
    """``[C, samples // 2 + 1]`` bool: the rfft bins of ``samples`` at ``fs`` Hz inside each
    channel's pass band ``(low, high)`` Hz."""
    f = torch.fft.rfftfreq(samples, 1 / fs)
    return torch.stack([(f >= lo) & (f <= hi) for lo, hi in bands_hz])


def band_spectral_mse(recon: torch.Tensor, target: torch.Tensor, cells: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """The masked error's energy inside each channel's signal band, per masked sample: the error
    ``(recon - target)`` on the masked samples ``cells [B, C, T]`` (zeros elsewhere), its rfft
    (orthonormal: Parseval) kept on ``bins [C, F]``; complex, so phase counts, and on the time
    loss's scale (the band's share of the masked MSE; the two are equal for an error inside the
    band)."""
    spectrum = torch.fft.rfft((recon - target) * cells, norm="ortho")
    return 2 * (spectrum.abs() ** 2 * bins).sum() / cells.sum().clamp(min=1)  # x2: the negative frequencies


def alignment_loss(model: "MaskedSignalModel", x: torch.Tensor, present: torch.Tensor, a: int, b: int,
                   temperature: float) -> torch.Tensor:
    """Cross-modal InfoNCE (CLIP's symmetric loss) between channels ``a`` and ``b`` (PPG and ECG)
    of the same windows ``x [B, C, T]``: each channel is encoded alone (the other zeroed, so the
    channel mixing cannot copy one into the other), its latents averaged over the patches and
    projected; a window's two channels are the positive pair, the other windows' the negatives.
    Windows without both channels (``present [B, C]``) take no part (weights, not selection:
    static shapes)."""
    def embedding(c: int) -> torch.Tensor:
        only = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        only[c] = 1
        z = model.encoder(x * only[None, :, None])[:, c].mean(dim=1)
        return nn.functional.normalize(model.align[c](z), dim=-1)

    paired = (present[:, a] & present[:, b]).float()
    logits = embedding(a) @ embedding(b).T / temperature
    logits = logits.float().masked_fill(paired[None, :] == 0, -1e4)
    labels = torch.arange(len(x), device=x.device)
    both = (nn.functional.cross_entropy(logits, labels, reduction="none")
            + nn.functional.cross_entropy(logits.masked_fill(paired[:, None] == 0, -1e4).T, labels, reduction="none"))
    return (both * paired).sum() / (2 * paired.sum()).clamp(min=1)


def window_masks(case_ids, window_idx, channels: int, patches: int, ratio: float, seed: int,
                 same_across_channels: bool = False) -> torch.Tensor:
    """Masks ``[B, C, P]`` fixed per window (seeded by ``seed``, case id and window index), so
    validation and evaluation compare the same cells whatever order the windows arrive in."""
    masks = []
    for case, idx in zip(case_ids, window_idx):
        g = torch.Generator().manual_seed(seed ^ zlib.crc32(f"{case}:{int(idx)}".encode()))
        masks.append(random_mask(1, channels, patches, ratio, same_across_channels, generator=g))
    return torch.cat(masks)
