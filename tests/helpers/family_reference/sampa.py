"""SAMPa-lambda with a pluggable ascent rule (SAMPa section 5.5, Table 8) and with m perturbations per step.

SAMPa (Algorithm 1/2) perturbs x_t with g_t = grad f(y_t, B_t), the gradient computed one step earlier at the
lookahead point, instead of a fresh gradient at x_t. A rule maps that gradient to a perturbation:

    e_t     = Rule(g_t; x_t, rule state)                    SAM: rho g_t/||g_t||
    g~_t    = grad f(x_t + e_t, B_t)
    y_{t+1} = ModelUpdate_{m_t}(x_t, g_t)                    (base optimizer step from its state m_t, not kept)
    g_{t+1} = grad f(y_{t+1}, B_{t+1})                       (independent of g~_t: the second device)
    G_t     = (1 - lam) g~_t + lam g_{t+1};  x_{t+1}, m_{t+1} = O.step(x_t, G_t)

What each rule does with the held gradient (it is stale: computed at y_t, not x_t):
  ASAM      e = rho T^2 g_t/||T g_t||, T evaluated at x_t (the weights being perturbed).
  SAM-ON    g_t restricted to the normalization parameters; e = 0 elsewhere.
  VaSSO     d_t = (1 - theta) d_{t-1} + theta g_t (d averages lookahead-point gradients), e = rho d_t/||d_t||.
  BiSAM     the perturbation uses q_t = grad Q(y_t, B_t) (the lower bound) while y_{t+1} and G use grad f:
            the second device computes both gradients at y_{t+1} (one forward, two backwards).
  mSAM(m)   B_t split into m micro-batches; the held gradients are per micro-batch, g_{t,j} = grad f(y_t, B_{t,j}):
            e_{t,j} = rho g_{t,j}/||g_{t,j}||,  g~_t = sum_j w_j grad f(x_t + e_{t,j}, B_{t,j}),
            y_{t+1} = ModelUpdate(x_t, sum_j w_j g_{t,j})   (the full-batch g_t), w_j = |B_j|/|B|,
            and the second device keeps the m gradients g_{t+1,j} of B_{t+1} (m parameter-sized buffers).

The first call only computes g_0 = grad f(x_0, B_0) (y_0 = x_0) and takes no step; it returns False.
BatchNorm statistics move in the pass at y (the clean one), not at x_t + e.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .asam import asam_perturbation, asam_scales
from .common import base_step, direction, frozen_bn, gradient, gradient_at, lookahead, named_trainable, placed
from .sam_on import samon_perturbation
from .vasso import vasso_perturbation

Rule = Callable  # rule(named_params, g, state) -> e


def sam_rule(rho: float) -> Rule:
    return lambda named, g, state: direction(g, rho)


def asam_rule(rho: float, eta: float = 0.01, which: str = "authors") -> Rule:
    return lambda named, g, state: asam_perturbation(asam_scales(named, which, eta), g, rho)


def samon_rule(rho: float, selected: set[str], adaptive: bool = False, eta: float = 0.0) -> Rule:
    return lambda named, g, state: samon_perturbation(named, g, rho, selected, adaptive, eta)


def vasso_rule(rho: float, theta: float = 0.4, init: str = "first_gradient") -> Rule:
    return lambda named, g, state: vasso_perturbation(g, state, rho, theta, init)


def _split(batch: dict, m: int) -> list[tuple[dict, float]]:
    """m consecutive micro-batches (sizes differ by at most one, the first ones larger) and their weights."""
    n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)
    sizes = [n // m + (1 if j < n % m else 0) for j in range(m)]
    out, start = [], 0
    for s in sizes:
        part = {k: v[start:start + s] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                for k, v in batch.items()}
        out.append((part, s / n))
        start += s
    return out


def _weighted(vectors: Sequence, weights: Sequence[float]):
    return [sum(w * v[i] for v, w in zip(vectors, weights)) for i in range(len(vectors[0]))]


def _held_gradients(model, loss_fn, ascent_loss_fn, batch, params, m):
    """Per micro-batch: gradients of f, the ascent gradients (of Q for BiSAM, else the same) and the weights."""
    parts = _split(batch, m)
    g = [gradient(model, loss_fn, b, params) for b, _ in parts]
    if ascent_loss_fn is None:
        return g, g, [w for _, w in parts]
    with frozen_bn(model):  # same point, same batch: one clean pass for the statistics
        a = [gradient(model, ascent_loss_fn, b, params) for b, _ in parts]
    return g, a, [w for _, w in parts]


def sampa_step(model, loss_fn, batch, optimizer, state: dict, lam: float = 0.2, rule: Rule | None = None,
               rho: float = 0.1, ascent_loss_fn=None, micro_batches: int = 1, freeze_bn: bool = True) -> bool:
    """One Trainer step of SAMPa-lam; `batch` is B_{t+1} (B_0 on the first call). Returns True if x moved."""
    rule = rule or sam_rule(rho)
    named = named_trainable(model)
    params = [p for _, p in named]
    if "held" not in state:
        state["g"], state["a"], state["w"] = _held_gradients(model, loss_fn, ascent_loss_fn, batch, params,
                                                              micro_batches)
        state["held"] = batch
        return False
    rule_state = state.setdefault("rule_state", {})  # one state for the step (VaSSO: use micro_batches=1)
    parts = _split(state["held"], micro_batches)
    g_tilde = _weighted([gradient_at(model, loss_fn, b, params, rule(named, a, rule_state), freeze_bn)
                         for (b, _), a in zip(parts, state["a"])], state["w"])
    y = lookahead(optimizer, params, _weighted(state["g"], state["w"]))
    with placed(params, y):
        g_next, a_next, w_next = _held_gradients(model, loss_fn, ascent_loss_fn, batch, params, micro_batches)
    G = g_tilde if lam == 0 else [(1 - lam) * u + lam * v for u, v in zip(g_tilde, _weighted(g_next, w_next))]
    base_step(optimizer, params, G)
    state.update(g=g_next, a=a_next, w=w_next, held=batch)
    return True
