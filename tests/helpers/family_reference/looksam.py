"""LookSAM (Liu, Mai, Chen, Hsieh, You, CVPR 2022, Algorithm 1): SAM's gradient every k steps, its part
orthogonal to the clean gradient reused in between.

    every step:          g = grad f(x_t, B_t)
    t % k == 0:          g_s = grad f(x_t + rho g/||g||, B_t)
                         g_v = g_s - ||g_s|| cos(g, g_s) g/||g||  =  g_s - (<g, g_s>/||g||^2) g   (kept)
                         step with g_s
    otherwise:           step with g + alpha (||g|| / ||g_v||) g_v

t counts optimizer steps from 0 (the first step is a SAM step). All norms and the projection are over the
whole parameter vector. SAMPa B.4: k = 5, alpha = 0.7; rho as SAM's.

No official code. Leminhbinh0209/LookSAM (looksam.py, `decompose_grad` lines 71-108) does the same with global
norms (+1e-16 on norms, +1e-12 in the cosine and the ratio), except that its first `ascent_step` stores a
clone of the *weights* as old_grad (lines 29-31), so the first g_v (used for steps 1..k-1) is wrong.
pytorch_optimizer 4.1.0 (optimizer/sam.py, `LookSAM.second_step`) projects and rescales **per parameter
tensor** (cos, ||g||, ||g_v|| per tensor, +1e-8 on ||g_v||), computes the perturbation's global norm in fp32,
counts t in param_groups[0]["looksam_step"], and its `step(closure)` runs the closure on every step (a
second pass that reuse steps do not need; call first_step/second_step to skip it).
"""

from __future__ import annotations

from .common import axpy, base_step, direction, dot, gradient, gradient_at, norm, scaled, trainable


def looksam_step(model, loss_fn, batch, optimizer, state: dict, k: int = 5, alpha: float = 0.7,
                 rho: float = 0.05, freeze_bn: bool = True) -> bool:
    """One LookSAM step; state holds t and g_v. Returns True on a SAM (two-pass) step."""
    t = state.get("t", 0)
    params = trainable(model)
    g = gradient(model, loss_fn, batch, params)
    sam = t % k == 0
    if sam:
        g_s = gradient_at(model, loss_fn, batch, params, direction(g, rho), freeze_bn)
        gg = dot(g, g)
        state["g_v"] = axpy(-dot(g, g_s) / gg, g, g_s) if gg > 0 else [u.clone() for u in g_s]
        update = g_s
    else:
        g_v = state["g_v"]
        nv = norm(g_v)
        update = axpy(alpha * norm(g) / nv, g_v, g) if nv > 0 else g
    base_step(optimizer, params, update)
    state["t"] = t + 1
    return sam


def looksam_direction(g, g_v, alpha: float):
    """The reuse-step gradient g + alpha ||g||/||g_v|| g_v (for schedulers that already hold g)."""
    return axpy(alpha * norm(g) / norm(g_v), g_v, g) if norm(g_v) > 0 else scaled(g, 1.0)
