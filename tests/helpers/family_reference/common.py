"""Shared plumbing for the family references: gradients, norms, perturb-and-restore, one base step.

Conventions (every reference in this folder follows them):

* x: the trainable parameters, `trainable(model)` (those with `requires_grad`), in `model.parameters()` order.
  A "vector" is a list of tensors shaped like x; `dot` and `norm` are global over the whole list.
* `loss_fn(model, batch)` returns the per-example losses, shape [n]; the batch loss is their mean.
  References that need logits take `logits_fn(model, batch)` and read the labels from `batch["y"]`
  (and the example ids from `batch["idx"]` for SAF).
* A gradient is `torch.autograd.grad` of the batch loss: `.grad` is never read, so a reference cannot pick up
  a stale gradient; the base optimizer sees only what the reference hands it (`base_step`).
* Perturbed weights are restored by copying the saved tensors back (never by subtracting e).
* `freeze_bn=True` keeps BatchNorm running statistics unchanged during a pass at perturbed weights
  (sam_hf's default `bn_stats="clean"`); pass False to mimic code that lets every pass update them.
* `eps` arguments: 0 is the papers' exact formula (a zero norm then gives no perturbation); the authors' code
  adds a small constant to a norm in a denominator, and passing it here reproduces that code bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

Vector = list[Tensor]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((u * v).sum() for u, v in zip(a, b))


def norm(a: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum((u * u).sum() for u in a))


def scaled(a: Sequence[Tensor], c) -> Vector:
    return [u * c for u in a]


def axpy(alpha, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vector:
    """alpha * x + y."""
    return [alpha * u + v for u, v in zip(x, y)]


def direction(g: Sequence[Tensor], rho: float, eps: float = 0.0, denom: Tensor | None = None) -> Vector:
    """rho * g / (||g|| + eps); zeros when the norm is zero or not finite (no perturbation that step)."""
    n = norm(g) if denom is None else denom
    if not torch.isfinite(n) or (eps == 0.0 and n == 0):
        return [torch.zeros_like(u) for u in g]
    return scaled(g, rho / (n + eps))


def gradient(model: nn.Module, loss_fn: Callable, batch, params: Sequence[Tensor] | None = None) -> Vector:
    """grad of mean(loss_fn(model, batch)) w.r.t. params (default: the trainable parameters); unused -> 0."""
    params = trainable(model) if params is None else list(params)
    loss = loss_fn(model, batch).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def frozen_bn(model: nn.Module, enabled: bool = True):
    """BatchNorm running statistics (and counters) as they were before the block."""
    saved = [(b, b.detach().clone()) for m in (batchnorms(model) if enabled else []) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@contextlib.contextmanager
def placed(params: Sequence[Tensor], values: Sequence[Tensor]):
    """x <- values inside the block (e.g. SAMPa's y_{t+1}); x copied back afterwards."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


def perturbed(params: Sequence[Tensor], e: Sequence[Tensor]):
    """x <- x + e inside the block; x copied back afterwards (exact restore). x + e rounds as x.add_(e) would."""
    return placed(params, [p.detach() + u for p, u in zip(params, e)])


def gradient_at(model, loss_fn, batch, params, e, freeze_bn: bool = True) -> Vector:
    """grad f(x + e, batch), weights restored afterwards."""
    with perturbed(params, e), frozen_bn(model, freeze_bn):
        return gradient(model, loss_fn, batch, params)


def base_step(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """One step of the base optimizer with the given gradient (its state, lr, weight decay as configured)."""
    for p, g in zip(params, grads):
        p.grad = g.detach().clone()
    optimizer.step()
    for p in params:
        p.grad = None


def lookahead(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Vector:
    """ModelUpdate_{m_t}(x_t, g): the point the base optimizer would step to, computed by stepping a saved copy.

    Exact for any torch optimizer: the optimizer state, the weights and the gradients are restored, so the
    state m_t is left as it was (SAMPa, Algorithm 2, line 6)."""
    state = copy.deepcopy(optimizer.state_dict())
    saved = [p.detach().clone() for p in params]
    base_step(optimizer, params, grads)
    y = [p.detach().clone() for p in params]
    optimizer.load_state_dict(state)
    with torch.no_grad():
        for p, v in zip(params, saved):
            p.copy_(v)
    return y


def params_vector(params: Iterable[Tensor]) -> Vector:
    return [p.detach().clone() for p in params]
