"""The one checkpoint format: ``torch.save`` of plain dicts, loaded with ``weights_only=True``.

A checkpoint holds ``model`` (a state dict), ``description`` (JSON-able: model config, channel
names, data spec) and, for resumable training checkpoints, ``training`` (optimizer state, epoch,
history). Nothing else is pickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from biofm.errors import BiofmError

FILENAME = "model.pt"


def save(path: str | Path, model_state: dict, description: dict, training: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model": model_state, "description": description}
    if training is not None:
        blob["training"] = training
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise BiofmError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        # not torch's own text: it suggests weights_only=False, which would run pickled code
        raise BiofmError(f"{path} is not a biofm checkpoint: torch.load cannot read it as tensors and "
                         f"plain data ({type(e).__name__})") from None
    if not isinstance(blob, dict) or not {"model", "description"} <= set(blob):
        raise BiofmError(f"{path} is not a biofm checkpoint (no model/description)")
    return blob
