"""Applying trained models to data on Ray Data: embeddings of a windows split.

:func:`embed` reads a split written by ``build-windows`` or ``prepare-butppg`` (local or a URI)
and streams it through an actor pool (:class:`Embedder`: the encoder loaded once per actor, on a
GPU where the actors get one) into Parquet::

    <output>/embeddings/*.parquet   case_id (or record_id), window_idx, start_s,
                                    embedding float32 [D] (the classifier's pooling), tokens [P, D]
    <output>/manifest.json          checkpoint and its sha256, data spec, counts, seconds

The model's data spec (rate, window, filters) and channels must match the split's, or it stops
naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch

from biofm import storage
from biofm.errors import BiofmError, ConfigError
from biofm.train import checkpoint


def load_encoder(path: str):
    """The encoder of a pretraining checkpoint, or of a fine-tuned classifier, and the checkpoint's
    description (CPU, eval mode)."""
    from biofm.train.finetune import load_classifier
    from biofm.train.pretrain import load_pretrained

    kind = checkpoint.load(path)["description"].get("kind")
    if kind == "masked_signal_model":
        model = load_pretrained(path)
    elif kind == "ppg_quality_classifier":
        model = load_classifier(path)[0]
    else:
        raise BiofmError(f"{path} is neither a pretraining nor a fine-tuned checkpoint (kind {kind!r})")
    return model.encoder.eval(), checkpoint.load(path)["description"]


class Embedder:
    """Ray Data's callable class: the encoder of ``checkpoint`` loaded once per actor. A batch of
    ``signal`` ``[B, C_data, T]`` (+ ``present`` ``[B, C_data]``) -> ``embedding`` ``[B, D]``
    (and ``tokens`` ``[B, P, D]``, the mean over channels), ids passed through."""

    def __init__(self, checkpoint_path: str, channel_index: list[int], tokens: bool, threads: int):
        torch.set_num_threads(max(1, threads))
        self.encoder, _ = load_encoder(checkpoint_path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder.to(self.device)
        self.index, self.tokens = channel_index, tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from biofm.model.classifier import pool

        x = torch.from_numpy(np.ascontiguousarray(batch["signal"][:, self.index], dtype=np.float32)).to(self.device)
        present = None
        if "present" in batch:  # [B, C] bool; Ray Data may hand it over as rows of arrays
            mask = np.stack(batch["present"]).astype(bool)
            present = torch.from_numpy(mask[:, self.index]).to(self.device)
        with torch.no_grad():
            latents = self.encoder(x)
            out = {k: v for k, v in batch.items() if k not in ("signal", "present")}
            out["embedding"] = pool(latents, present).float().cpu().numpy()
            if self.tokens:
                out["tokens"] = latents.mean(dim=1).float().cpu().numpy()
        n = len(x)
        out.setdefault("window_idx", np.zeros(n, np.int32))  # BUT-PPG: one window per record
        out.setdefault("start_s", np.zeros(n, np.float64))
        return out


def embed(checkpoint_path: str, data_dir: str, output: str, batch_size: int = 256, concurrency: int | None = None,
          num_gpus: float = 0.0, tokens: bool = False, address: str | None = None) -> dict:
    """Embeddings of every window of ``data_dir`` (a split folder) under ``output``; returns the
    manifest. ``concurrency``: actors (default: the cluster's CPUs less one, for the reads;
    with ``num_gpus``, one actor per GPU share)."""
    import ray

    from biofm.preprocess import check_data_spec, ensure_ray
    from biofm.train.batches import scan

    t0 = time.perf_counter()
    data_dir, output = storage.normalize(data_dir), storage.normalize(output)
    target = storage.join(output, "embeddings")
    if storage.list_files(target):
        raise BiofmError(f"{target} already holds embeddings: choose another --output, or delete it")
    _, description = load_encoder(checkpoint_path)
    split = scan(data_dir)
    needed, stored = list(description["channels"]), list(split.spec["channels"])
    missing = [c for c in needed if c not in stored]
    if missing:
        raise ConfigError(f"{data_dir} has channels {stored}; the model {checkpoint_path} needs {needed}: "
                          f"missing {missing}")
    check_data_spec(description["data_spec"], split.spec, where=f"{data_dir} vs the model {checkpoint_path}")
    schema = storage.read_metadata(split.files[0]).schema.to_arrow_schema()
    id_column = "case_id" if "case_id" in schema.names else "record_id"
    columns = [c for c in (id_column, "window_idx", "start_s", "signal", "present") if c in schema.names]

    ensure_ray(address)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = concurrency or (max(1, int(ray.cluster_resources().get("GPU", 0) / num_gpus)) if num_gpus
                             else max(1, cpus - 1))
    # one CPU stays for Ray Data's file listing (a whole CPU) and the reads and writes (a quarter
    # each): actors holding every CPU would starve them, and the job would wait forever
    ds = ray.data.read_parquet(list(split.files), columns=columns, num_cpus=0.25)
    ds = ds.map_batches(Embedder, batch_size=batch_size, batch_format="numpy", concurrency=actors, num_gpus=num_gpus,
                        num_cpus=min(1.0, max(0.0, cpus - 1) / actors), fn_constructor_kwargs={
                            "checkpoint_path": storage.normalize(checkpoint_path),
                            "channel_index": [stored.index(c) for c in needed], "tokens": tokens,
                            "threads": max(1, cpus // actors)})
    ds.write_parquet(target, ray_remote_args={"num_cpus": 0.25})
    written = sum(storage.read_metadata(f).num_rows for f in storage.list_files(target, ".parquet"))
    manifest = {
        "checkpoint": storage.normalize(checkpoint_path),
        "checkpoint_sha256": hashlib.sha256(storage.read_bytes(checkpoint_path)).hexdigest(),
        "checkpoint_kind": description["kind"], "channels": needed, "data_spec": description["data_spec"],
        "data_dir": data_dir, "id_column": id_column, "windows_in": split.windows, "embeddings": written,
        "embedding_dim": description["ttm_config"]["d_model"], "tokens": tokens, "pooling":
        "mean over patches, then over present channels (the classifier's)", "actors": actors,
        "seconds": round(time.perf_counter() - t0, 2)}
    if written != split.windows:
        raise BiofmError(f"{written} embeddings written for {split.windows} windows in {data_dir}")
    storage.write_text(storage.join(output, "manifest.json"), json.dumps(manifest, indent=1))
    print(f"[embed] {written} windows -> {target} ({manifest['seconds']:.1f} s, {actors} actor(s))", flush=True)
    return manifest
