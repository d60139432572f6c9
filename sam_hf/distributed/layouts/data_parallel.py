"""Data parallel: every rank runs the whole method on its own share of the batch.

Gradients are averaged over all ranks where the method asks (`all_reduce_grads`: SAM's ascent gradient, the
final gradient), in place and in buckets. The model is not wrapped in DistributedDataParallel: DDP would
average every backward pass (not what SAM's per-rank mSAM or a skipped all-reduce wants) and its buckets would
hold one more copy of the gradients. Every replica starts from rank 0's weights and buffers, and BatchNorm
statistics follow rank 0's clean pass.
"""

from __future__ import annotations

import torch.distributed as dist

from .. import collectives
from .base import Layout


class DataParallel(Layout):
    replicas = True

    def __init__(self, plan=None):
        super().__init__(plan)
        self._rank_groups = {}  # size -> this rank's process group of `size` consecutive ranks

    def rank_groups(self, size: int) -> None:
        if not self.distributed or size in self._rank_groups or not 1 < size < self.world_size:
            return
        for start in range(0, self.world_size, size):  # collective: every rank creates every group
            group = dist.new_group(list(range(start, start + size)))
            if start <= self.plan.rank < start + size:
                self._rank_groups[size] = group

    def average_within(self, params, size: int) -> None:
        if size >= self.world_size or not self.distributed:
            return super().average_within(params, size)
        if size > 1:
            self.rank_groups(size)
            collectives.all_reduce_grads_(params, self.plan, f"the ascent all-reduce within groups of {size} ranks at "
                                          f"step {self.step_index}", group=self._rank_groups[size], size=size)

    def describe(self) -> str:
        return f"data parallel ({self.world_size} processes)"

    def all_reduce_grads(self, params) -> None:
        if self.distributed:
            collectives.all_reduce_grads_(params, self.plan, f"the gradient all-reduce at step {self.step_index}")

    @property
    def data_rank(self) -> int:
        return self.plan.rank

    def gather_data_shards(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_rows(self, tensor):
        if not self.distributed:
            return tensor
        return collectives.all_gather_rows(tensor, self.plan, f"the per-example gather at step {self.step_index}")

    def check_replicas(self, params, step: int) -> None:
        if self.distributed and self.replicas:
            collectives.check_replicas(self.plan, params, step)

    def sync_buffers(self, modules, clean_role: int, step: int) -> None:
        if self.distributed and modules:
            collectives.broadcast_buffers(self.plan, modules, self._clean_rank(clean_role), step)

    def _clean_rank(self, clean_role: int) -> int:
        return 0

    def prepare_params(self, params, buffers=()) -> None:
        if self.distributed:
            collectives.broadcast_tensors(self.plan, [*params, *buffers], 0, "the initial weight broadcast")

    def wrap_model(self, trainer, model, training, dataloader, wrap):
        if (not self.distributed or not training
                or trainer.accelerator.unwrap_model(model, keep_torch_compile=False) is not model):
            return wrap(model, training, dataloader)
        # No DistributedDataParallel (see the module docstring). Accelerate still places the model and adds
        # mixed-precision autocast; what DDP's construction did, the broadcast does.
        model = trainer.accelerator.prepare_model(model, evaluation_mode=True)
        self.prepare_params(list(model.parameters()), list(model.buffers()))
        return model
