"""VaSSO (Li and Giannakis, NeurIPS 2023): the perturbation follows a moving average of the gradients.

    d_t = (1 - theta) d_{t-1} + theta g_t,     e_t = rho d_t / ||d_t||,     step with grad f(x_t + e_t)

Authors' code (BingcongLi/VaSSO, solver/vasso.py, `VASSO.first_step` lines 36-56): d is per-parameter state
`ema`, initialised to the *first gradient* (d_0 = g_0, line 42), not to zeros; the norm is over every parameter
with a gradient, + 1e-7 (line 50). `init="zeros"` gives d_{-1} = 0 instead: the same first perturbation
(d_0 = theta g_0 points the same way) but a different weight on g_0 afterwards ((1-theta) theta vs 1-theta).
theta: SAMPa B.4 uses 0.4; the code's config default is 0.9 (configs/defaulf_cfg.py line 61).

d is method state: it must be checkpointed and, with sharded parameters, live on the shard like the weights.
Under SAMPa the rule reads the gradient SAMPa hands it (g_t = grad f(y_t, B_t)), so d averages lookahead-point
gradients; see sampa.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .common import Vector, base_step, direction, gradient, gradient_at, trainable


def vasso_perturbation(g: Sequence[Tensor], state: dict, rho: float, theta: float, init: str = "first_gradient",
                       eps: float = 0.0) -> Vector:
    """Update state["d"] with g and return e = rho d / (||d|| + eps)."""
    if "d" not in state:
        if init == "first_gradient":
            state["d"] = [u.clone() for u in g]
        elif init == "zeros":
            state["d"] = [theta * u for u in g]
        else:
            raise ValueError(f"VaSSO init={init!r}: use 'first_gradient' or 'zeros'")
    else:
        state["d"] = [(1 - theta) * d + theta * u for d, u in zip(state["d"], g)]
    return direction(state["d"], rho, eps)


def vasso_step(model, loss_fn, batch, optimizer, state: dict, rho: float = 0.05, theta: float = 0.4,
               init: str = "first_gradient", eps: float = 0.0, freeze_bn: bool = True) -> None:
    params = trainable(model)
    g = gradient(model, loss_fn, batch, params)
    e = vasso_perturbation(g, state, rho, theta, init, eps)
    base_step(optimizer, params, gradient_at(model, loss_fn, batch, params, e, freeze_bn))
