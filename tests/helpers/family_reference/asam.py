"""ASAM (Kwon et al., ICML 2021): SAM in the coordinates T^{-1} x, with both authors' choices of T.

    e = rho * T^2 g / ||T g||,   T = diag(t) elementwise                                   (ASAM Eq. 7 / Alg. 1)

Which parameters are rescaled differs between the two codes people use:

* ``rule="authors"`` (SamsungLabs/ASAM, asam.py, `ASAM.ascent_step` lines 22-37): t = |x| + eta for every
  parameter whose *name* contains "weight" (conv/linear weights, but also LayerNorm/BatchNorm `.weight` and
  embedding `.weight`), t = 1 for every other parameter (biases, ViT `cls_token`, `position_embeddings`, ...).
  eta = 0.01 (the class default); the norm gets + 1e-16.
* ``rule="davda54"`` (davda54/sam, sam.py, `SAM.first_step` line 24 and `_grad_norm` line 53, adaptive=True):
  t = |x| on every parameter, biases included, no eta; the norm gets + 1e-12.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import Vector, base_step, direction, gradient, gradient_at, named_trainable, norm


def asam_scales(named_params: Sequence[tuple[str, Tensor]], rule: str = "authors", eta: float = 0.01) -> Vector:
    """t for each parameter: the diagonal of ASAM's T."""
    if rule == "authors":
        return [p.detach().abs() + eta if "weight" in n else torch.ones_like(p) for n, p in named_params]
    if rule == "davda54":
        return [p.detach().abs() for _, p in named_params]
    raise ValueError(f"ASAM rule {rule!r}: use 'authors' or 'davda54'")


def asam_perturbation(scales: Sequence[Tensor], g: Sequence[Tensor], rho: float, eps: float = 0.0) -> Vector:
    """e = rho T^2 g / (||T g|| + eps)."""
    tg = [t * u for t, u in zip(scales, g)]
    unit = direction(tg, rho, eps)  # rho T g / ||T g||
    return [t * u for t, u in zip(scales, unit)]


def asam_step(model, loss_fn, batch, optimizer, rho: float = 0.5, eta: float = 0.01, rule: str = "authors",
              eps: float = 0.0, freeze_bn: bool = True) -> None:
    """One ASAM step: g = grad f(x); e as above with T at x; step the base optimizer with grad f(x + e)."""
    named = named_trainable(model)
    params = [p for _, p in named]
    g = gradient(model, loss_fn, batch, params)
    e = asam_perturbation(asam_scales(named, rule, eta), g, rho, eps)
    base_step(optimizer, params, gradient_at(model, loss_fn, batch, params, e, freeze_bn))


def asam_norm(named_params, g, rule: str = "authors", eta: float = 0.01) -> Tensor:
    """||T g||, the quantity the ascent normalises (logged by some codes)."""
    return norm([t * u for t, u in zip(asam_scales(named_params, rule, eta), g)])
