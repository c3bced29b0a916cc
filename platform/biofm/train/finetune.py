"""Staged fine-tuning of the inflated TTM encoder for PPG quality on BUT-PPG, on Ray Train.

:func:`finetune` builds the classifier on the driver (inflating the pretrained 2-channel encoder
to the data's channels, or a random one for ``init = scratch``), streams ``<data_dir>/{train,val}``
through Ray Data into :func:`train_loop`, keeps the checkpoint with the best val AUROC, picks the
decision threshold on val, and evaluates once on test. Stage 1 trains the head only, stage 2 the
head and the last N mixer layers. BUT-PPG is small (3,888 records, about 100 MB): every worker
holds its splits in memory (:mod:`biofm.train.batches`) and reshuffles them every epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np
import torch

from biofm import output, storage
from biofm.config import FinetuneConfig, to_jsonable
from biofm.errors import BiofmError, ConfigError
from biofm.model.classifier import Classifier, inflate_encoder
from biofm.model.ssl import Encoder
from biofm.train import checkpoint
from biofm.train.batches import WaitClock, WindowBatches, data_wait_note, scan
from biofm.train.metrics import choose_threshold, classification_metrics, classifier_warnings
from biofm.train.ray_run import (RUN_NAME, check_run_dir, fit, mixed_precision, report_epoch, restored_training,
                                 seed_epoch, worker_print)
from biofm.train.tracking import Tracker

def read_split(split_dir: str | Path) -> dict[str, np.ndarray]:
    """A task's split read whole (they are small): ``signal [N, C, T]``, ``present [N, C]``,
    ``label [N]``, ``case_id [N]``."""
    files = list(storage.list_files(split_dir, ".parquet"))
    if not files:
        raise BiofmError(f"no BUT-PPG records in {split_dir}: run `biofm prepare-butppg` first")
    table = storage.read_table(files, columns=["case_id", "label", "signal", "present"])
    return {"signal": table.column("signal").combine_chunks().to_numpy_ndarray().astype(np.float32),
            "present": _present(table.column("present").to_pylist()),
            "label": table.column("label").to_numpy().astype(np.int64),
            "case_id": np.array(table.column("case_id").to_pylist())}


@torch.no_grad()
def predict(model: Classifier, signal: np.ndarray, present: np.ndarray, batch_size: int = 64, device="cpu") -> np.ndarray:
    """Probability of "good" ``[N]`` for ``signal [N, C, T]``."""
    model.eval()
    out = []
    for i in range(0, len(signal), batch_size):
        x = torch.from_numpy(signal[i:i + batch_size]).to(device)
        m = torch.from_numpy(present[i:i + batch_size]).to(device)
        out.append(torch.softmax(model(x, m).float(), dim=-1)[:, 1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def build_classifier(cfg: FinetuneConfig, pretrained: str | Path | None, data_spec: dict) -> tuple[Classifier, dict]:
    """The classifier for ``data_spec``'s channels and its description (for checkpoints).

    ``init = pretrained`` inflates the encoder of ``pretrained`` (a pretraining checkpoint,
    whose data spec must match: rate, window, filters); ``scratch`` builds the same architecture
    with random weights."""
    from biofm.preprocess import check_data_spec

    channels = list(data_spec["channels"])
    if list(cfg.channels) != channels:
        raise ConfigError(f"the data has channels {channels}, the fine-tuning config {list(cfg.channels)}")
    if pretrained is None:
        raise ConfigError("--pretrained is required: the pretraining checkpoint gives the architecture "
                          "(and, unless --init scratch, the weights)")
    blob = checkpoint.load(pretrained)
    desc = blob["description"]
    if desc.get("kind") != "masked_signal_model":
        raise BiofmError(f"{pretrained} is not a pretraining checkpoint (kind {desc.get('kind')!r})")
    old = list(desc["channels"])
    if cfg.pretrain_channels is not None and len(old) != cfg.pretrain_channels:
        raise ConfigError(f"{pretrained} has {len(old)} channels {old}, --pretrain-channels says {cfg.pretrain_channels}")
    check_data_spec(desc["data_spec"], data_spec, where=f"fine-tuning data vs {pretrained}")
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    ttm = TinyTimeMixerConfig.from_dict(desc["ttm_config"])
    if cfg.init == "pretrained":
        state = {k.removeprefix("encoder."): v for k, v in blob["model"].items() if k.startswith("encoder.")}
        encoder = inflate_encoder(state, ttm, old, channels, cfg.inflation, cfg.seed)
    else:
        torch.manual_seed(cfg.seed)
        encoder = Encoder(TinyTimeMixerConfig.from_dict({**ttm.to_dict(), "num_input_channels": len(channels)}))
    torch.manual_seed(cfg.seed)
    model = Classifier(encoder, dropout=cfg.dropout)
    description = {"kind": "ppg_quality_classifier", "ttm_config": json.loads(json.dumps(encoder.config.to_dict(), default=str)),
                   "channels": channels, "data_spec": data_spec, "pretrained": str(pretrained), "init": cfg.init,
                   "inflation": cfg.inflation, "pretrained_channels": old}
    return model, description


def load_classifier(path: str | Path) -> tuple[Classifier, dict]:
    """A fine-tuned classifier (CPU, eval mode) and its description (threshold included)."""
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    blob = checkpoint.load(path)
    desc = blob["description"]
    if desc.get("kind") != "ppg_quality_classifier":
        raise BiofmError(f"{path} is not a fine-tuned classifier")
    model = Classifier(Encoder(TinyTimeMixerConfig.from_dict(desc["ttm_config"])))
    if "norm.running_mean" not in blob["model"]:
        raise BiofmError(f"{path} was fine-tuned by an older biofm, whose classifier had no feature norm: "
                         "fine-tune it again")
    model.load_state_dict(blob["model"])
    return model.eval(), desc


def _present(column) -> np.ndarray:
    """The ``present`` column ``[N, C]`` as bool, whether it arrives as rows of lists or arrays."""
    return np.stack([np.asarray(r, dtype=bool) for r in column]) if len(column) else np.zeros((0, 0), bool)


def _optimizer(model: Classifier, cfg: FinetuneConfig, stage: int) -> torch.optim.Optimizer:
    train_encoder = cfg.init == "scratch"
    model.set_stage(stage, cfg.unfreeze_last_n, train_encoder)
    head = list(model.head.parameters())
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder_lr = cfg.head_lr if train_encoder else cfg.lr
    groups = [{"params": head, "lr": cfg.head_lr}] + ([{"params": encoder, "lr": encoder_lr}] if encoder else [])
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _gather(values: np.ndarray) -> np.ndarray:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, values)
        return np.concatenate(parts)
    return values


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. ``config``: ``cfg`` (FinetuneConfig fields), ``state``
    (the initial classifier state dict), ``description``, ``class_weights`` ``[2]``, ``train`` and
    ``val`` (:class:`~biofm.train.batches.Split`), ``repeat`` (per train record, or None),
    ``output_dir`` (for TensorBoard)."""
    import ray.train
    import ray.train.torch
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    output.configure_worker(config["quiet"])
    cfg = FinetuneConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    desc = config["description"]
    model = Classifier(Encoder(TinyTimeMixerConfig.from_dict(desc["ttm_config"])), dropout=cfg.dropout)
    model.load_state_dict(config["state"])
    autocast, scaler = mixed_precision(cfg.amp, device)
    state = {"epoch": 0, "history": [], "stage": 1, "attempts": 0}
    saved_optimizer = None
    blob = restored_training()
    if blob:
        model.load_state_dict(blob["model"])
        state |= {k: blob["training"][k] for k in state if k in blob["training"]}  # "attempts": absent in older runs
        saved_optimizer = blob["training"]["optimizer"]
        if blob["training"].get("scaler"):  # empty where AMP was off (CPU, bf16); absent before it was saved
            scaler.load_state_dict(blob["training"]["scaler"])
        if rank == 0:
            worker_print(f"[finetune] continuing from the checkpoint of epoch {state['epoch']}")
    state["attempts"] += 1
    model.to(device)
    criterion = torch.nn.CrossEntropyLoss(weight=torch.tensor(config["class_weights"], dtype=torch.float32, device=device))
    columns, world = ["signal", "present", "label"], ctx.get_world_size()
    train_batches = WindowBatches(config["train"], columns, cfg.batch_size, train=True, seed=cfg.seed, rank=rank,
                                  world=world, cache_mb=math.inf, repeat=config["repeat"], device=device)
    val_batches = WindowBatches(config["val"], columns, cfg.batch_size, rank=rank, world=world, cache_mb=math.inf,
                                device=device)
    optimizer, ddp, stage = None, None, None
    tracker = Tracker(config["output_dir"], storage.name(config["output_dir"]), config["cfg"]) if rank == 0 else None

    for epoch in range(state["epoch"], cfg.epochs):
        new_stage = 2 if cfg.init == "scratch" or epoch >= cfg.head_epochs else 1
        if new_stage != stage:
            stage = new_stage
            optimizer = _optimizer(model, cfg, stage)
            if saved_optimizer is not None and state["stage"] == stage:
                optimizer.load_state_dict(saved_optimizer)
            saved_optimizer = None
            # DDP must be rebuilt when the set of trainable parameters changes
            ddp = ray.train.torch.prepare_model(model, move_to_device=False) if ctx.get_world_size() > 1 else model
        seed_epoch(cfg.seed, rank, epoch)
        model.train()  # a frozen encoder stays in eval mode (Classifier.train)
        sums, clock = np.zeros(3), WaitClock(train_batches.epoch(epoch))
        for batch in clock:
            x, m, y = batch["signal"], batch["present"], batch["label"]
            with autocast():
                logits = ddp(x, m)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            sums += [loss.item() * len(y), (logits.argmax(-1) == y).sum().item(), len(y)]
        ingest = clock.metrics()
        probs, labels = [], []
        model.eval()
        with torch.no_grad():
            for batch in val_batches.epoch(epoch):
                probs.append(torch.softmax(model(batch["signal"], batch["present"]).float(), -1)[:, 1].cpu().numpy())
                labels.append(batch["label"].cpu().numpy())
        p = _gather(np.concatenate(probs) if probs else np.zeros(0))
        y = _gather(np.concatenate(labels) if labels else np.zeros(0, np.int64))
        loss_sum, correct, n = (float(v) for v in _gather(sums[None]).sum(axis=0))
        val = classification_metrics(y, p, choose_threshold(y, p))
        w = np.asarray(config["class_weights"])[y]  # the weighted mean, as CrossEntropyLoss(weight=...)
        val_loss = float(np.sum(-w * np.log(np.clip(np.where(y == 1, p, 1 - p), 1e-7, 1))) / max(w.sum(), 1e-12))
        auroc = val["auroc"] if np.isfinite(val["auroc"]) else 0.5
        metrics = {"epoch": epoch + 1, "stage": stage, "train_loss": loss_sum / max(n, 1), "train_accuracy": correct / max(n, 1),
                   "val_loss": val_loss, "val_auroc": auroc, "val_auprc": val["auprc"],
                   "val_balanced_accuracy": val["balanced_accuracy"], "val_f1_good": val["f1_good"],
                   "val_accuracy": val["accuracy"], "records_per_s": n / ingest["train_s"], **ingest,
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "attempt": state["attempts"]}
        state.update(epoch=epoch + 1, stage=stage)
        state["history"].append({**metrics, "val_confusion": val["confusion"]})  # [[tn, fp], [fn, tp]]
        report_epoch(metrics, rank, lambda path: checkpoint.save(
            path, model.state_dict(), desc, {**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}))
        if rank == 0:
            tracker.log(metrics, epoch + 1)
            worker_print(f"[finetune] epoch {epoch + 1}/{cfg.epochs} stage {stage} train loss "
                         f"{metrics['train_loss']:.4f} val AUROC {auroc:.3f} balanced acc {val['balanced_accuracy']:.3f}, "
                         f"{data_wait_note(metrics)}")
    if tracker:
        tracker.close()


def class_weights(class_balance: str, labels: np.ndarray) -> list[float]:
    """The cross-entropy weights ``[poor, good]``: with ``weighted`` balance ``n / (2 n_class)``
    (each class weighs as much in the loss), else ``[1, 1]``."""
    if class_balance != "weighted":
        return [1.0, 1.0]
    return (len(labels) / (2 * np.bincount(labels, minlength=2))).tolist()


def oversampling(class_balance: str, labels: np.ndarray) -> np.ndarray | None:
    """How often each training record counts per epoch: with ``sampler`` balance the minority
    class's records are repeated so both classes are seen about equally often; else None."""
    counts = np.bincount(labels, minlength=2)
    if class_balance != "sampler" or counts.min() == 0:
        return None
    minority, repeat = int(np.argmin(counts)), int(round(counts.max() / counts.min()))
    return np.where(labels == minority, repeat, 1)


def finetune(cfg: FinetuneConfig, pretrained: str | Path | None, data_dir: str | Path, output_dir: str | Path,
             address: str | None = None, resume: bool = False, run_name: str = RUN_NAME, callbacks=()) -> dict:
    """Fine-tune on ``<data_dir>/{train,val,test}`` and write the artifacts to ``output_dir``
    (each a local path or a URI); returns the test metrics. ``run_name`` and ``callbacks``: for a
    run inside a Ray Tune trial."""
    from biofm.preprocess import ensure_ray, same_data

    data_dir, output_dir = storage.normalize(data_dir), storage.normalize(output_dir)
    split_dir = functools.partial(storage.join, data_dir)
    ray_dir = check_run_dir(output_dir, resume, "fine-tuning", run_name)
    for split in ("train", "val", "test"):
        if not storage.list_files(split_dir(split), ".parquet"):
            raise BiofmError(f"no BUT-PPG records in {split_dir(split)}: run `biofm prepare-butppg` first")
    train, val, test = (scan(split_dir(s)) for s in ("train", "val", "test"))
    for split, other in (("val", val), ("test", test)):
        if not same_data(other.spec, train.spec):
            raise ConfigError(f"{data_dir}/{split} was made with other settings than {data_dir}/train")
    model, description = build_classifier(cfg, pretrained, train.spec)
    train_labels = storage.read_table(list(train.files), columns=["label"]).column("label").to_numpy().astype(np.int64)
    counts = np.bincount(train_labels, minlength=2)
    if counts.min() == 0:
        raise BiofmError(f"{data_dir}/train has only one class ({counts.tolist()} poor/good records)")
    weights = class_weights(cfg.class_balance, train_labels)
    ensure_ray(address)
    loop_config = {"cfg": dataclasses.asdict(cfg), "state": model.state_dict(), "description": description,
                   "class_weights": weights, "train": train, "val": val, "output_dir": output_dir,
                   "repeat": oversampling(cfg.class_balance, train_labels)}
    best, history = fit(train_loop, loop_config, cfg, ray_dir, "val_auroc", "max", run_name, callbacks)
    return write_artifacts(output_dir, best, history, cfg, data_dir, pretrained)


def write_artifacts(output_dir: str, best: dict, history: list[dict], cfg: FinetuneConfig, data_dir: str,
                    pretrained) -> dict:
    """Threshold on val, metrics on test; best_model.pt, training_history.json,
    training_config.json, test_metrics.json, roc_curve.png, learning_curves.png."""
    from biofm.train.plots import plot_history, plot_roc

    model = Classifier(Encoder(_config(best)))
    model.load_state_dict(best["model"])
    val, test = read_split(storage.join(data_dir, "val")), read_split(storage.join(data_dir, "test"))
    p_val = predict(model, val["signal"], val["present"])
    threshold = choose_threshold(val["label"], p_val)
    p_test = predict(model, test["signal"], test["present"])
    metrics = {"test": classification_metrics(test["label"], p_test, threshold),
               "val": classification_metrics(val["label"], p_val, threshold),
               "best_epoch": best["training"]["epoch"], "threshold_from": "val (Youden's J)"}
    metrics["warnings"] = classifier_warnings(metrics["val"], "val") + classifier_warnings(metrics["test"], "test")
    description = {**best["description"], "threshold": threshold}
    out = functools.partial(storage.join, output_dir)
    checkpoint.save(out("best_model.pt"), best["model"], description)
    storage.write_text(out("training_history.json"), json.dumps(history, indent=1))
    storage.write_text(out("training_config.json"), json.dumps(
        {**to_jsonable(cfg), "pretrained": str(pretrained), "data_dir": data_dir,
         "best_epoch": best["training"]["epoch"], "threshold": threshold}, indent=1))
    storage.write_text(out("test_metrics.json"), json.dumps(metrics, indent=1))
    plot_roc({"val": (val["label"], p_val), "test": (test["label"], p_test)}, out("roc_curve.png"))
    stage2 = next((h["epoch"] for h in history if h["stage"] == 2), None)
    plot_history(history, {"loss": ("cross-entropy", ("train_loss", "val_loss")),
                           "validation": ("AUROC / balanced accuracy", ("val_auroc", "val_balanced_accuracy"))},
                 out("learning_curves.png"), (stage2, "stage 2 starts") if stage2 else None)
    m = metrics["test"]
    print(f"[finetune] test ({m['n']} records, {m['positives']} good): AUROC {m['auroc']:.3f} AUPRC {m['auprc']:.3f} "
          f"balanced acc {m['balanced_accuracy']:.3f} F1(good) {m['f1_good']:.3f} at threshold {threshold:.3f}", flush=True)
    for warning in metrics["warnings"]:
        print(f"[finetune] warning: {warning}", flush=True)
    return metrics


def _config(blob: dict):
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    return TinyTimeMixerConfig.from_dict(blob["description"]["ttm_config"])
