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

from ..tensors import work_dtype

SUPPORTED = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


def supports(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, SUPPORTED)


def _f(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


CPU_CHUNK = 65536  # elements: on a CPU the closed form runs chunk by chunk, its temporaries staying in cache


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    return t.view(-1) if t.is_contiguous() else None


def _adam(p: torch.Tensor, g_own: torch.Tensor, grad_scale, group: dict, state: dict, decoupled: bool,
          holder: torch.Tensor | None) -> None:
    """y written into p (through an fp32 copy where p is not fp32); x saved into `holder` first, where given
    (`holder` may be g_own itself: each part of it is overwritten only once that part of g is spent).

    The arithmetic is torch's single-tensor AdamW/Adam step, op for op. On a CPU it runs in chunks of CPU_CHUNK
    elements: elementwise ops give the same bits on any slice, and the chunk's temporaries stay in cache, so it
    reads and writes each tensor about once instead of once per op (about 3x faster than whole tensors)."""
    # lr and step may be tensors (capturable / fused optimizers keep them on the GPU): use them as tensors,
    # so computing y never waits on the device.
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    b1, b2 = (_f(b) for b in group["betas"])
    maximize, scaled = group.get("maximize", False), not (isinstance(grad_scale, float) and grad_scale == 1.0)
    step = state.get("step")
    # Bias corrections in float64, as torch computes them (Python floats from a CPU step count, doubles in the
    # fused kernels); a step count on a GPU (fused, capturable) stays there, so computing y never waits on it.
    if step is None:
        k = 1.0
    elif torch.is_tensor(step) and step.device.type != "cpu":
        k = step.to(p.device, torch.float64) + 1
    else:
        k = float(step) + 1
    step_size = lr / (1 - b1**k)
    bias_correction2_sqrt = (1 - b2**k) ** 0.5
    x = p.detach()
    work = work_dtype(x)  # fp32, or float64 for a float64 p (as torch's own step computes it)
    x32 = x if x.dtype == work else x.to(work)  # an fp32 (float64) p is its own x32: y is computed in p itself
    m0, v0 = state.get("exp_avg"), state.get("exp_avg_sq")
    vmax = state.get("max_exp_avg_sq") if group.get("amsgrad", False) else None
    tensors = [x, x32, g_own] + [t for t in (m0, v0, vmax, holder) if t is not None]
    n = x.numel()
    # plain CPU tensors only (an FSDP2 DTensor is not viewed flat; a GPU runs whole tensors in one kernel each)
    chunked = x.device.type == "cpu" and n > CPU_CHUNK and all(type(t) is torch.Tensor for t in tensors)
    flats = [_flat(t) for t in tensors] if chunked else []
    chunked = chunked and all(f is not None for f in flats)
    names = ("x", "x32", "g") + tuple(k for k, t in (("m", m0), ("v", v0), ("vmax", vmax), ("holder", holder))
                                      if t is not None)
    parts = dict(zip(names, flats if chunked else tensors))  # else whole tensors, as they are laid out
    for sl in ([slice(s, s + CPU_CHUNK) for s in range(0, n, CPU_CHUNK)] if chunked else [slice(None)]):
        xc, gc = parts["x32"][sl], parts["g"][sl]
        if scaled:
            gc = gc * grad_scale
        if maximize:
            gc = -gc
        if wd and not decoupled:
            gc = gc + wd * xc
        # two temporaries, fused where torch has the op
        m = torch.lerp(parts["m"][sl].to(work), gc, 1 - b1) if "m" in parts else gc * (1 - b1)
        v = (parts["v"][sl].to(work) * b2).addcmul_(gc, gc, value=1 - b2) if "v" in parts else gc * gc * (1 - b2)
        if "vmax" in parts:
            v = torch.maximum(parts["vmax"][sl].to(work), v)
        denom = v.sqrt_().div_(bias_correction2_sqrt).add_(eps)
        del gc
        if "holder" in parts:  # this part of g is spent: its buffer may now hold x
            parts["holder"][sl].copy_(parts["x"][sl])
        if wd and decoupled:
            xc.mul_(1 - lr * wd)
        if isinstance(step_size, float):
            xc.addcdiv_(m, denom, value=-step_size)  # torch's own last line
        else:
            xc.sub_(m.mul_(step_size).div_(denom))
    if x32 is not x:
        x.copy_(x32)


def _sgd(x: torch.Tensor, g: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
    lr, wd = group["lr"], group["weight_decay"]
    mu, damp, nesterov = group["momentum"], group["dampening"], group["nesterov"]
    d = -g if group.get("maximize", False) else g
    if wd:
        d = d + wd * x
    if mu:
        buf = state.get("momentum_buffer")
        b = d if buf is None else mu * buf.to(d.dtype) + (1 - damp) * d
        d = d + mu * b if nesterov else b
    return x - lr * d


@torch.no_grad()
def apply_lookahead_(optimizer: torch.optim.Optimizer, grads: dict[torch.nn.Parameter, torch.Tensor], kind: str,
                     grad_scale=1.0, keep_x: bool = False) -> dict[torch.nn.Parameter, torch.Tensor] | None:
    """Overwrite each parameter in `grads` with y = ModelUpdate(x, grad_scale * g); the optimizer's state is
    not changed. `grad_scale` (clipping) is applied one parameter (or chunk) at a time, so no clipped copy of g
    is made.

    `keep_x=True` returns x's backup, {param: x}, for every parameter moved, written into the gradient's own
    buffer once y no longer needs it (where dtype, shape and layout allow): the caller's g is consumed, and the
    backup costs no new memory."""
    decoupled_adam = isinstance(optimizer, torch.optim.AdamW)
    saved: dict[torch.nn.Parameter, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            g_own = grads.get(p)
            if g_own is None:
                continue
            x = p.detach()
            holder = None
            if keep_x:
                reuse = (g_own.dtype == x.dtype and g_own.shape == x.shape and g_own.is_contiguous()
                         and x.is_contiguous())
                holder = saved[p] = g_own if reuse else torch.empty_like(x, memory_format=torch.contiguous_format)
            state = optimizer.state.get(p, {})
            if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)) and kind != "sgd":
                _adam(p, g_own, grad_scale, group, state, decoupled_adam or group.get("decoupled_weight_decay", False),
                      holder)
                continue
            g = g_own * grad_scale if not (isinstance(grad_scale, float) and grad_scale == 1.0) else g_own
            x32 = x.to(work_dtype(x))
            if kind == "sgd":
                y = x32 - group["lr"] * g
            elif isinstance(optimizer, torch.optim.SGD):
                y = _sgd(x32, g, group, state)
            else:
                raise TypeError(f"no closed-form lookahead for {type(optimizer).__name__}; use lookahead=sgd")
            del g
            if holder is not None:
                holder.copy_(x)
            p.copy_(y.to(p.dtype))
    return saved if keep_x else None
