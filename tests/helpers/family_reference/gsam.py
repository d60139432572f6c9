"""GSAM (Zhuang et al., ICLR 2022, "Surrogate gap guided sharpness-aware minimization", Algorithm 1).

    g   = grad f(x, B);   e = rho_t g / ||g||;   g_p = grad f(x + e, B)          (SAM's perturbed gradient)
    g_par  = (<g, g_p> / ||g_p||^2) g_p,   g_perp = g - g_par   (clean gradient split along / across g_p)
    step with  g_p - alpha * g_perp

Sign: x <- x - lr (g_p - alpha g_perp) moves along +alpha g_perp. The surrogate gap h = f_p - f has gradient
g_p - g, whose part orthogonal to g_p is -g_perp, so the extra move lowers h while leaving f_p unchanged to
first order. The gradient handed to the base optimizer is g_p - alpha g_perp; alpha = 0 is SAM.

rho follows the learning rate:  rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min),
lr_t the learning rate of the step being taken (rho_t = rho_max when lr_max == lr_min). It is not clipped:
during a warmup from 0, lr_t < lr_min gives rho_t < rho_min.

Official code: google-research/big_vision, trainers/proj/gsam/gsam.py `gsam_gradient` (minimize_fp=True):
g_clean_residual = g - <g, g_p/||g_p||> g_p/||g_p||, g_gsam = g_p - alpha * residual; + 1e-12 only on ||g||
in the perturbation; the perturbation is per worker (gradients averaged after the decomposition).
Its adaptive variant is e = rho |x| g / ||g|| (not ASAM's T^2 g/||T g||). Config vit_i1k_gsam_no_aug.py:
rho_max 0.6, rho_min 0.1, alpha 0.6, lr_min = 0.01 lr_max. The PyTorch port juntang-zhuang/GSAM
(gsam/gsam.py `gradient_decompose` lines 63-85) computes the same direction with +1e-12 in the cosine and on
||g_p||; its adaptive mode is davda54's (T = |x|), and its DDP mode also perturbs and decomposes per worker
(`no_sync`), then averages.
"""

from __future__ import annotations

from .common import axpy, base_step, direction, dot, gradient, gradient_at, trainable


def gsam_rho(lr: float, lr_max: float, lr_min: float, rho_max: float, rho_min: float) -> float:
    if lr_max == lr_min:
        return rho_max
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)


def gsam_direction(g, g_p, alpha: float):
    """g_p - alpha g_perp, g_perp the part of g orthogonal to g_p."""
    pp = dot(g_p, g_p)
    g_perp = axpy(-dot(g, g_p) / pp, g_p, g) if pp > 0 else [u.clone() for u in g]
    return axpy(-alpha, g_perp, g_p)


def gsam_step(model, loss_fn, batch, optimizer, rho: float, alpha: float, eps: float = 0.0,
              freeze_bn: bool = True) -> None:
    """One GSAM step with the radius rho (= gsam_rho(...) of this step's learning rate)."""
    params = trainable(model)
    g = gradient(model, loss_fn, batch, params)
    g_p = gradient_at(model, loss_fn, batch, params, direction(g, rho, eps), freeze_bn)
    base_step(optimizer, params, gsam_direction(g, g_p, alpha))
