"""The layout interface, and the one-process layout every other one extends.

A layout is how one step's passes are spread over processes. It owns: how gradients are averaged
(`all_reduce_grads`), how global norms, finiteness and sums are reduced (`norm`, `all_finite`, `totals`,
`local`), how a step runs (`step`: the method's own step, or one role's pass and the exchange), where method
state lives and how it is checkpointed (`save_state`, `load_state`), how the data is read per rank
(`shard_dataloader`, `train_batch_size`), and how a Trainer's model is wrapped and prepared (`wrap_model`,
`before_step`), and, where an engine owns backward and the optimizer step (DeepSpeed), how one pass's
backward runs (`before_forward`, `backward`), where its gradient appears, and how the step is taken
(`end_step`). Methods read its capabilities (`roles`, `sharded`, `reduces_every_pass`) and never ask which
layout they run under; the Trainer glue and the plain-PyTorch optimizer call the hooks.
"""

from __future__ import annotations

import contextlib

from .. import dtensor
from ..plan import ParallelPlan


class Layout:
    """One process: nothing to average, nothing to exchange."""

    roles = False  # the two passes of a TwoRoleMethod run on two halves of the processes
    sharded = False  # parameters are sharded: method state lives on the local shard
    reduces_every_pass = False  # every backward pass averages .grad over the data-parallel ranks by itself
    replicas = False  # ranks hold the same weights (checked every check_every steps)
    replica_fraction = 1.0  # the share of all ranks that are data-parallel replicas of each other (loss units)
    owns_step = False  # an engine steps the base optimizer (end_step): the host is handed the plain base optimizer
    whole_params = True  # the method's parameters are whole parameter tensors (False: slices of them, DeepSpeed's)

    def __init__(self, plan: ParallelPlan | None = None):
        self.plan = plan or ParallelPlan()
        self.step_index = 0  # the step being run, for messages

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def distributed(self) -> bool:
        return self.plan.distributed

    @property
    def data_parallel_size(self) -> int:
        """Ranks that split one step's batch between them (data shards)."""
        return self.plan.world_size

    @property
    def data_rank(self) -> int:
        """This rank's data shard, in [0, data_parallel_size)."""
        return 0

    def gather_data_shards(self, obj) -> list:
        """`obj` from every data shard, in shard order (every rank calls it; a collective where there are several):
        what a checkpoint keeps of per-shard state (SAMPa's held batch) so that another layout can resume it."""
        return [obj]

    def describe(self) -> str:
        return "one process"

    # ---- arithmetic over what this rank holds -----------------------------------------------------------------
    def norm(self, tensors):
        """The 2-norm of all `tensors` together (over the shards where they are sharded); None if there are none."""
        return dtensor.global_norm(tensors)

    def all_finite(self, tensors) -> bool:
        """Whether every element is finite, the same answer on every rank."""
        return dtensor.all_finite(tensors)

    def totals(self, *groups, like=(), replicated=None):
        """Sums of the scalars in each group over the shards, in one collective (see dtensor.totals)."""
        return dtensor.totals(*groups, like=like, replicated=replicated)

    def local(self, t):
        """The part of `t` this rank holds (a view)."""
        return dtensor.local(t)

    def is_whole(self, t) -> bool:
        """Whether this rank holds all of `t` (its scalars are then counted once, not summed over shards)."""
        return not dtensor.is_sharded(t)

    def gather_rows(self, tensor):
        """`tensor` of every data-parallel rank, concatenated along the first dimension in rank order (per-example
        records, e.g. SAF's logits with their example ids); this rank's own in one process."""
        return tensor

    # ---- one step ------------------------------------------------------------------------------------------
    def all_reduce_grads(self, params) -> None:
        """Average `.grad` over the data-parallel ranks, where the backward pass has not done it."""

    def rank_groups(self, size: int) -> None:
        """Create the process groups of `size` consecutive ranks (every rank calls it, in the same order)."""

    def average_within(self, params, size: int) -> None:
        """Average `.grad` within groups of `size` consecutive data-parallel ranks (all of them: `all_reduce_grads`)."""
        if size >= self.data_parallel_size:
            self.all_reduce_grads(params)

    def step(self, method, batches, passes, step: int):
        """One step of `method` on this rank's batches."""
        self.step_index = step
        return method.step(batches, passes)

    def end_step(self, method, result) -> None:
        """After the method left the step's gradient in `.grad` (`result.skip_update`: no update this step). The
        host steps its optimizer itself; a layout that `owns_step` applies the gradient here."""

    # ---- one pass (the host's forward + backward) ------------------------------------------------------------
    def before_forward(self, backward: bool = True) -> None:
        """Before a forward: the weights it reads are the method's parameters as they are now. `backward=False`: a
        forward without backward (no gradient, no new pass)."""

    def backward(self, loss, last: bool, backward) -> None:
        """One backward of a pass: `backward(loss)` is the host's (Trainer: accelerator.backward). `last`: the pass's
        last backward, after which its gradient is read from the method's parameters' `.grad`."""
        backward(loss)

    def loss_scale(self, host_scale: float) -> float:
        """The loss scale the pass's gradients carry: the host's (a GradScaler's), unless an engine scales."""
        return host_scale

    @contextlib.contextmanager
    def base_optimizer(self, optimizer):
        """`optimizer` as seen from the method's parameters (its param_groups and state keyed by them), for code
        that walks its groups (SAMPa's lookahead)."""
        yield optimizer

    def check_replicas(self, params, step: int) -> None:
        """Compare the ranks' weights where they must be equal; a mismatch is an error."""

    def sync_buffers(self, modules, clean_role: int, step: int) -> None:
        """Give every rank the BatchNorm statistics of the rank that ran the clean pass."""

    # ---- data and metrics (Trainer) ------------------------------------------------------------------------
    def shard_dataloader(self, dataloader):
        """Which share of the data this rank reads."""
        return dataloader

    def train_batch_size(self, default: int, per_rank: int) -> int:
        """The global batch Trainer reports: `default` (per rank x world size) unless ranks share batches."""
        return default

    def counts_pass_metrics(self, method) -> bool:
        """Whether this rank's passes count in the host's per-pass metrics (TRL's token counts)."""
        return True

    def pass_gathers(self, accelerator):
        """A context in which collectives inside a pass (TRL's metric gathers) pair the right ranks."""
        return contextlib.nullcontext()

    def share_pass_metrics(self, trainer, method, attrs) -> None:
        """Give every rank the per-pass metrics of the ranks whose passes count."""

    # ---- set-up (Trainer, plain loops) -----------------------------------------------------------------------
    def check_trainer(self, trainer) -> None:
        """Refuse, before training, Trainer settings this layout cannot honour."""

    def prepare_params(self, params, buffers=()) -> None:
        """A plain loop's start: make the replicas equal (what DDP's construction does)."""

    def wrap_model(self, trainer, model, training: bool, dataloader, wrap):
        """Trainer's `_wrap_model`; `wrap` is the base class's."""
        return wrap(model, training, dataloader)

    def before_step(self, trainer, model, method) -> None:
        """Trainer, before each step (FSDP2: reshard, rebind the optimizer's parameters)."""

    def before_load(self, trainer) -> None:
        """Trainer, before it loads the optimizer's state from a checkpoint."""

    def save_state(self, method, checkpoint_dir: str) -> None:
        """Write the method state beside a checkpoint, where the optimizer's own file cannot carry it."""

    def load_state(self, method, checkpoint_dir: str) -> bool:
        """Read what `save_state` wrote; False where there is nothing to read."""
        return False
