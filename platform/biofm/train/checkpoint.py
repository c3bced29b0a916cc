"""The one checkpoint format: ``torch.save`` of plain dicts, loaded with ``weights_only=True``.

A checkpoint holds ``model`` (a state dict), ``description`` (JSON-able: model config, channel
names, data spec) and, for resumable training checkpoints, ``training`` (optimizer state, epoch,
history). Nothing else is pickled.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from biofm import storage
from biofm.errors import BiofmError

FILENAME = "model.pt"


def save(path: str | Path, model_state: dict, description: dict, training: dict | None = None) -> str:
    """Write a checkpoint to ``path`` (local or a URI, see :mod:`biofm.storage`), whole or not at all."""
    blob = {"model": model_state, "description": description}
    if training is not None:
        blob["training"] = training
    return storage.write(path, lambda f: torch.save(blob, f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint file, or ``model.pt`` in a checkpoint folder (local or a URI)."""
    path = storage.normalize(path)
    if storage.is_dir(path):
        path = storage.join(path, FILENAME)
    if not storage.is_file(path):
        raise BiofmError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(io.BytesIO(storage.read_bytes(path)), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        # not torch's own text: it suggests weights_only=False, which would run pickled code
        raise BiofmError(f"{path} is not a biofm checkpoint: torch.load cannot read it as tensors and "
                         f"plain data ({type(e).__name__})") from None
    if not isinstance(blob, dict) or not {"model", "description"} <= set(blob):
        raise BiofmError(f"{path} is not a biofm checkpoint (no model/description)")
    return blob
