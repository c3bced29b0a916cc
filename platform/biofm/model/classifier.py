"""Channels by name (:func:`channel_plan`, inflation) and the task classifier on the TTM encoder.

Shapes: signals ``[B, C, T]``, ``present`` ``[B, C]`` (False = the channel is absent, zeros),
latents ``[B, C, P, D]``, logits ``[B, K]`` (K classes, or 1 for a regression target).

Only TTM's channel-mixing blocks have weights sized by the channel count C: per mixer layer a
gate ``attn_layer`` (Linear C -> C, softmax over channels) and an MLP over channels (``fc1``:
C -> C * e, ``fc2``: C * e -> C). Inflation copies every other weight and maps the old channels'
rows and columns to the new channels of the same name.
"""

from __future__ import annotations

import torch
from torch import nn
from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

from biofm.errors import BiofmError
from biofm.model.ssl import Encoder

CLOSED_GATE = -1e4  # a softmax logit whose weight underflows to exactly 0 in float32


def channel_plan(encoder: list[str], task: list[str]) -> list[str]:
    """The channels of a model made from an encoder of channels ``encoder`` for data of channels
    ``task``, by name: the task's, in its order, then the encoder's that the task lacks. A channel
    the encoder lacks is added (:func:`inflate_encoder`: the 2 -> 5 inflation is one case); a
    channel the task lacks is absent: zeros, marked not present, left out of the pooling. One rule
    for fine-tuning, Tune, embedding and the benchmark."""
    return list(task) + [c for c in encoder if c not in task]


def inflate_encoder(state: dict[str, torch.Tensor], config: TinyTimeMixerConfig, old: list[str], new: list[str],
                    init: str = "preserve", seed: int = 0) -> Encoder:
    """An encoder for channels ``new`` from the state dict ``state`` of one for channels ``old``.

    ``init`` for the weights of channels not in ``old``:
    - ``preserve``: old channels never read new ones (their gate logits are closed and their MLP
      weights from new channels are zero), so the old channels' latents are exactly the
      pretrained encoder's whatever the new channels hold. New channels still get their own
      latents (shared patch and feature mixers), which the classifier pools.
    - ``mean``: each new channel's rows and columns are the mean of the pretrained channels', so
      new channels take part in the channel mixing from the start.
    - ``random``: PyTorch's default initialisation for the new rows and columns.
    """
    missing = [c for c in old if c not in new]
    if missing:
        raise BiofmError(f"cannot inflate: pretrained channels {missing} are not among {new}")
    if init not in ("preserve", "mean", "random"):
        raise BiofmError(f"unknown inflation init {init!r} (preserve, mean, random)")
    cfg = TinyTimeMixerConfig.from_dict({**config.to_dict(), "num_input_channels": len(new)})
    torch.manual_seed(seed)
    encoder = Encoder(cfg)
    target = encoder.state_dict()
    idx = torch.tensor([new.index(c) for c in old])
    fresh = torch.tensor([i not in idx for i in range(len(new))])
    n_old, n_new = len(old), len(new)
    for key, value in state.items():
        key = key.removeprefix("encoder.")
        if key not in target:
            continue
        t = target[key]
        if t.shape == value.shape:
            t.copy_(value)
            continue
        # dims sized by channels map old -> idx; dims sized by the MLP's hidden units keep the
        # old units first. Fresh channels / hidden units keep their random init unless changed.
        maps = []
        for d, (a, b) in enumerate(zip(value.shape, t.shape)):
            if a == b:
                maps.append(torch.arange(a))
            elif a == n_old and b == n_new:
                maps.append(idx)
            elif a % n_old == 0 and b == a // n_old * n_new:
                maps.append(torch.arange(a))
            else:
                raise BiofmError(f"cannot inflate {key}: shape {tuple(value.shape)} -> {tuple(t.shape)}")
        t[torch.meshgrid(*maps, indexing="ij")] = value
        out_is_channel = t.shape[0] == n_new
        in_is_channel = t.dim() == 2 and t.shape[1] == n_new
        new_out = fresh if out_is_channel else torch.arange(t.shape[0]) >= value.shape[0]
        if init == "mean":
            if in_is_channel:
                t[:, fresh] = t[:, ~fresh].mean(dim=1, keepdim=True)
            if out_is_channel:
                t[fresh] = t[~fresh].mean(dim=0, keepdim=True)
        elif init == "preserve":
            if t.dim() == 2:
                new_in = fresh if in_is_channel else torch.arange(t.shape[1]) >= value.shape[1]
                t[~new_out[:, None] & new_in[None, :]] = 0.0  # old outputs ignore new inputs
            if "gating_block" in key and out_is_channel:
                t[fresh] = CLOSED_GATE if t.dim() == 1 else 0.0
    encoder.load_state_dict(target)
    return encoder


def pool(latents: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Latents ``[B, C, P, D]`` -> one vector per window ``[B, D]``: the mean over patches, then
    over the present channels (``present`` ``[B, C]`` bool; None: all)."""
    per_channel = latents.mean(dim=2)  # [B, C, D]
    if present is None:
        return per_channel.mean(dim=1)
    w = present.to(per_channel.dtype).unsqueeze(-1)
    return (per_channel * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class Classifier(nn.Module):
    """Encoder -> latents ``[B, C, P, D]`` -> :func:`pool` ``[B, D]`` -> batch norm without affine
    parameters -> dropout -> linear -> logits ``[B, K]``. The norm (MAE's linear probing)
    standardises each feature, so the head learns at the same pace whatever the scale of the
    encoder's features: without it, a few hundred steps left the head near its random start."""

    def __init__(self, encoder: Encoder, num_classes: int = 2, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.norm = nn.BatchNorm1d(encoder.config.d_model, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.d_model, num_classes)
        self.encoder_frozen = False

    def train(self, mode: bool = True) -> Classifier:
        """As ``nn.Module.train``, but a frozen encoder (stage 1: :meth:`set_stage`) stays in eval
        mode: no dropout noise in the features the head learns from."""
        super().train(mode)
        if mode and self.encoder_frozen:
            self.encoder.eval()
        return self

    def features(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return pool(self.encoder(x), present)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        z = self.features(x, present)
        if self.training and len(z) == 1:  # one record has no spread to standardise by: the running one
            z = nn.functional.batch_norm(z, self.norm.running_mean, self.norm.running_var, training=False)
        else:
            z = self.norm(z)
        return self.head(self.dropout(z))

    def set_stage(self, stage: int, unfreeze_last_n: int, train_encoder: bool = False) -> list[str]:
        """Stage 1: only the head trains. Stage 2: the head and the last ``unfreeze_last_n``
        mixer layers. ``train_encoder`` (training from scratch) trains everything in both.
        Returns the names of the trainable parameters."""
        self.encoder_frozen = stage == 1 and not train_encoder
        for p in self.encoder.parameters():
            p.requires_grad = train_encoder
        if stage == 2 and unfreeze_last_n > 0 and not train_encoder:
            layers = self.encoder.layers
            for layer in layers[max(0, len(layers) - unfreeze_last_n):]:
                for p in layer.parameters():
                    p.requires_grad = True
        for p in self.head.parameters():
            p.requires_grad = True
        return [n for n, p in self.named_parameters() if p.requires_grad]
