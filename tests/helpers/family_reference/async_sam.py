"""Asynchronous SAM (Jo, Lim, Lee) with staleness tau >= 1 and a choice of ascent samples.

Paper Eq. (2): x_{t+1} = x_t - lr grad f_t(x_t + rho a_{t-tau}/||a_{t-tau}||), a_s = grad f(x_s, A_s), i.e. the
perturbation uses the ascent gradient computed tau steps earlier at the weights of that step. Algorithm 1 and
Eq. (3) fix tau = 1 and compute a_s on b' = r b "random samples" (|A_s| = b'); the first step(s) have no
ascent gradient yet and take a plain step. Generalised here: steps t < tau are plain steps.

    a_t = grad f(x_t, A_t)                               (started with the step, from the same x_t)
    t >= tau:  step with grad f(x_t + rho a_{t-tau}/||a_{t-tau}||, B_t)
    t <  tau:  step with grad f(x_t, B_t)

A_t, |A_t| = ceil(r |B_t|): `ascent="first"` takes the first ones of B_t (sam_hf's current rule),
`ascent="random"` a uniformly random subset of B_t drawn with `generator`. On a shuffled loader both are
uniform random samples in the paper's sense; they differ when batches are ordered (length grouping, sorted
data). The paper (section 3.3) argues tau = 1 with a smaller b' beats a larger tau ("O(tau) impact on the
convergence rate"); Remark 1 states convergence for any tau and b'.
State: the last tau ascent gradients (tau parameter-sized buffers).
"""

from __future__ import annotations

import math

import torch

from .common import base_step, direction, gradient, gradient_at, trainable


def ascent_rows(n: int, ratio: float, ascent: str = "first", generator: torch.Generator | None = None):
    m = math.ceil(ratio * n)
    if ascent == "first":
        return torch.arange(m)
    if ascent == "random":
        return torch.randperm(n, generator=generator)[:m].sort().values
    raise ValueError(f"ascent={ascent!r}: use 'first' or 'random'")


def async_sam_step(model, loss_fn, batch, optimizer, state: dict, rho: float, tau: int = 1, ratio: float = 1.0,
                   ascent: str = "first", generator: torch.Generator | None = None, freeze_bn: bool = True) -> None:
    """One step; state["queue"] holds a_{t-tau}, ..., a_{t-1} (oldest first)."""
    params = trainable(model)
    queue = state.setdefault("queue", [])
    n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)
    rows = ascent_rows(n, ratio, ascent, generator)
    sub = {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v for k, v in batch.items()}
    a_t = gradient(model, loss_fn, sub, params)  # the clean pass: BatchNorm statistics move here
    e = direction(queue[0], rho) if len(queue) >= tau else [torch.zeros_like(p) for p in params]
    update = gradient_at(model, loss_fn, batch, params, e, freeze_bn)  # descent: statistics kept (freeze_bn)
    base_step(optimizer, params, update)
    queue.append(a_t)
    del queue[:-tau]
