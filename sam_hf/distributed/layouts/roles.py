"""Role mode: a TwoRoleMethod's two passes on two halves of the processes (SAMPa, Asynchronous SAM).

On 2k ranks, a 2 x k mesh with dims (`role`, `dp`): role 0 computes the step's first gradient (SAMPa's g~_t,
Asynchronous SAM's descent), role 1 the second (g_{t+1}, the ascent a_t), each data parallel over its k
ranks. Ranks (0, i) and (1, i) read the same shard stream, so every rank sees the same batches. One step is
this rank's `role_pass`, one exchange (exchange.py: each role's gradient averaged over its k ranks, then
swapped point to point between (0, i) and (1, i), received into method state this rank has spent), and
`finish` with both gradients on every rank: every rank takes the same optimizer step, so the replicas stay
identical (checked by checksum every `check_every` steps).

Loss units follow transformers' data-parallel rule over the k replicas of one role, not all 2k ranks
(`replica_fraction`). Collectives inside a pass (TRL gathers its metrics in compute_loss) go over the role's
dp group only, since the two roles run different passes; per-pass metrics count on the role whose pass counts
in one process (`metrics_role`) and are shared with the other role after the step.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from ...config import SharpnessConfigError
from ..exchange import exchange
from .data_parallel import DataParallel


class Roles(DataParallel):
    roles = True
    replica_fraction = 0.5

    @property
    def data_parallel_size(self) -> int:
        return self.plan.dp_size

    @property
    def data_rank(self) -> int:
        return self.plan.dp_rank

    def gather_data_shards(self, obj) -> list:
        """Role 0's ranks in dp order: ranks (0, i) and (1, i) hold the same shard."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return [out[int(self.plan.mesh.mesh[0, i])] for i in range(self.plan.dp_size)]

    def describe(self) -> str:
        return self.plan.describe()

    def all_reduce_grads(self, params) -> None:
        """Nothing: the exchange averages each role's gradient over its k ranks."""

    def gather_rows(self, tensor):
        raise NotImplementedError("per-example records are gathered by data-parallel layouts only; the two roles "
                                  "read the same examples")

    def step(self, method, batches, passes, step: int):
        """This rank's pass, the exchange, and the method's combination of the two gradients (the same
        `StepResult` on both roles)."""
        plan = self.plan
        self.step_index = step
        scale = passes.loss_scale()
        extras = method.role_pass(plan.role, batches, passes)
        start = time.perf_counter()
        what = f"the {method.name} exchange at step {step} (this rank: {method.role_names[plan.role]})"
        # the other role's gradient lands in the buffers of the method state this rank has spent
        g0, g1, merged = exchange(plan, [p.grad for p in method.params], method.params, scale, extras,
                                  method.EXTRA_KEYS, what, into=method.receive_buffers())
        side = method.side_count(batches)
        if side:  # gradients role 1 computed beside its own, which role 0 needs next step (one way, one per list)
            mine = method.side_gradients() if plan.role == 1 else [None] * side
            received = []
            for j in range(side):
                own = mine[j] if mine[j] is not None else [None] * len(method.params)
                received.append(exchange(plan, [], method.params, 1.0, {}, (), f"{what}, side gradient {j + 1}",
                                         average=method.side_averaged, own=own)[1])
            method.receive_side(received)
        exchange_seconds = time.perf_counter() - start
        result = method.finish(g0, g1, batches, merged, scale)
        result.metrics["sam/exchange_seconds"] = exchange_seconds
        return result

    def _clean_rank(self, clean_role: int) -> int:
        return int(self.plan.mesh.mesh[clean_role, 0])

    def check_trainer(self, trainer) -> None:
        if getattr(trainer.args, "train_sampling_strategy", None) == "batch_rebalance":
            raise SharpnessConfigError(
                f"train_sampling_strategy=batch_rebalance hands each of the {self.world_size} ranks its own batches, "
                f"but role-parallel {trainer.sharpness_config.method} needs ranks (0, i) and (1, i) to read the same "
                "stream; use train_sampling_strategy=group_by_length (it also evens the two roles' padded lengths) "
                "or random, or optim_args parallel=off")

    # ---- data and metrics ---------------------------------------------------------------------------------
    def shard_dataloader(self, dataloader):
        """Ranks (0, i) and (1, i) read the same shard: accelerate's sampler is given the role's k ranks."""
        shard = getattr(dataloader, "batch_sampler", None)
        if not hasattr(shard, "num_processes"):
            raise SharpnessConfigError(
                "role-parallel training needs a map-style (sized) train dataset, so both roles can read the same "
                "shard; use optim_args parallel=off for an iterable dataset")
        shard.num_processes, shard.process_index = self.plan.dp_size, self.plan.dp_rank
        if self.plan.dp_size == 1:
            # One rank per role reads the whole stream: keep the epoch's last partial batch as one process would
            # (accelerate's even_batches would complete it with samples from the epoch's start).
            shard.even_batches = False
        return dataloader

    def train_batch_size(self, default: int, per_rank: int) -> int:
        return per_rank * self.plan.dp_size

    def counts_pass_metrics(self, method) -> bool:
        return self.plan.role == method.metrics_role

    def pass_gathers(self, accelerator):
        return _role_local_gathers(accelerator, self.plan)

    def share_pass_metrics(self, trainer, method, attrs) -> None:
        """Every rank gets the per-pass metrics (TRL's) of the role whose pass counts, so rank 0 logs what one
        process would."""
        state = [{k: getattr(trainer, k) for k in attrs if hasattr(trainer, k)}]
        if not state[0]:
            return
        dist.broadcast_object_list(state, src=int(self.plan.mesh.mesh[method.metrics_role, 0]))
        for k, v in state[0].items():
            setattr(trainer, k, v)


@contextlib.contextmanager
def _role_local_gathers(accelerator, plan):
    """accelerate's gather and gather_for_metrics over this role's dp group while a pass runs: the two roles run
    different passes, so a gather over every rank would pair unrelated calls and hang. A role's k ranks hold the
    whole step batch between them."""

    def gather(tensor, *args, **kwargs):
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        if plan.dp_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(plan.dp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=plan.dp_group)
        return torch.cat(parts)

    accelerator.gather = accelerator.gather_for_metrics = gather
    try:
        yield
    finally:
        del accelerator.gather, accelerator.gather_for_metrics  # back to the class's methods
