"""ESAM (Du et al., ICLR 2022): stochastic weight perturbation (SWP) and sharpness-sensitive data selection (SDS).

SWP: a random mask m keeps each parameter with probability beta; only kept parameters are perturbed, scaled
by 1/beta, and only their clean gradient is needed:

    g_m = m * grad f(x, B)   (dropped parameters need no weight gradient in the clean backward)
    e   = (rho / beta) g_m / ||g_m||

SDS (gamma < 1): with l_i(x) the per-example loss, the examples whose loss rises most at x + e are kept,

    B+ = the top floor(gamma |B|) examples of l_i(x + e) - l_i(x)        (an extra no-grad forward at x + e)

and the step uses grad f(x + e, B+). gamma = 1 is plain SAM on the whole batch.

Authors' code (dydjw9/Efficient_SAM, utils/Esam.py): the mask is **per parameter tensor**: `second_step`
(line 60-61) sets `requires_grad=False` on a tensor with probability 1 - beta for the *next* step's clean pass
(the first step keeps all tensors), and `first_step` (lines 24-35) turns every tensor back on before the
perturbed pass; scale = rho / (||g_m|| + 1e-7) / beta. SDS (lines 88-115): `position = int(n gamma)`,
`cutoff = topk(sharpness, position)[-1]`, keep `sharpness > cutoff`: strictly greater, so position - 1
examples when there are no ties (`selection="code"`); `gamma >= 0.99` keeps the whole batch. The code's
forwards at x + e run in train mode (BatchNorm statistics updated, `freeze_bn=False` to match).
SAMPa B.4 / section 5.2: beta = 0.5 and SDS off (gamma = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import Vector, base_step, direction, frozen_bn, gradient, perturbed, trainable


def esam_mask(params: Sequence[Tensor], beta: float, generator: torch.Generator | None = None,
              granularity: str = "tensor") -> Vector:
    """0/1 masks shaped like the parameters: whole tensors (the code) or single elements."""
    if granularity == "tensor":
        keep = torch.rand(len(params), generator=generator, dtype=torch.float64) < beta
        return [torch.full_like(p, float(k)) for p, k in zip(params, keep)]
    if granularity == "element":
        return [(torch.rand(p.shape, generator=generator, dtype=torch.float64) < beta).to(p.dtype) for p in params]
    raise ValueError(f"ESAM granularity={granularity!r}: use 'tensor' or 'element'")


def esam_step(model, loss_fn, batch, optimizer, rho: float = 0.05, beta: float = 0.5, gamma: float = 1.0,
              mask: Sequence[Tensor] | None = None, generator: torch.Generator | None = None,
              selection: str = "paper", eps: float = 0.0, freeze_bn: bool = True) -> int:
    """One ESAM step. `mask` (else drawn per tensor) decides which parameters are perturbed.

    Returns the number of examples in the descent batch."""
    params = trainable(model)
    mask = esam_mask(params, beta, generator) if mask is None else mask
    losses_before = loss_fn(model, batch)
    g = torch.autograd.grad(losses_before.mean(), params, allow_unused=True)
    g_m = [torch.zeros_like(p) if u is None else u.detach() * m for p, u, m in zip(params, g, mask)]
    e = direction(g_m, rho / beta, eps)
    n = losses_before.shape[0]
    select = gamma < (0.99 if selection == "code" else 1.0)
    with perturbed(params, e), frozen_bn(model, freeze_bn):
        if select:
            with torch.no_grad():
                sharpness = loss_fn(model, batch) - losses_before.detach()
            k = max(1, int(n * gamma))
            if selection == "paper":
                keep = torch.topk(sharpness, k).indices.sort().values
            elif selection == "code":
                keep = torch.nonzero(sharpness > torch.topk(sharpness, k).values[-1]).flatten()
            else:
                raise ValueError(f"ESAM selection={selection!r}: use 'paper' or 'code'")
            batch = {key: v[keep] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                     for key, v in batch.items()}
        descent = gradient(model, loss_fn, batch, params)
    base_step(optimizer, params, descent)
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)
