"""AE-SAM (Jiang, Yang, Zhang, Kwok, ICLR 2023): SAM only where ||g||^2 is large for its running distribution.

    s_t      = ||g_t||^2,  g_t = grad f(x_t, B_t)
    mu_t     = delta mu_{t-1} + (1 - delta) s_t
    sigma2_t = delta sigma2_{t-1} + (1 - delta) (s_t - mu_t)^2
    c_t      = (t/T) lambda_1 + (1 - t/T) lambda_2                  (linear from lambda_2 at t=0 to lambda_1 at T)
    s_t >= mu_t + c_t sqrt(sigma2_t):  SAM step, grad f(x_t + rho g_t/||g_t||, B_t)
    otherwise:                         base step with g_t

delta is the forgetting rate, T the total number of optimizer steps. Defaults: SAMPa B.4 rho = 0.2,
delta = 0.9; lambda_1 = -1, lambda_2 = 1 (the AE-SAM paper's CIFAR setting, also listed in the Asynchronous
SAM paper's Table A.2): c falls from 1 to -1, so SAM is used on ~16% of the steps early and ~84% late, about
half overall if s_t were Gaussian. No official code was found; mu and sigma2 start at 0 here (an assumption:
with delta = 0.9 they forget it within ~20 steps).
"""

from __future__ import annotations

import math

from .common import base_step, direction, dot, gradient, gradient_at, trainable


def aesam_threshold_coef(t: int, total_steps: int, lam1: float = -1.0, lam2: float = 1.0) -> float:
    return (t / total_steps) * lam1 + (1.0 - t / total_steps) * lam2


def aesam_step(model, loss_fn, batch, optimizer, state: dict, total_steps: int, rho: float = 0.2,
               delta: float = 0.9, lam1: float = -1.0, lam2: float = 1.0, freeze_bn: bool = True) -> bool:
    """One AE-SAM step; state holds t, mu, sigma2 and the count of SAM steps. Returns True on a SAM step."""
    t = state.get("t", 0)
    params = trainable(model)
    g = gradient(model, loss_fn, batch, params)
    s = float(dot(g, g))
    mu = delta * state.get("mu", 0.0) + (1 - delta) * s
    sigma2 = delta * state.get("sigma2", 0.0) + (1 - delta) * (s - mu) ** 2
    sam = s >= mu + aesam_threshold_coef(t, total_steps, lam1, lam2) * math.sqrt(sigma2)
    update = gradient_at(model, loss_fn, batch, params, direction(g, rho), freeze_bn) if sam else g
    base_step(optimizer, params, update)
    state.update(t=t + 1, mu=mu, sigma2=sigma2, sam_steps=state.get("sam_steps", 0) + int(sam))
    return sam
