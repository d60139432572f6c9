"""Arithmetic over sharded tensors (FSDP2's DTensors) and plain ones alike: norms, finiteness, sums.

A DTensor parameter (`torch.distributed.fsdp.fully_shard`) holds one shard per rank (`Shard(0)` over the FSDP
mesh; HSDP adds a `Replicate` dimension), and so does its gradient and any state made from it. Everything
elementwise stays on the local shard (`local`); a global quantity (the norm over all trainable parameters,
DESIGN.md) sums the local shards' parts in one all-reduce over the mesh dimensions they are sharded on,
whatever the number of parameters (`Replicate` dimensions hold equal values and need none). Plain tensors
count as they are. The layouts (distributed/layouts) reduce through these functions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None

def is_sharded(t) -> bool:
    """Whether `t` is a DTensor (an FSDP2 parameter, its gradient, or state made from them)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing to it writes the DTensor), or `t` itself."""
    return t.to_local() if is_sharded(t) else t


def has_sharded_params(params) -> bool:
    return any(is_sharded(p) for p in params)


def _shard_dims(t) -> tuple[int, ...]:
    """The mesh dimensions over which `t`'s shards must be summed."""
    dims = []
    for i, placement in enumerate(t.placements):
        if placement.is_shard():
            dims.append(i)
        elif placement.is_partial():
            raise ValueError(f"sam_hf: a norm over a DTensor with a pending reduction ({t.placements}); "
                             "expected parameters or gradients sharded by FSDP2")
    return tuple(dims)


def _all_reduce(value: torch.Tensor, mesh, dims, op=None) -> torch.Tensor:
    """`value` reduced over the mesh dimensions `dims` (a new tensor where the mesh's device differs: CPU-offloaded
    shards under an NCCL mesh)."""
    op = dist.ReduceOp.SUM if op is None else op
    out = value if value.device.type == mesh.device_type else value.to(mesh.device_type)
    if mesh.ndim == 1 and dims:
        dist.all_reduce(out, op=op, group=mesh.get_group())
    else:
        for d in dims:  # e.g. (Shard, Shard) layouts; FSDP2 and HSDP shard over one dimension
            dist.all_reduce(out, op=op, group=mesh.get_group(d))
    return out.to(value.device)


class ShardNorms:
    """Accumulates squared norms of DTensors' local shards, then sums them over the shards in one all-reduce
    (one per distinct mesh layout; FSDP2 and HSDP have one)."""

    def __init__(self):
        self._sq: dict[tuple, list[torch.Tensor]] = {}
        self._mesh: dict[tuple, Any] = {}

    def add(self, t) -> bool:
        """Take `t` if it is a DTensor (returns True); a plain tensor is left to the caller."""
        if not is_sharded(t):
            return False
        key = (t.device_mesh, _shard_dims(t))
        self._mesh[key] = t.device_mesh
        self._sq.setdefault(key, []).append(torch.linalg.vector_norm(t.to_local(), dtype=torch.float32).square())
        return True

    def __bool__(self) -> bool:
        return bool(self._sq)

    def norms(self) -> list[torch.Tensor]:
        """One global norm per mesh layout, as plain (replicated) tensors."""
        out = []
        for key, squares in self._sq.items():
            total = torch.stack(squares).sum() if len(squares) > 1 else squares[0].clone()
            out.append(_all_reduce(total, self._mesh[key], key[1]).sqrt())
        return out


@torch.no_grad()
def global_norm(tensors) -> torch.Tensor | None:
    """The 2-norm of DTensors and plain (replicated) tensors together; None when there are none."""
    shards = ShardNorms()
    norms = [torch.linalg.vector_norm(t) for t in tensors if not shards.add(t)]
    norms += shards.norms()
    if not norms:
        return None
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def _layout(tensors):
    """(mesh, dims) of the first DTensor in `tensors`, or None."""
    for t in tensors:
        if is_sharded(t):
            return t.device_mesh, tuple(i for i, pl in enumerate(t.placements) if not pl.is_replicate())
    return None


@torch.no_grad()
def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite, over all shards: one collective, the same answer on
    every rank (a per-shard answer would let ranks take different branches and then wait on each other).

    Plain tensors take a fast exact path: a finite sum proves every element finite (one inf or nan element makes
    any sum non-finite), so only a sum that overflows is checked element by element. One device sync for the
    whole list, not one per parameter."""
    tensors = [t for t in tensors if t is not None]
    if tensors and not any(is_sharded(t) for t in tensors):
        total = torch.stack([t.sum().to(tensors[0].device, torch.float32) for t in tensors]).sum()
        if bool(torch.isfinite(total)):
            return True
    flags = [torch.isfinite(local(t)).all() for t in tensors]
    flag = torch.stack(flags).all().to(torch.int32) if flags else torch.ones((), dtype=torch.int32)
    layout = _layout(tensors)
    if layout is not None:
        flag = _all_reduce(flag, layout[0], layout[1], dist.ReduceOp.MIN)
    return bool(flag)


@torch.no_grad()
def totals(*groups, like=(), replicated=None) -> torch.Tensor:
    """Sums of the scalars in each group, over all shards, in one collective: `totals(dots, sq_a, sq_b)` for a
    cosine. A scalar from a DTensor reduction is this rank's part (`float()` of it would be this rank's alone);
    scalars computed from local shards are summed over the layout of `like` (the parameters they came from).
    `replicated[i]` marks the i-th scalar of every group as the same on every rank (from a plain tensor, e.g. a
    module FSDP ignores): counted once, not summed over the shards."""
    layout = _layout(like)
    sharded_values, plain_values = [], []
    for group in groups:
        parts = [local(v) for v in group]
        layout = layout or _layout(group)
        keep = replicated or [False] * len(parts)
        mine = [v for v, r in zip(parts, keep) if not r]
        same = [v for v, r in zip(parts, keep) if r]
        sharded_values.append(torch.stack(mine).sum() if mine else torch.zeros(()))
        plain_values.append(torch.stack(same).sum() if same else torch.zeros(()))
    device = next((v.device for v in (*sharded_values, *plain_values) if v.device.type != "cpu"), torch.device("cpu"))
    out = torch.stack([v.float().to(device) for v in sharded_values])
    if layout is not None:
        out = _all_reduce(out, layout[0], layout[1])
    return out + torch.stack([v.float().to(device) for v in plain_values])


def local_bytes(obj) -> int:
    """Bytes this rank holds for the tensors in `obj` (nested lists/dicts; DTensors count their local shard)."""
    if torch.is_tensor(obj):
        t = local(obj)
        return t.numel() * t.element_size()
    if isinstance(obj, dict):
        return sum(local_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(local_bytes(v) for v in obj)
    return 0
