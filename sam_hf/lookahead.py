"""ModelUpdate: where the base optimizer *would* move the weights, without moving them.

SAMPa evaluates its second gradient at y = ModelUpdate_m(x, g), the base
optimizer's own step from its current state m, learning rate, weight decay and
(by the caller) clipping, computed in closed form so m is left untouched:

AdamW (torch.optim.AdamW, plain / foreach / fused; Adam with decoupled decay):
    m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2   (amsgrad: v' = max(v_max, v'))
    y  = x (1 - lr wd) - lr / (1 - b1^k) * m' / (sqrt(v') / sqrt(1 - b2^k) + eps),  k = step + 1
Adam (torch.optim.Adam, L2 decay): as AdamW with g <- g + wd x and no decoupled decay.
SGD (torch.optim.SGD): d = g + wd x;  with momentum mu: b = d on the first step,
    else mu b + (1 - dampening) d;  d = d + mu b (Nesterov) or b;  y = x - lr d.
`lookahead=sgd`, for any base: y = x - lr g.
`maximize=True` negates g, as the optimizers do.
"""

from __future__ import annotations

import torch

SUPPORTED = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


def supports(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, SUPPORTED)


def _f(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


def _adam(x: torch.Tensor, g: torch.Tensor, group: dict, state: dict, decoupled: bool) -> torch.Tensor:
    # lr and step may be tensors (capturable / fused optimizers keep them on the GPU): use them as tensors,
    # so computing y never waits on the device.
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    b1, b2 = (_f(b) for b in group["betas"])
    if group.get("maximize", False):
        g = -g
    if wd and not decoupled:
        g = g + wd * x
    step = state.get("step")
    # Bias corrections in float64, as torch computes them (Python floats from a CPU step count, doubles in the
    # fused kernels); a step count on a GPU (fused, capturable) stays there, so computing y never waits on it.
    if step is None:
        k = 1.0
    elif torch.is_tensor(step) and step.device.type != "cpu":
        k = step.to(x.device, torch.float64) + 1
    else:
        k = float(step) + 1
    step_size = lr / (1 - b1**k)
    bias_correction2_sqrt = (1 - b2**k) ** 0.5
    # In place on fresh tensors, fused where torch has the op: this runs on the critical path of every step.
    m = torch.lerp(state["exp_avg"].float(), g, 1 - b1) if "exp_avg" in state else g * (1 - b1)
    v = (state["exp_avg_sq"].float() * b2).addcmul_(g, g, value=1 - b2) if "exp_avg_sq" in state else g * g * (1 - b2)
    if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
        v = torch.maximum(state["max_exp_avg_sq"].float(), v)
    denom = v.sqrt_().div_(bias_correction2_sqrt).add_(eps)
    y = x * (1 - lr * wd) if (wd and decoupled) else x.clone()
    if isinstance(step_size, float):
        return y.addcdiv_(m, denom, value=-step_size)  # torch's own last line
    return y.sub_(m.mul_(step_size).div_(denom))


def _sgd(x: torch.Tensor, g: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
    lr, wd = group["lr"], group["weight_decay"]
    mu, damp, nesterov = group["momentum"], group["dampening"], group["nesterov"]
    d = -g if group.get("maximize", False) else g
    if wd:
        d = d + wd * x
    if mu:
        buf = state.get("momentum_buffer")
        b = d if buf is None else mu * buf.float() + (1 - damp) * d
        d = d + mu * b if nesterov else b
    return x - lr * d


@torch.no_grad()
def apply_lookahead_(optimizer: torch.optim.Optimizer, grads: dict[torch.nn.Parameter, torch.Tensor], kind: str,
                     grad_scale=1.0) -> None:
    """Overwrite each parameter in `grads` with y = ModelUpdate(x, grad_scale * g); the optimizer's state is
    not changed. `grad_scale` (clipping) is applied one parameter at a time, so no clipped copy of g is made."""
    decoupled_adam = isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = grads.get(p)
            if g is None:
                continue
            g = g * grad_scale if not (isinstance(grad_scale, float) and grad_scale == 1.0) else g
            x, state = p.detach().float(), optimizer.state.get(p, {})
            if kind == "sgd":
                y = x - group["lr"] * g
            elif isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
                y = _adam(x, g, group, state, decoupled_adam or group.get("decoupled_weight_decay", False))
            elif isinstance(optimizer, torch.optim.SGD):
                y = _sgd(x, g, group, state)
            else:
                raise TypeError(f"no closed-form lookahead for {type(optimizer).__name__}; use lookahead=sgd")
            p.copy_(y.to(p.dtype))
