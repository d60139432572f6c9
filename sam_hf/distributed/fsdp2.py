"""FSDP2 glue: what accelerate's FSDP plugin set up, role meshes, and sharding each role with accelerate.

Under FSDP2 (accelerate's FSDP plugin with `fsdp_version: 2`) every trainable parameter is a DTensor whose
rank holds one shard, and FSDP's reduce-scatter averages `.grad` over the data-parallel ranks in every
backward pass. In role mode each role is sharded over its own k ranks (`role_mesh`), so that rank (0, i) and
rank (1, i) hold the same shard; in a Trainer, `shard_for_roles` runs accelerate's own FSDP2 preparation over
that mesh. The layouts that use this are in `layouts/fsdp2.py`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..config import SharpnessConfigError
from . import dtensor
from .collectives import broadcast_tensors


FSDP2_HOW = ("FSDP2: accelerate's FSDP plugin with `fsdp_version: 2` (accelerate config), or "
             "--fsdp full_shard --fsdp_config '{\"version\": 2}'")


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
    plain = [names.get(id(p), f"parameter {i}") for i, p in enumerate(params) if not dtensor.is_sharded(p)]
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
                "mesh=sam_hf.distributed.fsdp2.role_mesh(plan)); or use optim_args parallel=off")


@torch.no_grad()
def sync_roles(plan, tensors, what: str = "the initial role sync") -> None:
    """Give role 1's ranks the values of role 0's rank with the same dp index (its shard of every DTensor, and
    plain tensors as they are): what DDP's start-up broadcast does, for two roles that must start as replicas."""
    broadcast_tensors(plan, [dtensor.local(t.detach()) for t in tensors], int(plan.mesh.mesh[0, plan.dp_rank]), what,
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
