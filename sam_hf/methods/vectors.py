"""Inner products of parameter-shaped vectors, reduced as the layout reduces norms (over the shards under FSDP2).

A vector is a list of tensors indexed like the method's parameters (None where a parameter has no gradient, which
counts as zero). LookSAM's projection and GSAM's decomposition need <a, b> over all trainable parameters; the
layout's `totals` sums the local parts over the shards in one collective, a parameter FSDP left whole counted once.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def inner_products(layout, params, *pairs) -> list[torch.Tensor]:
    """[<a, b> for (a, b) in pairs], in fp32, over all parameters (and shards), in one collective."""
    whole = [layout.is_whole(p) for p in params]
    device = params[0].device if params else torch.device("cpu")
    groups = []
    for a, b in pairs:
        group = []
        for u, v in zip(a, b):
            if u is None or v is None:
                group.append(torch.zeros((), device=device))
            else:
                lu, lv = layout.local(u), layout.local(v)
                group.append(torch.dot(lu.reshape(-1).float(), lv.reshape(-1).float()))
        groups.append(group)
    if not params:
        return [torch.zeros(()) for _ in pairs]
    return list(layout.totals(*groups, like=params, replicated=whole))


def grads(params) -> list[torch.Tensor | None]:
    return [p.grad for p in params]
