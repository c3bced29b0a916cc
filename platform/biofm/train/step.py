"""The optimizer step of every training loop, and the compiled forward pass, without host syncs.

On a GPU, reading a value back (``.item()``, ``float(t)``, ``if t:``, a boolean index) stops the
host until the device has caught up, so kernel launches and GPU work add up instead of
overlapping. :func:`step` decides the NaN/Inf skip on the device and applies it without a branch:
fused AdamW takes a ``found_inf`` flag (as :class:`torch.amp.GradScaler` uses it) and leaves the
parameters, its moments and its step count as they were when the flag is set. Loss sums stay on
the device and the loops read them once per epoch. :func:`host_syncs` counts what would sync.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with its fused kernel (CPU and CUDA): one launch per step, and ``found_inf`` support."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list,
         grad_clip: float) -> torch.Tensor:
    """Backward pass of ``loss``, gradients of ``params`` clipped to norm ``grad_clip``, one step
    of ``optimizer`` (from :func:`adamw`), skipped when the loss or the gradient norm is NaN/Inf
    on any DDP rank (the loss flag is all-reduced; DDP's gradients are equal on every rank), so all
    ranks skip together. Returns the 0-d float ``skipped`` (1.0: skipped) on the loss's device,
    unread."""
    skipped = (~torch.isfinite(loss.detach())).float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(skipped, op=torch.distributed.ReduceOp.MAX)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # fp16 only; else a no-op
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    skipped = torch.maximum(skipped, (~torch.isfinite(norm)).float())
    optimizer.found_inf, optimizer.grad_scale = skipped, None
    optimizer.step()
    scaler.update()  # fp16: the scale from the overflows unscale_ found; else a no-op
    return skipped


def where_kept(skipped: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` of a step that was not skipped, zeros for one that was (a NaN times 0 is NaN)."""
    return torch.where(skipped > 0, torch.zeros_like(values), values)


def compiled_for_batch(fn, batch_size: int, device: torch.device, world: int = 1):
    """``fn(x, *args)`` (a model, or a model with its losses: one graph) compiled by
    ``torch.compile`` for batches ``x`` of exactly ``batch_size`` windows, with CUDA graphs on a
    single GPU; any other batch (an epoch's last) runs ``fn`` eagerly, so nothing is compiled
    again for it. Training and evaluation (``model.eval()``, no grad) compile a graph each."""
    graphs = device.type == "cuda" and world == 1
    compiled = torch.compile(fn, mode="reduce-overhead" if graphs else None, dynamic=False)

    def run(x, *args):
        if len(x) != batch_size:
            return fn(x, *args)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, *args)
    return run


def use_compile(setting: bool | None, device: torch.device) -> bool:
    """A config's ``compile``: None means on a GPU (off on a CPU, where the compiled step measured
    0.80-0.88 x the eager one's rate after a compile of about a minute: Performance docs)."""
    return device.type == "cuda" if setting is None else setting


def set_tf32(on: bool) -> None:
    """TF32 tensor cores for float32 matmuls on an NVIDIA GPU (PyTorch's default is full fp32);
    no effect on the CPU."""
    torch.set_float32_matmul_precision("high" if on else "highest")


# aten ops that read a device value back on the host: a scalar read (.item(), float(), bool(),
# a Python branch on a tensor) or an output whose size depends on the data (and boolean indexing)
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "bincount", "repeat_interleave")


class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self.counts["boolean index"] += 1  # a nonzero inside the kernel, which the mode does not see
        elif name in SYNCING_OPS and not (name == "repeat_interleave" and not isinstance(args[1], torch.Tensor)):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs():
    """Counts the aten calls inside the block that would make the host wait for a GPU
    (:data:`SYNCING_OPS`), on any device: ``with host_syncs() as counts: ...``, then
    ``counts`` maps op names to calls. Eager code only: a compiled graph runs as one call."""
    mode = _SyncCounter()
    with mode:
        yield mode.counts
