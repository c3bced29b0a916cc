"""Staged fine-tuning of the inflated TTM encoder on a labelled task (BUT-PPG quality by default),
on Ray Train.

:func:`finetune` builds the model on the driver (inflating the pretrained encoder to the data's
channels, or a random one for ``init = scratch``) with a head for the task's kind (:mod:`biofm.tasks`):
binary and multiclass (softmax, class-weighted cross-entropy), regression (one output on the
standardised target, Huber or MSE loss). It streams ``<data_dir>/{train,val}`` into
:func:`train_loop`, keeps the checkpoint with the best val figure (:data:`SELECTION`), picks a
binary task's decision threshold on val, and evaluates once on test. Stage 1 trains the head
only, stage 2 the head and the last N mixer layers. Tasks are small (BUT-PPG: 3,888 records,
about 100 MB): every worker holds its splits in memory (:mod:`biofm.train.batches`) and
reshuffles them every epoch.
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
from biofm.model.classifier import Classifier, channel_plan, inflate_encoder
from biofm.model.ssl import Encoder
from biofm.train import checkpoint
from biofm.train.batches import WaitClock, WindowBatches, data_wait_note, scan
from biofm.train.metrics import METRICS, choose_threshold, classification_metrics, classifier_warnings, slug
from biofm.train.metrics import metrics as task_metrics
from biofm.train.ray_run import (RUN_NAME, check_run_dir, fit, mixed_precision, report_epoch, restored_training,
                                 seed_epoch, worker_print)
from biofm.train.step import adamw, step, where_kept
from biofm.train.tracking import Tracker

SELECTION = {"binary": ("val_auroc", "max"), "multiclass": ("val_macro_f1", "max"), "regression": ("val_mae", "min")}
BUTPPG_QUALITY = {"name": "butppg-quality", "kind": "binary", "classes": ["poor", "good"]}  # data made before tasks


def task_of(description: dict) -> dict:
    """The task a fine-tuned model (or a fine-tuning run) was made for (:class:`biofm.tasks.Task` as a dict)."""
    return description.get("task", BUTPPG_QUALITY)


def outputs_for(task: dict) -> int:
    """The head's outputs: one per class, or one value."""
    return 1 if task["kind"] == "regression" else len(task["classes"])

def read_split(split_dir: str | Path, channels: list[str] | None = None) -> dict[str, np.ndarray]:
    """A task's split read whole (they are small): ``signal [N, C, T]``, ``present [N, C]``,
    ``label [N]`` int64 (or ``target [N]`` float64), ``case_id [N]``. ``channels``: the model's, by
    name (None: as stored); a channel the split lacks is zeros, not present."""
    files = list(storage.list_files(split_dir, ".parquet"))
    if not files:
        raise BiofmError(f"no labelled windows in {split_dir}: write the task with `biofm prepare-task` "
                         "(BUT-PPG: `biofm prepare-butppg`)")
    names = storage.read_metadata(files[0]).schema.names
    if "case_id" not in names:
        raise BiofmError(f"{split_dir} was prepared by an older biofm (no case_id column): prepare it again")
    value = "target" if "target" in names else "label"
    table = storage.read_table(files, columns=["case_id", value, "signal", "present"])
    signal = table.column("signal").combine_chunks().to_numpy_ndarray().astype(np.float32)
    present = _present(table.column("present").to_pylist())
    if channels is not None:
        from biofm.dataset import read_data_spec

        signal, present = by_name(signal, present, read_data_spec(split_dir)["channels"], channels)
    return {"signal": signal, "present": present, "case_id": np.array(table.column("case_id").to_pylist()),
            value: table.column(value).to_numpy().astype(np.float64 if value == "target" else np.int64)}


def by_name(signal: np.ndarray, present: np.ndarray, stored: list[str], channels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``signal [N, C_stored, T]`` and ``present [N, C_stored]`` in the order of ``channels``; a
    channel not ``stored`` is zeros, not present."""
    rows = [stored.index(c) if c in stored else -1 for c in channels]
    return (np.stack([signal[:, r] if r >= 0 else np.zeros_like(signal[:, 0]) for r in rows], axis=1),
            np.stack([present[:, r] if r >= 0 else np.zeros(len(present), bool) for r in rows], axis=1))


@torch.no_grad()
def predict_outputs(model: Classifier, signal: np.ndarray, present: np.ndarray, description: dict,
                    batch_size: int = 64, device="cpu") -> np.ndarray:
    """The model's answers for ``signal [N, C, T]``: class probabilities ``[N, K]``, or a
    regression task's values ``[N]`` in the target's units."""
    model.eval()
    out = []
    for i in range(0, len(signal), batch_size):
        x = torch.from_numpy(signal[i:i + batch_size]).to(device)
        m = torch.from_numpy(present[i:i + batch_size]).to(device)
        out.append(model(x, m).float().cpu())
    logits = torch.cat(out) if out else torch.zeros(0, outputs_for(task_of(description)))
    if task_of(description)["kind"] == "regression":
        return logits[:, 0].numpy() * description["target_std"] + description["target_mean"]
    return torch.softmax(logits, dim=-1).numpy()


def predict(model: Classifier, signal: np.ndarray, present: np.ndarray, batch_size: int = 64, device="cpu") -> np.ndarray:
    """A binary model's probability of its positive class (label 1) ``[N]`` for ``signal [N, C, T]``."""
    return predict_outputs(model, signal, present, {}, batch_size, device)[:, 1]


def build_classifier(cfg: FinetuneConfig, pretrained: str | Path | None, data_spec: dict,
                     task: dict | None = None) -> tuple[Classifier, dict]:
    """The model for ``task`` (default: BUT-PPG quality) on data of ``data_spec``, and its
    description (for checkpoints). Its channels, by name (:func:`channel_plan`): the config's
    (default: the data's), then the pretrained encoder's that they lack (absent); a channel the
    encoder lacks is added by inflation (``cfg.inflation``).

    ``init = pretrained`` inflates the encoder of ``pretrained`` (a pretraining checkpoint,
    whose data spec must match: rate, window, filters); ``scratch`` builds the same architecture
    with random weights."""
    from biofm.dataset import check_data_spec

    if pretrained is None:
        raise ConfigError("--pretrained is required: the pretraining checkpoint gives the architecture "
                          "(and, unless --init scratch, the weights)")
    blob = checkpoint.load(pretrained)
    desc = blob["description"]
    if desc.get("kind") != "masked_signal_model":
        raise BiofmError(f"{pretrained} is not a pretraining checkpoint (kind {desc.get('kind')!r})")
    old = list(desc["channels"])
    if cfg.pretrain_channels is not None and list(cfg.pretrain_channels) != old:
        raise ConfigError(f"{pretrained} has channels {old}, --pretrain-channels says {list(cfg.pretrain_channels)}")
    check_data_spec(desc["data_spec"], data_spec, where=f"fine-tuning data vs {pretrained}")
    wanted = list(cfg.channels or data_spec["channels"])
    if not set(wanted) & set(data_spec["channels"]):
        raise ConfigError(f"the fine-tuning channels {wanted} are none of the data's {list(data_spec['channels'])}")
    channels = channel_plan(old, wanted)
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    ttm = TinyTimeMixerConfig.from_dict(desc["ttm_config"])
    if cfg.init == "pretrained":
        state = {k.removeprefix("encoder."): v for k, v in blob["model"].items() if k.startswith("encoder.")}
        encoder = inflate_encoder(state, ttm, old, channels, cfg.inflation, cfg.seed)
    else:
        torch.manual_seed(cfg.seed)
        encoder = Encoder(TinyTimeMixerConfig.from_dict({**ttm.to_dict(), "num_input_channels": len(channels)}))
    task = task or BUTPPG_QUALITY
    torch.manual_seed(cfg.seed)
    model = Classifier(encoder, num_classes=outputs_for(task), dropout=cfg.dropout)
    filters = {**desc["data_spec"]["filters"], **data_spec["filters"]}
    spec = {**data_spec, "channels": channels, "filters": {c: filters[c] for c in channels}}
    description = {"kind": "ppg_quality_classifier", "ttm_config": json.loads(json.dumps(encoder.config.to_dict(), default=str)),
                   "channels": channels, "data_spec": spec, "pretrained": str(pretrained), "init": cfg.init,
                   "inflation": cfg.inflation, "pretrained_channels": old, "task": task,
                   "absent": [c for c in channels if c not in data_spec["channels"]]}
    return model, description


def load_classifier(path: str | Path) -> tuple[Classifier, dict]:
    """A fine-tuned classifier (CPU, eval mode) and its description (threshold included)."""
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    blob = checkpoint.load(path)
    desc = blob["description"]
    if desc.get("kind") != "ppg_quality_classifier":
        raise BiofmError(f"{path} is not a fine-tuned classifier")
    model = Classifier(Encoder(TinyTimeMixerConfig.from_dict(desc["ttm_config"])), num_classes=outputs_for(task_of(desc)))
    if "norm.running_mean" not in blob["model"]:
        raise BiofmError(f"{path} was fine-tuned by an older biofm, whose classifier had no feature norm: "
                         "fine-tune it again")
    model.load_state_dict(blob["model"])
    return model.eval(), desc


def _data_task(split_dir: str) -> dict:
    """The task of a prepared split (BUT-PPG quality for a folder prepared before tasks were)."""
    from biofm.tasks import TASK_KEY, read_task

    metadata = storage.read_metadata(next(iter(storage.list_files(split_dir, ".parquet")))).metadata or {}
    return dataclasses.asdict(read_task(split_dir)) if TASK_KEY in metadata else BUTPPG_QUALITY


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
    return adamw(groups, weight_decay=cfg.weight_decay)


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
    kind = task_of(desc)["kind"]
    model = Classifier(Encoder(TinyTimeMixerConfig.from_dict(desc["ttm_config"])), num_classes=outputs_for(task_of(desc)),
                       dropout=cfg.dropout)
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
    criterion = _criterion(kind, cfg, config["class_weights"], desc, device)
    columns, world = ["signal", "present", "target" if kind == "regression" else "label"], ctx.get_world_size()
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
        clock = WaitClock(train_batches.epoch(epoch))
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss x records, correct, records, skipped steps
        trained = [p for p in model.parameters() if p.requires_grad]
        for batch in clock:
            x, m, y = batch["signal"], batch["present"], batch[columns[2]]
            with autocast():
                logits = ddp(x, m)
            total, weight = criterion(logits.float(), y)
            loss = total / weight.clamp(min=1e-12)
            skipped = step(loss, optimizer, scaler, trained, cfg.grad_clip)
            correct = (logits.argmax(-1) == y).sum() if kind != "regression" else loss.new_zeros(())
            counts = torch.stack([loss.detach() * len(y), correct, torch.ones_like(loss) * len(y)]).double()
            sums[:3] += where_kept(skipped, counts)
            sums[3] += skipped
        ingest = clock.metrics()
        answers, truths = [], []
        model.eval()
        with torch.no_grad():
            for batch in val_batches.epoch(epoch):
                answers.append(model(batch["signal"], batch["present"]).float().cpu())
                truths.append(batch[columns[2]].cpu().numpy())
        logits = torch.cat(answers) if answers else torch.zeros(0, outputs_for(task_of(desc)))
        y = _gather(np.concatenate(truths) if truths else np.zeros(0))
        loss_sum, correct, n, bad = (float(v) for v in _gather(sums.cpu().numpy()[None]).sum(axis=0))
        total, weight = criterion(logits, torch.as_tensor(np.concatenate(truths) if truths else np.zeros(0)))
        total, weight = _gather(np.array([[total.item(), weight.item()]])).sum(axis=0)
        val_loss = float(total / max(weight, 1e-12))  # the weighted mean, as the training loss
        metrics = {"epoch": epoch + 1, "stage": stage, "train_loss": loss_sum / max(n, 1), "val_loss": val_loss}
        if kind == "regression":
            pred = _gather(logits[:, 0].numpy() * desc["target_std"] + desc["target_mean"])
            val = {}
            metrics |= {f"val_{k}": v for k, v in task_metrics(kind, y, pred).items()}
        elif kind == "multiclass":
            val = {}
            metrics |= {"train_accuracy": correct / max(n, 1),
                        **{f"val_{k}": v for k, v in task_metrics(kind, y.astype(np.int64),
                                                                  _gather(torch.softmax(logits, -1).numpy())).items()}}
        else:
            p, y = _gather(torch.softmax(logits, -1)[:, 1].numpy()), y.astype(np.int64)
            f1 = f"f1_{slug(task_of(desc)['classes'][1])}"
            val = classification_metrics(y, p, choose_threshold(y, p), task_of(desc)["classes"][1])
            metrics |= {"train_accuracy": correct / max(n, 1), "val_auroc": val["auroc"] if np.isfinite(val["auroc"]) else 0.5,
                        "val_auprc": val["auprc"], "val_balanced_accuracy": val["balanced_accuracy"],
                        f"val_{f1}": val[f1], "val_accuracy": val["accuracy"]}
        metrics |= {"records_per_s": n / ingest["train_s"], **ingest, "bad_steps": round(bad / world),
                    "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "attempt": state["attempts"]}
        state.update(epoch=epoch + 1, stage=stage)
        state["history"].append({**metrics, **({"val_confusion": val["confusion"]} if val else {})})  # [[tn, fp], [fn, tp]]
        report_epoch(metrics, rank, lambda path: checkpoint.save(
            path, model.state_dict(), desc, {**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}))
        if rank == 0:
            tracker.log(metrics, epoch + 1)
            shown = (f"val AUROC {metrics['val_auroc']:.3f} balanced acc {val['balanced_accuracy']:.3f}" if val else
                     ", ".join(f"val {k} {metrics[f'val_{k}']:.3f}" for k in METRICS[kind]))
            worker_print(f"[finetune] epoch {epoch + 1}/{cfg.epochs} stage {stage} train loss "
                         f"{metrics['train_loss']:.4f} {shown}, {data_wait_note(metrics)}")
    if tracker:
        tracker.close()


def _criterion(kind: str, cfg: FinetuneConfig, weights: list[float], desc: dict, device):
    """``loss(logits [B, K], y [B]) -> (sum, weight)`` over a batch; the loss is ``sum / weight``.
    Classes: cross-entropy weighted by ``weights`` (per class; the weight is theirs summed, as
    ``CrossEntropyLoss(weight=...)`` averages). Regression: Huber (or MSE: ``cfg.regression_loss``)
    on the target standardised by the training split's mean and SD (the weight is the count)."""
    import torch.nn.functional as F

    if kind == "regression":
        mean, std = desc["target_mean"], desc["target_std"]
        fn = F.huber_loss if cfg.regression_loss == "huber" else F.mse_loss

        def loss(logits, y):
            per = fn(logits[:, 0], (y.to(logits.device, logits.dtype) - mean) / std, reduction="none")
            return per.sum(), torch.tensor(float(len(y)), device=logits.device)
    else:
        w = torch.tensor(weights, dtype=torch.float32, device=device)

        def loss(logits, y):
            y, wd = y.to(logits.device, torch.int64), w.to(logits.device)
            return F.cross_entropy(logits, y, weight=wd, reduction="none").sum(), wd[y].sum()
    return loss


def class_weights(class_balance: str, labels: np.ndarray, classes: int = 2) -> list[float]:
    """The cross-entropy weights per class: with ``weighted`` balance ``n / (K n_class)`` (each
    class weighs as much in the loss; 0 for a class without records), else all 1."""
    if class_balance != "weighted":
        return [1.0] * classes
    counts = np.bincount(labels, minlength=classes)
    return np.where(counts > 0, len(labels) / (classes * np.maximum(counts, 1)), 0.0).tolist()


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
    from biofm.dataset import same_data
    from biofm.ray_connect import ensure_ray

    data_dir, output_dir = storage.normalize(data_dir), storage.normalize(output_dir)
    split_dir = functools.partial(storage.join, data_dir)
    ray_dir = check_run_dir(output_dir, resume, "fine-tuning", run_name)
    for split in ("train", "val", "test"):
        if not storage.list_files(split_dir(split), ".parquet"):
            raise BiofmError(f"no labelled windows in {split_dir(split)}: write the task with `biofm prepare-task` "
                             "(BUT-PPG: `biofm prepare-butppg`)")
    train, val, test = (scan(split_dir(s)) for s in ("train", "val", "test"))
    for split, other in (("val", val), ("test", test)):
        if not same_data(other.spec, train.spec):
            raise ConfigError(f"{data_dir}/{split} was made with other settings than {data_dir}/train")
    task = _data_task(split_dir("train"))
    model, description = build_classifier(cfg, pretrained, train.spec, task)
    channels = description["channels"]
    if description["absent"]:
        print(f"[finetune] the data has no {', '.join(description['absent'])}: zeros, marked absent", flush=True)
    left_out = [c for c in train.spec["channels"] if c not in channels]
    if left_out:
        print(f"[finetune] the model reads {', '.join(channels)}: the data's {', '.join(left_out)} left out", flush=True)
    train, val = (scan(split_dir(s), channels, absent_ok=True) for s in ("train", "val"))
    values = read_split(split_dir("train"))["target" if task["kind"] == "regression" else "label"]
    if task["kind"] == "regression":
        if not len(values) or np.std(values) == 0:
            raise BiofmError(f"{data_dir}/train: the target has no spread ({len(values)} windows): nothing to learn")
        description.update(target_mean=float(np.mean(values)), target_std=float(np.std(values)))
        weights, repeat = [], None
    else:
        counts = np.bincount(values, minlength=len(task["classes"]))
        if (counts > 0).sum() < 2:
            raise BiofmError(f"{data_dir}/train has only one class ({dict(zip(task['classes'], counts.tolist()))})")
        if cfg.class_balance == "sampler" and task["kind"] != "binary":
            raise ConfigError(f"class_balance sampler oversamples one minority class: a binary task's; {task['name']} "
                              "is multiclass (use weighted)")
        weights, repeat = class_weights(cfg.class_balance, values, len(task["classes"])), oversampling(cfg.class_balance, values)
    ensure_ray(address)
    loop_config = {"cfg": dataclasses.asdict(cfg), "state": model.state_dict(), "description": description,
                   "class_weights": weights, "train": train, "val": val, "output_dir": output_dir, "repeat": repeat}
    best, history = fit(train_loop, loop_config, cfg, ray_dir, *SELECTION[task["kind"]], run_name, callbacks)
    return write_artifacts(output_dir, best, history, cfg, data_dir, pretrained)


def write_artifacts(output_dir: str, best: dict, history: list[dict], cfg: FinetuneConfig, data_dir: str,
                    pretrained) -> dict:
    """Metrics on val and test (a binary task's threshold chosen on val); best_model.pt,
    training_history.json, training_config.json, test_metrics.json, learning_curves.png (and a
    binary task's roc_curve.png)."""
    from biofm.train.plots import plot_history, plot_roc

    task = task_of(best["description"])
    kind = task["kind"]
    model = Classifier(Encoder(_config(best)), num_classes=outputs_for(task))
    model.load_state_dict(best["model"])
    channels = best["description"]["channels"]
    val, test = (read_split(storage.join(data_dir, s), channels) for s in ("val", "test"))
    out = functools.partial(storage.join, output_dir)
    description, threshold = best["description"], None
    if kind == "binary":
        negative, positive = task["classes"]
        p_val = predict(model, val["signal"], val["present"])
        threshold = choose_threshold(val["label"], p_val)
        p_test = predict(model, test["signal"], test["present"])
        metrics = {"test": classification_metrics(test["label"], p_test, threshold, positive),
                   "val": classification_metrics(val["label"], p_val, threshold, positive),
                   "best_epoch": best["training"]["epoch"], "threshold_from": "val (Youden's J)", "positive": positive}
        metrics["warnings"] = (classifier_warnings(metrics["val"], "val", task["classes"])
                               + classifier_warnings(metrics["test"], "test", task["classes"]))
        description = {**description, "threshold": threshold}
        plot_roc({"val": (val["label"], p_val), "test": (test["label"], p_test)}, out("roc_curve.png"),
                 f"{task['name']}: {positive} vs {negative}")
        curves, loss_name = ("AUROC / balanced accuracy", ("val_auroc", "val_balanced_accuracy")), "cross-entropy"
        m = metrics["test"]
        line = (f"test ({m['n']} windows, {m['positives']} {positive}): AUROC {m['auroc']:.3f} AUPRC {m['auprc']:.3f} "
                f"balanced acc {m['balanced_accuracy']:.3f} F1({positive}) {m[f'f1_{slug(positive)}']:.3f} "
                f"at threshold {threshold:.3f}")
    else:
        column = "target" if kind == "regression" else "label"
        metrics = {split: {"n": int(len(d[column])), **task_metrics(kind, d[column], predict_outputs(
                       model, d["signal"], d["present"], description))} for split, d in (("test", test), ("val", val))}
        metrics |= {"best_epoch": best["training"]["epoch"], "warnings": []}
        curves = (" / ".join(METRICS[kind][:2]), tuple(f"val_{k}" for k in METRICS[kind][:2]))
        loss_name = f"{cfg.regression_loss} (standardised target)" if kind == "regression" else "cross-entropy"
        unit = f" {task.get('unit') or ''}".rstrip()
        if kind == "regression":
            metrics |= {"target": task.get("target", ""), "unit": task.get("unit", "")}
        shown = ", ".join(f"{k} {metrics['test'][k]:.3f}{unit if k in ('mae', 'rmse') else ''}" for k in METRICS[kind])
        line = f"test ({metrics['test']['n']} windows{', ' + task['target'] if kind == 'regression' and task.get('target') else ''}): {shown}"
    checkpoint.save(out("best_model.pt"), best["model"], description)
    storage.write_text(out("training_history.json"), json.dumps(history, indent=1))
    storage.write_text(out("training_config.json"), json.dumps(
        {**to_jsonable(cfg), "pretrained": str(pretrained), "data_dir": data_dir, "task": task,
         "best_epoch": best["training"]["epoch"], "threshold": threshold}, indent=1))
    storage.write_text(out("test_metrics.json"), json.dumps(metrics, indent=1))
    stage2 = next((h["epoch"] for h in history if h["stage"] == 2), None)
    plot_history(history, {"loss": (loss_name, ("train_loss", "val_loss")), "validation": curves},
                 out("learning_curves.png"), (stage2, "stage 2 starts") if stage2 else None)
    print(f"[finetune] {line}", flush=True)
    for warning in metrics["warnings"]:
        print(f"[finetune] warning: {warning}", flush=True)
    return metrics


def _config(blob: dict):
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

    return TinyTimeMixerConfig.from_dict(blob["description"]["ttm_config"])
