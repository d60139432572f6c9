"""The processes that share a sample: one (no torch.distributed), or a process group driven by its rank 0."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Group:
    """Sums and broadcasts over the group's ranks; a no-op on one process.

    gloo reduces CPU tensors, nccl the device's own: tensors are staged on the backend's device and come back
    on their own."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        self.src = dist.get_global_rank(group, 0) if self.world > 1 and group is not None else 0
        self.staging = device if self.world > 1 and "nccl" in str(dist.get_backend(group)) else torch.device("cpu")

    @property
    def driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world == 1:
            return t
        staged = t.to(self.staging)
        dist.all_reduce(staged, op=op or dist.ReduceOp.SUM, group=self.group)
        return staged.to(t.device)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        staged = t.to(self.staging)
        dist.broadcast(staged, src=self.src, group=self.group)
        return staged.to(t.device)
