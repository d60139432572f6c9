"""BiSAM (Xie, Latorre, Antonakopoulos, Pethick, Cevher, ICML 2024): the ascent maximises a lower bound of
the 0-1 loss instead of the training loss.

For example i with logits f_i and label y_i, the margins z_ij = f_ij - f_{i,y_i} (z_{i,y_i} = 0), and

    Q_{phi,mu}(x) = (1/n) sum_i (1/mu) log sum_{j=1..K} exp(mu phi(z_ij))            (README of LIONS-EPFL/BiSAM)
    BiSAM (-log):  phi(z) = 1 - log(1 + exp(gamma - z)),  gamma = log(e - 1)  (phi(0) = 0, phi -> 1)
    BiSAM (tanh):  phi(z) = tanh(alpha z)

    e = rho grad Q(x) / ||grad Q(x)||;   step with grad f(x + e) of the *training* loss f (cross-entropy).

The sum over j includes the label (its term is exp(0) = 1). Authors' code (loss_fnc.py,
`perturbation_loss_log` lines 26-31, `perturbation_loss_tanh` lines 18-23) computes phi_log as
`1 + softplus(z - gamma, beta=-1)` (the same function) and omits the 1/mu factor: the direction e is unchanged
by it (e is normalised); `paper_scale=False` reproduces the code's value. The code subtracts the label logit
in place on the model output (it reuses those logits only for accuracy, which the shift does not change).
Defaults: SAMPa B.4 "BiSAM (-log) with mu = 1"; train.py's --mu 1.0, --alpha 0.1 (the tanh function's own
default mu = 10 is never used by train.py). train.py's descent loss is label-smoothed cross-entropy (0.1).

Multi-class is native (K classes); binary is K = 2. For token classification / causal LM, every scored token
is one "example" i (ignored positions, label -100, dropped) and Q is the mean over those tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .common import base_step, direction, gradient, gradient_at, trainable

GAMMA = math.log(math.e - 1.0)


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """z_ij = f_ij - f_{i,y_i}, shape [n, K]."""
    return logits - logits.gather(1, labels[:, None])


def phi(z: Tensor, kind: str = "log", alpha: float = 0.1) -> Tensor:
    if kind == "log":
        return 1.0 - F.softplus(GAMMA - z)
    if kind == "tanh":
        return torch.tanh(alpha * z)
    raise ValueError(f"BiSAM kind={kind!r}: use 'log' or 'tanh'")


def lower_bound(logits: Tensor, labels: Tensor, mu: float = 1.0, kind: str = "log", alpha: float = 0.1,
                paper_scale: bool = True) -> Tensor:
    """Per-example (1/mu) logsumexp_j(mu phi(z_ij)); the batch value is the mean."""
    q = torch.logsumexp(mu * phi(margins(logits, labels), kind, alpha), dim=1)
    return q / mu if paper_scale else q


def bisam_step(model, logits_fn, batch, optimizer, rho: float = 0.05, mu: float = 1.0, kind: str = "log",
               alpha: float = 0.1, descent_loss=None, eps: float = 0.0, freeze_bn: bool = True) -> None:
    """One BiSAM step. descent_loss(logits, labels) -> per-example losses (default cross-entropy)."""
    descent_loss = descent_loss or (lambda z, y: F.cross_entropy(z, y, reduction="none"))
    params = trainable(model)
    q = gradient(model, lambda m, b: lower_bound(logits_fn(m, b), b["y"], mu, kind, alpha), batch, params)
    e = direction(q, rho, eps)
    f = lambda m, b: descent_loss(logits_fn(m, b), b["y"])
    base_step(optimizer, params, gradient_at(model, f, batch, params, e, freeze_bn))
