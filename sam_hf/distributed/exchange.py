"""The role exchange: one point-to-point swap per step between ranks (0, i) and (1, i).

In role mode each rank holds its own role's gradient after its pass; the exchange gives every rank both,
dp-averaged and unscaled fp32, so every rank then takes the same optimizer step. Each gradient crosses the
link once and lands where it is used: this rank's own slot is its `.grad` tensors themselves, the other
role's gradient is received straight into buffers of method state the rank has spent. Under FSDP2 the two
ranks of a pair hold the same shard, and the exchange swaps local shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..tensors import take_grads, work_dtype
from . import dtensor
from .collectives import mean_, post, wait
from .plan import ParallelPlan


SMALL_NUMEL = 16384  # gradients of fewer elements (biases, norms) cross the link together, in one message


def small_ones(like: list[torch.Tensor]) -> list[bool]:
    """Which gradients travel in the shared small message: those under SMALL_NUMEL elements, in order, while the
    message stays within 1/64 of all trainable elements (so its send and receive copies stay negligible)."""
    room = sum(p.numel() for p in like) // 64
    out = []
    for p in like:
        take = p.numel() < SMALL_NUMEL and p.numel() <= room
        room -= p.numel() if take else 0
        out.append(take)
    return out


def exchange(plan: ParallelPlan, grads: list[torch.Tensor | None], like: list[torch.Tensor], scale: float,
             extras: dict[str, float], extra_keys: tuple[str, ...], what: str,
             into: list[torch.Tensor | None] | None = None, dtype: str | None = None, average: bool = True,
             own: list[torch.Tensor | None] | None = None):
    """The role exchange: returns (role 0's gradients, role 1's gradients, merged extras), dp-averaged and
    unscaled fp32, on every rank. `grads` are this rank's `.grad` tensors (scaled by `scale`), the params' `like`.

    Each gradient crosses the link once, point to point between the paired ranks (0, i) and (1, i), and lands
    where it is used. This rank's own slot is its `.grad` tensors themselves, unscaled in place (`take_grads`);
    the other role's gradients are received straight into `into`, the buffers of the method state this rank has
    spent (SAMPa's g_t, Asynchronous SAM's a_(t-1)), allocated only where there is none to reuse. With k > 1
    ranks per role, the own slot is first averaged in place over the role's k dp ranks. A small message ahead
    carries the has-gradient flags and the scalar extras, so a parameter that got no gradient sends nothing; the
    small gradients (`_small_ones`: biases, norms) travel together in one message, so the per-message cost is
    paid about once per large tensor.

    `dtype="bf16"` (default: the plan's, optim_args exchange_dtype=bf16; for bandwidth-bound links) sends bf16
    copies, and each rank rounds its own gradients the same way, so the ranks still combine identical values and
    stay replicas (the result is then SAMPa / Asynchronous SAM with bf16-rounded gradients, not bit for bit the
    1-process run).

    `own`: this rank's gradients as unscaled fp32 tensors it gives away, instead of `.grad` (`grads` is then
    ignored; all None: this rank sends nothing, e.g. a one-way exchange of a method's side gradients).
    `average=False`: the k ranks of a role hold different gradients that are not to be averaged (one per
    micro-batch each).
    """
    n = len(like)
    if own is None:
        if any(g is not p.grad for g, p in zip(grads, like)):
            raise ValueError("exchange: `grads` must be the `.grad` tensors of `like` (it takes them over)")
        own = take_grads(like, scale)
    sharded = dtensor.has_sharded_params(like)
    if sharded:  # FSDP2: each role is sharded over its k ranks; rank (0, i) and (1, i) hold the same shard
        own_dt, like_dt, into_dt = own, like, into
        own, like = [None if g is None else dtensor.local(g) for g in own], [dtensor.local(p) for p in like]
        into = None if into is None else [None if b is None else dtensor.local(b) for b in into]
    meta = torch.zeros(n + len(extra_keys), dtype=torch.float64)
    meta[:n] = torch.tensor([float(g is not None) for g in own], dtype=torch.float64)
    meta[n:] = torch.tensor([float(extras.get(k, 0.0)) for k in extra_keys], dtype=torch.float64)
    meta = meta.to(plan.staging_device)
    if plan.dp_size > 1 and average:  # average the role's k shards first: flags (any rank's), extras, gradients
        wait(dist.all_reduce(meta, group=plan.dp_group, async_op=True), plan, what)
        meta[n:] /= plan.dp_size
        if not sharded:  # FSDP2's reduce-scatter has already averaged each shard over the role's k ranks
            flags = meta[:n].tolist()
            own = [torch.zeros(p.shape, dtype=work_dtype(p), device=p.device) if g is None and f > 0 else g
                   for g, p, f in zip(own, like, flags)]
            mean_([g for g in own if g is not None], plan, what, plan.dp_group, plan.dp_size)
    theirs_meta = torch.empty_like(meta)
    for work in post([dist.P2POp(dist.isend, meta, plan.peer), dist.P2POp(dist.irecv, theirs_meta, plan.peer)]):
        wait(work, plan, what)
    flags = theirs_meta[:n].tolist()
    low = torch.bfloat16 if (dtype or plan.exchange_dtype) == "bf16" else None
    staging = plan.staging_device
    # fp32 on the wire, float64 for a float64 model (its gradients are kept in float64)
    wire_dtype = low or (torch.float64 if any(p.dtype == torch.float64 for p in like) else torch.float32)
    small = small_ones(like)
    ops, sent, landing = [], [], []  # landing: (received tensor, where it goes) where the two differ
    theirs: list[torch.Tensor | None] = []

    def receive_buffer(i, p):
        buf = into[i] if into is not None and i < len(into) else None
        if buf is None or buf.shape != p.shape or buf.dtype != work_dtype(p) or not buf.is_contiguous() \
                or buf.device != p.device:
            buf = torch.empty(p.shape, dtype=work_dtype(p), device=p.device)
        return buf

    with torch.no_grad():
        if low is not None:  # this rank combines exactly what the peer receives
            for g in own:
                if g is not None:
                    g.copy_(g.to(low))
        # the small gradients (biases, norms) travel together, in one message after the large ones
        mine_small = [g.reshape(-1) for g, s in zip(own, small) if g is not None and s]
        for i, (g, p) in enumerate(zip(own, like)):
            if g is not None and not small[i]:
                out = g if g.dtype == wire_dtype and g.device == staging else g.to(staging, wire_dtype)
                sent.append(out)
                ops.append(dist.P2POp(dist.isend, out, plan.peer, tag=i + 1))
            if flags[i] > 0:
                buf = receive_buffer(i, p)
                theirs.append(buf)
                if small[i]:
                    continue
                wire = buf
                if buf.dtype != wire_dtype or buf.device != staging:
                    wire = torch.empty(p.shape, dtype=wire_dtype, device=staging)
                    landing.append((wire, buf))
                ops.append(dist.P2POp(dist.irecv, wire, plan.peer, tag=i + 1))
            else:
                theirs.append(None)
        if mine_small:
            out = torch.cat(mine_small).to(staging, wire_dtype)
            sent.append(out)
            ops.append(dist.P2POp(dist.isend, out, plan.peer, tag=n + 1))
        their_small = [t for t, s in zip(theirs, small) if t is not None and s]
        if their_small:
            wire = torch.empty(sum(t.numel() for t in their_small), dtype=wire_dtype, device=staging)
            ops.append(dist.P2POp(dist.irecv, wire, plan.peer, tag=n + 1))
            offset = 0
            for t in their_small:
                landing.append((wire[offset:offset + t.numel()], t.view(-1)))
                offset += t.numel()
        into = None  # the buffers that were not reused are freed with it
        for work in post(ops):
            wait(work, plan, what)
        del sent
        for wire, buf in landing:
            buf.copy_(wire)
    merged_values = (meta[n:] + theirs_meta[n:]).tolist()
    merged = dict(zip(extra_keys, merged_values))
    if sharded:  # the received shards become DTensors laid out as the parameters (the reused buffers already are)
        own = own_dt
        theirs = [None if t is None else _as_dtensor(t, p, into_dt[i] if into_dt is not None and i < len(into_dt)
                                                     else None) for i, (t, p) in enumerate(zip(theirs, like_dt))]
    return (own, theirs, merged) if plan.role == 0 else (theirs, own, merged)


def _as_dtensor(shard: torch.Tensor, param, reused):
    """`shard` as a DTensor sharded like `param`: `reused` itself where the shard was received into its buffer."""
    if reused is not None and dtensor.local(reused) is shard:
        return reused
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())
