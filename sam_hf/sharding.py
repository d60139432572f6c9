"""FSDP2: the methods on sharded parameters (`torch.distributed.fsdp.fully_shard`, DTensor).

Under FSDP2 (accelerate's FSDP plugin with `fsdp_version: 2`) every trainable
parameter is a `DTensor` whose rank holds one shard (`Shard(0)` over the FSDP
mesh; HSDP adds a `Replicate` dimension), and its `.grad` is a DTensor sharded
the same way, already averaged over the data-parallel ranks by FSDP's
reduce-scatter in the backward pass. What the methods need on top:

* Norms are global (DESIGN.md: ||.|| over all trainable parameters, across
  the shards). `base.global_norm` hands every DTensor to `ShardNorms`, which
  sums the squares of the local shards and all-reduces that sum once over the
  mesh dimensions the tensors are sharded on: one collective per norm,
  whatever the number of parameters (`Replicate` dimensions hold equal values
  and need none).
* Everything else is elementwise and stays on the local shard: the
  perturbation x + rho d/||d||, the weight backups (`p.detach().clone()` of a
  DTensor copies its shard only), SAMPa's closed-form lookahead (the base
  optimizer's state is sharded like the weights) and the method state (SAMPa's
  g_t, Asynchronous SAM's a_{t-1}: DTensors made from the sharded `.grad`). So
  the method's extra memory per rank is its unsharded extra memory divided by
  the shard count (`local_bytes` measures it).
* Gradient reduction is FSDP's: `.grad` is averaged over the ranks in every
  backward, so the host's `all_reduce_grads` must not average again
  (`grads_reduced_by_fsdp`).

Data-parallel meaning of each method on N sharded ranks, each holding 1/N of
the global batch B (1 and N processes give the same weights, as DESIGN.md asks):

* SAM / ASAM: FSDP averages the ascent gradient, so the perturbation is exact
  SAM on B. `sync_ascent=false` (a per-rank perturbation) is refused: every
  rank's forward all-gathers the same weights, so ranks cannot sit at
  different points x + e_r without a full unsharded copy of e_r each; use
  `msam` with `micro_batches=N`, its sharded equivalent.
* mSAM(m): every rank splits its own share of B into m slices, and pass j runs
  slice j on every rank at once; FSDP averages the ranks' gradients, so
  micro-batch j of the global batch is the union of the ranks' j-th slices,
  with one shared perturbation e_j. That is mSAM(m) on B exactly (the
  micro-batches are a different, equally random, partition of B than one
  process's consecutive ranges), at the data-parallel cost of 2 passes over
  the local share. So under FSDP2 each rank runs all m micro-batches, not m/N
  (`msam_micro_batches`).
* SAMPa and Asynchronous SAM run data parallel by default (`parallel=auto`
  becomes `off`: both passes on every rank, each averaged by FSDP, the model
  sharded over all 2k ranks). `parallel=on` asks for role mode: the 2 x k role
  mesh, each role sharded over its own k ranks (`role_mesh`; in a Trainer,
  `shard_for_roles` runs accelerate's own FSDP2 preparation over it), so FSDP
  averages each role's gradient over its k ranks, and the exchange swaps
  local shards point to point between ranks (0, i) and (1, i), which hold the
  same shard. Twice the model's shard per rank of data-parallel FSDP over 2k
  ranks, for the two passes in parallel. `ascent_device=cpu` is refused.

Checkpoints: accelerate saves an FSDP2 optimizer through
`get_optimizer_state_dict`, which keeps only `state` and `param_groups` and
drops the method state that `SharpnessOptimizer.state_dict()` adds. So
`save_method_state` / `load_method_state` write it beside the optimizer: its
DTensors through `torch.distributed.checkpoint` (every rank writes its shard),
and per-rank values (SAMPa's held batch B_t is this rank's share of the batch)
to one small file per rank.

FSDP1 (flat parameters, no per-parameter sharded gradient) and DeepSpeed (its
engine owns the backward pass and the step) are refused by `check_setup`,
which also catches FSDP flags on a run where accelerate left FSDP off (on the
CPU accelerate enables FSDP only for accelerators).
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import re
import types
import warnings
from typing import Any

import torch
import torch.distributed as dist

from .config import SharpnessConfigError

logger = logging.getLogger(__name__)

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None

STATE_DIR = "sam_hf_state"  # inside a checkpoint folder: the method state's DTensors (DCP)
RANK_FILE = "sam_hf_state.rank{rank}.pt"  # inside a checkpoint folder: each rank's own part of the method state
FSDP2_HOW = ("FSDP2: accelerate's FSDP plugin with `fsdp_version: 2` (accelerate config), or "
             "--fsdp full_shard --fsdp_config '{\"version\": 2}'")


# ---- what is sharded -------------------------------------------------------------

def is_sharded(t) -> bool:
    """Whether `t` is a DTensor (an FSDP2 parameter, its gradient, or state made from them)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing to it writes the DTensor), or `t` itself."""
    return t.to_local() if is_sharded(t) else t


def unwrap(model):
    """The module under torch.compile's wrapper."""
    return getattr(model, "_orig_mod", model)


def is_fsdp2(model) -> bool:
    """Whether `fully_shard` (FSDP2) was applied to `model` or any of its submodules."""
    if model is None or not dist.is_available():
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in unwrap(model).modules())


def reshard(model) -> None:
    """Free every FSDP2 module's unsharded parameters, so the next forward all-gathers the shards as they are now.

    FSDP2 keeps a module unsharded after a forward without backward where `reshard_after_forward` is False (the
    root, and accelerate's tail group): after an evaluation, a method that moves the weights before its first
    forward (SAMPa's lookahead, a perturbation) would otherwise run that forward on the stale unsharded copy."""
    from torch.distributed.fsdp import FSDPModule

    for module in unwrap(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def has_sharded_params(params) -> bool:
    return any(is_sharded(p) for p in params)


def grads_reduced_by_fsdp(params) -> bool:
    """True when the parameters are FSDP2-sharded: FSDP's reduce-scatter has already averaged `.grad` over the
    data-parallel ranks in the backward pass, so the host must not all-reduce again."""
    return has_sharded_params(params)


# ---- norms and reductions over the shards -----------------------------------------

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
    every rank (a per-shard answer would let ranks take different branches and then wait on each other)."""
    tensors = [t for t in tensors if t is not None]
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


# ---- memory --------------------------------------------------------------------

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


# ---- set-up checks, for the trainer ----------------------------------------------

def fsdp_requested(args) -> bool:
    """Whether the run asks for FSDP (Trainer flags or accelerate's environment), whether or not it got it."""
    return bool(getattr(args, "fsdp", None)) or bool(getattr(args, "fsdp_plugin_args", None)) or \
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_version(trainer) -> int | None:
    """accelerate's FSDP version for this trainer (1 or 2), or None when FSDP is off."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    if plugin is None:
        return None
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def check_setup(trainer, cfg) -> bool:
    """Check a sharpness method against the trainer's sharding; returns True for an FSDP2 run.

    Call it where the trainer checks its combinations (after `Trainer.__init__` built the accelerator, before
    `parallel.make_plan`): it raises `SharpnessConfigError` for DeepSpeed, FSDP1, FSDP flags that accelerate
    ignored (CPU runs), and what FSDP2 cannot run (a CPU ascent rank, per-rank SAM perturbations, too many mSAM
    micro-batches). Under FSDP2 it sets `cfg.parallel = "off"` where it was `auto`: SAMPa and Asynchronous SAM
    then run data parallel unless `parallel=on` asks for role mode."""
    name, args = cfg.method, trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise SharpnessConfigError(
            f"optim={name} does not run under DeepSpeed: its engine owns the backward pass, the gradient "
            "partitioning and the step, so there is no gradient to perturb in between. For sharded training use "
            f"{FSDP2_HOW}; otherwise torchrun/accelerate DDP, or PEFT/LoRA to fit the model")
    version = fsdp_version(trainer)
    if version is None:
        if fsdp_requested(args):
            device = getattr(args, "device", None)
            raise SharpnessConfigError(
                f"optim={name}: FSDP was requested (--fsdp / fsdp_config / ACCELERATE_USE_FSDP), but accelerate "
                f"left it off on this run (device {device}{', --use_cpu' if getattr(args, 'use_cpu', False) else ''}"
                "): it enables FSDP only on accelerators (GPUs), so the model would NOT be sharded. Drop the FSDP "
                "flags to train unsharded (one copy of the model per process), or run on GPUs")
        return False
    if version != 2:
        raise SharpnessConfigError(
            f"optim={name} does not support FSDP1: it flattens parameters into FlatParameters whose sharded "
            "gradient and weights are not per parameter, so the ascent norm, the perturbation and the method "
            f"state cannot be placed on the shards. Use {FSDP2_HOW}")
    if cfg.method in ("sampa", "asyncsam"):
        if cfg.ascent_device == "cpu":
            raise SharpnessConfigError(
                "optim_args: ascent_device=cpu puts a whole unsharded replica on the CPU ascent rank; it does not "
                "combine with FSDP2. Drop ascent_device (Asynchronous SAM then runs data parallel on the GPUs)")
        pc = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
        extra = {k: getattr(pc, f"{k}_size", 1) or 1 for k in ("dp_replicate", "tp", "cp", "sp")} if pc else {}
        if cfg.parallel == "on" and any(v > 1 for v in extra.values()):
            raise SharpnessConfigError(
                f"optim_args: parallel=on under FSDP2 builds its own 2 x k mesh (each role sharded over its k ranks), "
                f"which does not combine with accelerate's ParallelismConfig {extra}; drop the ParallelismConfig "
                "(plain FSDP2), or use parallel=off")
        if cfg.parallel == "auto":  # memory first: the reason to shard; role mode holds twice the shard per rank
            cfg.parallel = "off"
            logger.info("sam_hf: %s under FSDP2 runs data parallel (parallel=off): both passes on every rank, the "
                        "model sharded over all ranks; parallel=on runs the two passes on two halves of the ranks, "
                        "each sharded over its half", name)
    if cfg.method == "sam" and not cfg.sync_ascent:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        raise SharpnessConfigError(
            "optim_args: sync_ascent=false (each rank perturbs by its own gradient) does not run under FSDP2: every "
            "rank's forward all-gathers the same sharded weights, so ranks cannot sit at different perturbed "
            f"points. Use optim=msam with micro_batches={world}, its sharded equivalent, or drop sync_ascent")
    if cfg.method == "msam":
        local = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if cfg.micro_batches > local:
            raise SharpnessConfigError(
                f"optim_args: micro_batches={cfg.micro_batches} under FSDP2 splits each rank's share of the batch "
                f"(per_device_train_batch_size={args.per_device_train_batch_size} x gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps} = {local} samples) into {cfg.micro_batches} slices, micro-batch "
                "j being every rank's j-th slice together; use micro_batches <= "
                f"{local}")
    return True


def msam_micro_batches(cfg) -> int:
    """mSAM's micro-batches per rank under FSDP2: all m (micro-batch j is every rank's j-th slice, see the
    module docstring), where data-parallel DDP gives each rank m / world size."""
    return cfg.micro_batches


# ---- role mode: each role sharded over its own k ranks --------------------------------

def role_mesh(plan):
    """The 1-D mesh of this rank's role (its k dp ranks): what `fully_shard(..., mesh=)` must get in role mode,
    so that FSDP's reduce-scatter averages each role's gradient over its own ranks only."""
    return plan.mesh["dp"]


def check_role_layout(params, plan, names=None) -> None:
    """Role mode on sharded parameters: every trainable parameter must be a DTensor sharded over exactly this
    rank's role mesh, so that rank (0, i) and rank (1, i) hold the same shard, FSDP averages it over the role's
    k ranks, and the exchange can swap the two roles' shards."""
    want = role_mesh(plan).mesh.flatten().tolist()
    names = names or {}
    plain = [names.get(id(p), f"parameter {i}") for i, p in enumerate(params) if not is_sharded(p)]
    if plain:
        raise SharpnessConfigError(
            f"sam_hf: role-parallel {plan.describe()} under FSDP2 needs every trainable parameter sharded by FSDP2, "
            f"but {', '.join(plain[:5])}{' ...' if len(plain) > 5 else ''} ({len(plain)} in all) are plain tensors "
            "(e.g. in the FSDP plugin's ignored modules): nothing would average their gradients over a role's "
            "ranks. Shard them too, freeze them, or use optim_args parallel=off")
    for i, p in enumerate(params):
        got = p.device_mesh.mesh.flatten().tolist()
        if p.device_mesh.ndim != 1 or got != want:
            raise SharpnessConfigError(
                f"sam_hf: role-parallel {plan.describe()} under FSDP2 needs each role sharded over its own "
                f"{plan.dp_size} rank(s) {want}, but {names.get(id(p), f'parameter {i}')} is sharded over ranks "
                f"{got} ({p.device_mesh.ndim}-D mesh, {tuple(p.placements)}): the two roles run different passes "
                "and must not all-gather from each other. In a Trainer, pass the model unsharded (sam_hf shards "
                "each role with accelerate's FSDP2 plugin); in a custom loop, fully_shard(module, "
                "mesh=sam_hf.sharding.role_mesh(plan)); or use optim_args parallel=off")


@torch.no_grad()
def sync_roles(plan, tensors, what: str = "the initial role sync") -> None:
    """Give role 1's ranks the values of role 0's rank with the same dp index (its shard of every DTensor, and
    plain tensors as they are): what DDP's start-up broadcast does, for two roles that must start as replicas."""
    from .parallel import broadcast_tensors

    broadcast_tensors(plan, [local(t.detach()) for t in tensors], int(plan.mesh.mesh[0, plan.dp_rank]), what,
                      group=plan.mesh.get_group("role"))


class _RoleMeshAccelerator:
    """The Accelerator as accelerate's `fsdp2_prepare_model` reads it, with this rank's role mesh as the FSDP
    mesh; everything else (the FSDP plugin, mixed precision, the device, the main process) is the real one's."""

    def __init__(self, accelerator, plan):
        from types import SimpleNamespace

        self._accelerator = accelerator
        self.torch_device_mesh = plan.mesh  # (role, dp): fsdp2_prepare_model takes mesh[("dp",)], this role's
        self.parallelism_config = SimpleNamespace(fsdp_dim_names=("dp",))

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def shard_for_roles(accelerator, model, plan, optimizer):
    """Role mode under accelerate's FSDP2 plugin: shard `model` (under torch.compile's wrapper, if any) in place
    over this rank's role mesh with accelerate's own preparation (the plugin's wrap policy, mixed precision,
    offload, resharding, tied weights, cpu_ram_efficient_loading, activation checkpointing), where accelerate
    would shard it over all ranks. Trainer then hands the model to `accelerator.prepare`, which keeps an FSDP2
    module as it is.

    Every rank starts from rank 0's weights (what DDP's start-up broadcast does; with cpu_ram_efficient_loading
    accelerate already loads them so). The optimizer, built on the unsharded parameters, is pointed at the
    sharded ones. Returns those sharded parameters per parameter group, for `rebind_optimizer` after each
    `prepare` (accelerate matches parameters by their shard's data pointer, and an empty shard has none), and
    whether activation checkpointing was applied (the plugin's flag is off until the caller sets it back after
    `prepare`)."""
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model

    from .parallel import broadcast_tensors

    module = unwrap(model)
    plugin = accelerator.state.fsdp_plugin
    if not getattr(plugin, "cpu_ram_efficient_loading", False):
        broadcast_tensors(plan, [*module.parameters(), *module.buffers()], 0, "the initial weight broadcast")
    checkpointing = getattr(plugin, "activation_checkpointing", False)
    if checkpointing:  # before sharding, as in accelerate's own order (in place)
        fsdp2_apply_ac(accelerator, module)
    names = {id(p): n for n, p in module.named_parameters()}
    # applied here: accelerate.prepare must not wrap the layers again (the caller restores the flag after it)
    plugin.activation_checkpointing = False
    sharded = fsdp2_prepare_model(_RoleMeshAccelerator(accelerator, plan), module)
    named = dict(sharded.named_parameters())  # the sharded parameters, taken before any forward unshards them
    groups = None
    if optimizer is not None:
        groups = [[named[names[id(p)]] for p in group["params"]] for group in optimizer.param_groups]
        rebind_optimizer(optimizer, groups)
    return model, groups, checkpointing  # the layout is checked at the first step (the trainer's check_role_layout)


def rebind_optimizer(optimizer, groups) -> None:
    """Point each parameter group at the recorded parameters, where `prepare` changed them."""
    for group, params in zip(optimizer.param_groups, groups):
        if len(group["params"]) != len(params) or any(a is not b for a, b in zip(group["params"], params)):
            group["params"] = list(params)


def rebind_params(method) -> bool:
    """Point `method.params` at the parameters the base optimizer holds now, and return whether they are sharded.

    accelerate's FSDP2 preparation swaps the optimizer's parameters for DTensor ones after the method was built;
    the order is kept, so everything indexed like `method.params` (state, ASAM's `rescaled`) stays valid."""
    from .methods.base import trainable_params

    current = trainable_params(method.optimizer)
    if len(current) != len(method.params) or any(a is not b for a, b in zip(current, method.params)):
        if len(current) != len(method.params):
            raise RuntimeError(f"sam_hf: the optimizer now holds {len(current)} trainable parameters, the method was "
                               f"built with {len(method.params)}")
        method.params = current
    return has_sharded_params(current)


# ---- checkpoints -------------------------------------------------------------------

SLOT = "__sam_hf_dtensor__"  # the marker key of a plain dict that stands where a DTensor sat in the method state


def _slot(key: str, t) -> dict:
    """Where a DTensor sat in the method state, with what is needed to allocate it again for loading: a plain dict
    (torch.load(weights_only=True) reads it; placements and dtypes are on torch's own allow-list)."""
    return {SLOT: key, "shape": list(t.shape), "dtype": t.dtype, "placements": list(t.placements)}


def _is_slot(obj) -> bool:
    return isinstance(obj, dict) and SLOT in obj


def _split(obj, prefix: str, sharded: dict):
    """The state with each DTensor moved into `sharded` (under a path key) and replaced by a slot."""
    if is_sharded(obj):
        sharded[prefix] = obj
        return _slot(prefix, obj)
    if isinstance(obj, dict):
        return {k: _split(v, f"{prefix}.{k}", sharded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, f"{prefix}.{i}", sharded) for i, v in enumerate(obj))
    return obj


def _join(obj, loaded: dict):
    if _is_slot(obj):
        return loaded[obj[SLOT]]
    if isinstance(obj, dict):
        return {k: _join(v, loaded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, loaded) for v in obj)
    return obj


def _slots(obj, out: list):
    if _is_slot(obj):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _slots(v, out)
    return out


class _LegacySlot:
    """Files sam_hf wrote before its slots were plain dicts hold pickled `sam_hf.sharding._Slot` objects (attributes
    key, shape, dtype, placements) in pickle protocol 5, which torch's weights_only unpickler does not read. They
    are read by `_LegacyUnpickler`, which resolves only the globals such a file holds: this class (built without
    running any of its code: the unpickler sets its attributes), tensors, dtypes and DTensor placements."""

    def as_dict(self) -> dict:
        return {SLOT: self.key, "shape": list(self.shape), "dtype": self.dtype, "placements": list(self.placements)}


class _LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        from torch.distributed.tensor import placement_types

        if (module, name) == ("sam_hf.sharding", "_Slot"):
            return _LegacySlot
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == placement_types.__name__ and name in ("Shard", "Replicate", "Partial", "_StridedShard"):
            return getattr(placement_types, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not a tensor, a dtype or a "
                                     "placement")


_legacy_pickle = types.SimpleNamespace(__name__="sam_hf_legacy_pickle", Unpickler=_LegacyUnpickler,
                                       load=pickle.load)


def _from_legacy(obj):
    if isinstance(obj, _LegacySlot):
        return obj.as_dict()
    if isinstance(obj, dict):
        return {k: _from_legacy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_legacy(v) for v in obj)
    return obj


def read_state_file(path: str) -> dict:
    """One rank's method-state file, read with `torch.load(weights_only=True)`: tensors, plain containers and
    torch's allow-listed types only, so a file carrying any other pickled object is refused, never run. A file of
    the previous format (pickle protocol 5, `_Slot` objects) is read by `_LegacyUnpickler`, as restricted."""
    try:
        try:
            with warnings.catch_warnings():  # torch warns about protocol 5 before it fails on it
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                saved = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Unsupported operand 149" not in str(err):  # 149: FRAME, pickle protocol 4+: the previous format
                raise
            saved = _from_legacy(torch.load(path, map_location="cpu", weights_only=False,
                                            pickle_module=_legacy_pickle))
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"a pickled {found.group(1)}" if found else "a pickled object"
        raise SharpnessConfigError(
            f"sam_hf: refusing to load {path}: it holds {what}, which is not a tensor or a plain container, and "
            "unpickling it could run code from the file. sam_hf writes only tensors and plain "
            "containers there; if the checkpoint is yours, delete the file to resume without the method state (the "
            "method starts its state afresh), or resume from a checkpoint sam_hf wrote") from None
    if not (isinstance(saved, dict) and "state" in saved):
        raise SharpnessConfigError(f"sam_hf: {path} is not a method-state file sam_hf wrote (no 'state' entry)")
    return saved


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_method_state(method, checkpoint_dir: str) -> None:
    """Write the method's state into `checkpoint_dir` (every rank calls it): DTensors through
    torch.distributed.checkpoint under `sam_hf_state/`, the rest (held batches: this rank's own data) to
    `sam_hf_state.rank{r}.pt`."""
    import torch.distributed.checkpoint as dcp

    sharded: dict[str, Any] = {}
    rest = _split(method.state_dict(), "state", sharded)
    os.makedirs(checkpoint_dir, exist_ok=True)
    # torch's default pickle protocol: the one torch.load(weights_only=True) reads
    torch.save({"state": rest, "world_size": dist.get_world_size() if dist.is_initialized() else 1},
               os.path.join(checkpoint_dir, RANK_FILE.format(rank=_rank())))
    if sharded:
        dcp.save(sharded, checkpoint_id=os.path.join(checkpoint_dir, STATE_DIR))


def load_method_state(method, checkpoint_dir: str) -> bool:
    """Restore what `save_method_state` wrote (every rank calls it; the DTensors may be resharded, the per-rank
    part needs the world size it was saved with). Returns False where the checkpoint has no method state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import empty as dtensor_empty

    path = os.path.join(checkpoint_dir, RANK_FILE.format(rank=_rank()))
    if not os.path.exists(path):
        return False
    saved = read_state_file(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved.get("world_size", world) != world:
        raise SharpnessConfigError(
            f"sam_hf: the method state in {checkpoint_dir} was saved by {saved['world_size']} processes and this run "
            f"has {world}: each rank's held batch is its own share of the data; resume with {saved['world_size']}")
    rebind_params(method)
    mesh = next((p.device_mesh for p in method.params if is_sharded(p)), None)
    slots = _slots(saved["state"], [])
    loaded = {}
    if slots:
        if mesh is None:
            raise SharpnessConfigError(f"sam_hf: {checkpoint_dir} holds sharded (FSDP2) method state, but this run's "
                                       "parameters are not sharded; resume under FSDP2")
        loaded = {s[SLOT]: dtensor_empty(s["shape"], dtype=s["dtype"], device_mesh=mesh, placements=s["placements"])
                  for s in slots}
        dcp.load(loaded, checkpoint_id=os.path.join(checkpoint_dir, STATE_DIR))
    method.load_state_dict(_join(saved["state"], loaded))
    return True
