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


def _adam(p: torch.Tensor, g: torch.Tensor, group: dict, state: dict, decoupled: bool, keep) -> None:
    """y written into p (through an fp32 copy where p is not fp32), after `keep(p)` has saved x."""
    # lr and step may be tensors (capturable / fused optimizers keep them on the GPU): use them as tensors,
    # so computing y never waits on the device.
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    b1, b2 = (_f(b) for b in group["betas"])
    x = p.detach()
    x32 = x if x.dtype == torch.float32 else x.float()
    if group.get("maximize", False):
        g = -g
    if wd and not decoupled:
        g = g + wd * x32
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
    # Two temporaries per parameter, fused where torch has the op: this runs on the critical path of every step.
    m = torch.lerp(state["exp_avg"].float(), g, 1 - b1) if "exp_avg" in state else g * (1 - b1)
    v = (state["exp_avg_sq"].float() * b2).addcmul_(g, g, value=1 - b2) if "exp_avg_sq" in state else g * g * (1 - b2)
    if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
        v = torch.maximum(state["max_exp_avg_sq"].float(), v)
    denom = v.sqrt_().div_(bias_correction2_sqrt).add_(eps)
    del g
    keep(p)  # g is spent: its buffer may now hold x
    y = x32  # an fp32 p is its own x32: y is computed in p itself
    if wd and decoupled:
        y.mul_(1 - lr * wd)
    if isinstance(step_size, float):
        y.addcdiv_(m, denom, value=-step_size)  # torch's own last line
    else:
        y.sub_(m.mul_(step_size).div_(denom))
    if y is not x:
        x.copy_(y)


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
                     grad_scale=1.0, keep_x: bool = False) -> dict[torch.nn.Parameter, torch.Tensor] | None:
    """Overwrite each parameter in `grads` with y = ModelUpdate(x, grad_scale * g); the optimizer's state is
    not changed. `grad_scale` (clipping) is applied one parameter at a time, so no clipped copy of g is made.

    `keep_x=True` returns x's backup, {param: x}, for every parameter moved, written into the gradient's own
    buffer once y no longer needs it (where dtype, shape and layout allow): the caller's g is consumed, and the
    backup costs no new memory."""
    decoupled_adam = isinstance(optimizer, torch.optim.AdamW)
    saved: dict[torch.nn.Parameter, torch.Tensor] = {}

    def keeper(g_own):
        def keep(p):
            if not keep_x:
                return
            x = p.detach()
            if g_own.dtype == x.dtype and g_own.shape == x.shape and g_own.is_contiguous() and x.is_contiguous():
                saved[p] = g_own.copy_(x)
            else:
                saved[p] = x.clone()
        return keep

    for group in optimizer.param_groups:
        for p in group["params"]:
            g_own = grads.get(p)
            if g_own is None:
                continue
            g = g_own * grad_scale if not (isinstance(grad_scale, float) and grad_scale == 1.0) else g_own
            state = optimizer.state.get(p, {})
            keep = keeper(g_own)
            if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)) and kind != "sgd":
                _adam(p, g, group, state, decoupled_adam or group.get("decoupled_weight_decay", False), keep)
                continue
            x = p.detach().float()
            if kind == "sgd":
                y = x - group["lr"] * g
            elif isinstance(optimizer, torch.optim.SGD):
                y = _sgd(x, g, group, state)
            else:
                raise TypeError(f"no closed-form lookahead for {type(optimizer).__name__}; use lookahead=sgd")
            del g
            keep(p)
            p.copy_(y.to(p.dtype))
    return saved if keep_x else None
