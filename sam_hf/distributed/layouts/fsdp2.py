"""FSDP2: the methods on sharded parameters (`torch.distributed.fsdp.fully_shard`, DTensor).

Every trainable parameter is a DTensor whose rank holds one shard, and its `.grad` is a DTensor sharded the
same way, already averaged over the data-parallel ranks by FSDP's reduce-scatter in the backward pass
(`reduces_every_pass`). Norms are reduced over the shards in one all-reduce (dtensor.py); everything else is
elementwise and stays on the local shard: the perturbation, the weight backups, SAMPa's lookahead (the base
optimizer's state is sharded like the weights) and the method state. So a method's extra memory per rank is its
unsharded extra memory divided by the shard count. Parameters FSDP leaves unsharded (accelerate's
`ignored_modules`) are plain tensors: their gradients are averaged here.

Data-parallel meaning on N sharded ranks, each holding 1/N of the global batch B (1 and N processes give the
same weights): SAM's ascent gradient is FSDP's average, so the perturbation is exact SAM on B (a per-rank
perturbation, `sync_ascent=false`, is refused: every rank's forward all-gathers the same weights); mSAM's
micro-batch j is the union of the ranks' j-th slices (methods/msam.py); SAMPa and Asynchronous SAM run data
parallel by default (`parallel=auto`: memory first, the reason to shard), or in role mode with `parallel=on`:
each role sharded over its own k ranks, the exchange swapping local shards between ranks (0, i) and (1, i),
twice the model's shard per rank of data-parallel FSDP over 2k ranks.

Checkpoints: accelerate's FSDP2 optimizer checkpoint keeps the base optimizer's state only, so the method state
is written beside it (checkpoint.py).
"""

from __future__ import annotations

from ...config import SharpnessConfigError
from .. import checkpoint, collectives, dtensor, fsdp2
from .data_parallel import DataParallel
from .roles import Roles


class FSDP2(DataParallel):
    sharded = True
    reduces_every_pass = True
    replicas = False  # every rank holds a different shard

    def describe(self) -> str:
        return f"FSDP2 ({self.world_size} process{'es' if self.world_size != 1 else ''})"

    def all_reduce_grads(self, params) -> None:
        """FSDP's reduce-scatter averaged the shards' .grad already; parameters FSDP left unsharded are ours."""
        plain = [p for p in params if not dtensor.is_sharded(p)]
        if self.distributed and plain:
            collectives.all_reduce_grads_(plain, self.plan, f"the gradient all-reduce at step {self.step_index}")

    def prepare_params(self, params, buffers=()) -> None:
        """The model was sharded by the caller (fully_shard): its shards start as they are."""

    def wrap_model(self, trainer, model, training, dataloader, wrap):
        return wrap(model, training, dataloader)  # accelerate.prepare shards the model

    def before_step(self, trainer, model, method) -> None:
        # no unsharded copy left from an evaluation: the passes read the shards; accelerate swapped the
        # optimizer's parameters for DTensors after the method was built
        fsdp2.reshard(model)
        method.rebind_params()

    def save_state(self, method, checkpoint_dir: str) -> None:
        checkpoint.save_method_state(method, checkpoint_dir)

    def load_state(self, method, checkpoint_dir: str) -> bool:
        return checkpoint.load_method_state(method, checkpoint_dir)


class FSDP2Roles(Roles):
    """Role mode under FSDP2: each role sharded over its own k ranks (`fsdp2.role_mesh`)."""

    sharded = True
    reduces_every_pass = True  # over the role's k ranks: FSDP averages each role's gradient

    def __init__(self, plan=None):
        super().__init__(plan)
        self._groups = None  # the sharded parameters per optimizer group, recorded when the model was sharded
        self._restore_checkpointing = False
        self._layout_checked = False

    def describe(self) -> str:
        return f"{self.plan.describe()} under FSDP2"

    def prepare_params(self, params, buffers=()) -> None:
        fsdp2.sync_roles(self.plan, [*params, *buffers])

    def wrap_model(self, trainer, model, training, dataloader, wrap):
        if not training or fsdp2.is_fsdp2(model):
            return wrap(model, training, dataloader)
        # each role sharded over its own k ranks; accelerate.prepare then keeps the FSDP2 module as it is
        model, self._groups, self._restore_checkpointing = fsdp2.shard_for_roles(
            trainer.accelerator, model, self.plan, trainer.optimizer)
        return model

    def before_load(self, trainer) -> None:
        self._rebind(trainer)

    def _rebind(self, trainer) -> None:
        """accelerate.prepare matches the optimizer's parameters by their shards' data pointers (an empty shard has
        none): point it at the sharded parameters again after every prepare."""
        if self._groups is not None:
            fsdp2.rebind_optimizer(trainer.optimizer, self._groups)
        if self._restore_checkpointing:  # prepare is done: the plugin's flag as the user set it
            trainer.accelerator.state.fsdp_plugin.activation_checkpointing = True
            self._restore_checkpointing = False

    def before_step(self, trainer, model, method) -> None:
        fsdp2.reshard(model)
        if trainer is not None:
            self._rebind(trainer)
        method.rebind_params()
        if not self._layout_checked:  # e.g. a model the script sharded itself
            names = {id(p): n for n, p in fsdp2.unwrap(model).named_parameters()} if model is not None else None
            fsdp2.check_role_layout(method.params, self.plan, names)
            self._layout_checked = True

    def save_state(self, method, checkpoint_dir: str) -> None:
        checkpoint.save_method_state(method, checkpoint_dir)

    def load_state(self, method, checkpoint_dir: str) -> bool:
        return checkpoint.load_method_state(method, checkpoint_dir)


def fsdp_sharding(trainer, method_name: str, roles_asked: bool) -> str | None:
    """"fsdp2" when accelerate will shard the trainer's model with FSDP2, None when it runs unsharded; raises for
    FSDP1 and for FSDP flags accelerate left off (on the CPU it enables FSDP only for accelerators)."""
    args = trainer.args
    version = fsdp2.fsdp_version(trainer)
    if version is None:
        if fsdp2.fsdp_requested(args):
            device = getattr(args, "device", None)
            raise SharpnessConfigError(
                f"optim={method_name}: FSDP was requested (--fsdp / fsdp_config / ACCELERATE_USE_FSDP), but "
                f"accelerate left it off on this run (device {device}"
                f"{', --use_cpu' if getattr(args, 'use_cpu', False) else ''}): it enables FSDP only on accelerators "
                "(GPUs), so the model would NOT be sharded. Drop the FSDP flags to train unsharded (one copy of the "
                "model per process), or run on GPUs")
        return None
    if version != 2:
        raise SharpnessConfigError(
            f"optim={method_name} does not support FSDP1: it flattens parameters into FlatParameters whose sharded "
            "gradient and weights are not per parameter, so the ascent norm, the perturbation and the method "
            f"state cannot be placed on the shards. Use {fsdp2.FSDP2_HOW}")
    pc = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    extra = {k: getattr(pc, f"{k}_size", 1) or 1 for k in ("dp_replicate", "tp", "cp", "sp")} if pc else {}
    if roles_asked and any(v > 1 for v in extra.values()):
        raise SharpnessConfigError(
            f"optim_args: parallel=on under FSDP2 builds its own 2 x k mesh (each role sharded over its k ranks), "
            f"which does not combine with accelerate's ParallelismConfig {extra}; drop the ParallelismConfig "
            "(plain FSDP2), or use parallel=off")
    return "fsdp2"
