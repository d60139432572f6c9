"""Tensor helpers every layer shares: gradients taken out of `.grad` and put back, weight backups, state moved.

A method's gradients travel without copies where they can: `take_grads` hands `.grad`'s own fp32 tensors over
(unscaled in place), `set_grads` hands them back. Backups are restored by copy, never by subtracting what was
added (x + e - e is not x in floating point).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters the base optimizer updates (with PEFT: only the adapters), each once, in group order."""
    seen, out = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a method computes directions and keeps state in: fp32, or float64 for a float64 tensor (an fp32
    buffer would round a float64 run to about 1e-8)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def zero_grads(params) -> None:
    for p in params:
        p.grad = None


@torch.no_grad()
def take_grads(params, scale: float) -> list[torch.Tensor | None]:
    """The gradients a pass left in `.grad`, taken out as unscaled fp32 (float64 for float64 parameters; None where
    a parameter got none).

    An fp32 (float64) contiguous `.grad` is handed over as it is, divided by `scale` in place (no copy); any other
    is converted once. `.grad` is cleared: the tensors now belong to the caller (the method's state, the exchange's
    send buffers, the next `.grad`)."""
    out = []
    for p in params:
        g, p.grad = p.grad, None
        if g is not None:
            if g.requires_grad:  # else `.grad` itself is handed over (a layout may track it: DeepSpeed's views)
                g = g.detach()
            dtype = work_dtype(p)
            if g.dtype != dtype or not g.is_contiguous():
                g = g.to(dtype, memory_format=torch.contiguous_format, copy=True)
            if scale != 1.0:
                g.div_(scale)
        out.append(g)
    return out


@torch.no_grad()
def set_grads(params, grads, scale: float) -> None:
    """.grad <- grads * scale (in the parameter's dtype); None stays None. `grads` are the caller's to give away:
    fp32 ones become `.grad` as they are, rescaled in place (the caller must not keep them)."""
    for p, g in zip(params, grads):
        if g is not None and scale != 1.0:
            g.mul_(scale)
        p.grad = None if g is None else g.to(p.dtype)


@torch.no_grad()
def backup(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params, saved) -> None:
    """Copy the saved weights back (never subtract e: x + e - e is not x in floating point); a None entry is a
    parameter that was not moved."""
    for p, s in zip(params, saved):
        if s is not None:
            p.copy_(s)


def as_tensor(value, device) -> torch.Tensor:
    """A metric or loss as a detached tensor on `device` (floats from the role exchange included)."""
    return value.detach().to(device) if torch.is_tensor(value) else torch.tensor(float(value), device=device)


def to_device(obj, device):
    """Tensors inside nested lists and dicts (checkpointed method state) moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj


@contextlib.contextmanager
def frozen_running_stats(modules):
    """Leave BatchNorm running statistics as they were before the pass (a pass at perturbed weights)."""
    saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None}) for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


def batchnorms(model) -> list[torch.nn.Module]:
    """The BatchNorm modules that track running statistics."""
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


# ---- which parameters belong to normalization layers (SAM-ON) -----------------------------------------------
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_NORM_NAMES = ("LayerNorm", "RMSNorm", "BatchNorm", "GroupNorm", "InstanceNorm")


def is_norm_layer(module: nn.Module) -> bool:
    """A normalization layer by type: torch's norms, or a class named *Norm / *LayerNorm* / *RMSNorm* ..."""
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith("Norm") or any(n in name for n in _NORM_NAMES)


def norm_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that belong to a normalization layer (its own, not its children's)."""
    return {id(p) for m in model.modules() if is_norm_layer(m) for p in m.parameters(recurse=False)}
