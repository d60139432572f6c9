"""The layouts, and the one place that picks one for a run.

| layout       | module            | when                                                                      |
|--------------|-------------------|---------------------------------------------------------------------------|
| `Layout`     | base.py           | one process                                                               |
| `DataParallel` | data_parallel.py | several processes; every method, and two-role methods with parallel=off  |
| `Roles`      | roles.py          | a two-role method on 2k processes (parallel=auto where the method says, on) |
| `FSDP2`      | fsdp2.py          | parameters sharded by FSDP2 (data parallel over the shards)               |
| `FSDP2Roles` | fsdp2.py          | FSDP2 with parallel=on: each role sharded over its own k ranks            |
| `DeepSpeed`  | deepspeed.py      | DeepSpeed ZeRO 1, 2, 3 (`--deepspeed`, accelerate's plugin): data parallel |

A new layout is one module with a `Layout` subclass, and one line in `make_layout`.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ...config import SharpnessConfigError
from ..fsdp2 import FSDP2_HOW
from ..placement import cpu_ascent_world_message
from ..plan import ParallelPlan, make_plan, world_size
from .base import Layout
from .data_parallel import DataParallel
from .deepspeed import DeepSpeed
from .fsdp2 import FSDP2, FSDP2Roles, fsdp_sharding
from .roles import Roles

logger = logging.getLogger(__name__)

__all__ = ["DataParallel", "DeepSpeed", "FSDP2", "FSDP2Roles", "Layout", "Roles", "make_layout", "trainer_sharding"]


def _rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wants_roles(config, method_cls, world: int, sharding: str | None) -> bool:
    """Whether the run puts the method's two passes on two halves of the processes; refuses what cannot run."""
    if not method_cls.two_roles:
        return False
    parallel = config.parallel
    if world == 1:
        if parallel == "on":
            raise SharpnessConfigError(
                "optim_args: parallel=on needs 2 processes or more, this run has 1; launch with "
                "torchrun --nproc_per_node 2 (or accelerate launch --num_processes 2), or use parallel=auto")
        return False
    if parallel == "off":
        return False
    if parallel == "on":
        if world % 2:
            raise SharpnessConfigError(
                f"optim_args: parallel=on splits the ranks into two roles, but the world size is {world} (odd); "
                f"use {world - 1} or {world + 1} processes, or parallel=off to run both passes on every rank")
        return True
    if sharding is not None:  # memory first, the reason to shard: role mode holds twice the shard per rank
        if _rank0() and sharding == "deepspeed":
            logger.info("sam_hf: %s under DeepSpeed ZeRO runs data parallel (parallel=auto): both passes on every "
                        "rank, the optimizer state (and with ZeRO-3 the model) partitioned over all ranks",
                        method_cls.name)
        elif _rank0():
            logger.info("sam_hf: %s under %s runs data parallel (parallel=auto): both passes on every rank, the "
                        "model sharded over all ranks; parallel=on runs the two passes on two halves of the ranks, "
                        "each sharded over its half", method_cls.name, sharding.upper())
        return False
    if method_cls.roles_by_default(world):
        return True
    if _rank0():
        logger.warning("sam_hf: %s on %d processes runs data parallel (both passes on every rank); role-parallel "
                       "needs %s", method_cls.name, world, method_cls.roles_hint)
    return False


def trainer_sharding(trainer, method_name: str, roles_asked: bool) -> str | None:
    """How accelerate will shard the trainer's model: None (not at all), "fsdp2" or "deepspeed" (ZeRO, checked
    by the DeepSpeed layout); refuses what sam_hf cannot run on (FSDP1, FSDP flags accelerate ignored, role mode
    under DeepSpeed)."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        if roles_asked:
            raise SharpnessConfigError(
                f"optim_args: parallel=on puts {method_name}'s two passes on two halves of the ranks, but under "
                "DeepSpeed one engine's ZeRO group spans all ranks (its reductions, clip norm and overflow check "
                "cover every rank), so the two roles cannot hold different gradients; use parallel=off (or auto: "
                f"both passes on every rank, data parallel), or {FSDP2_HOW} with parallel=on")
        return "deepspeed"
    return fsdp_sharding(trainer, method_name, roles_asked)


def make_layout(config, method_cls, device: torch.device | None = None, timeout_s: float = 1800.0,
                sharding: str | None = None, trainer_world: int | None = None) -> Layout:
    """The layout for this process: from the world size, the method, its `parallel` option and the sharding
    (None, or "fsdp2" for parameters sharded by FSDP2). Refuses what cannot run, saying what to do."""
    world = world_size()
    if config.cpu_rank and world == 1:
        raise SharpnessConfigError(cpu_ascent_world_message(1))
    roles = wants_roles(config, method_cls, world, sharding)
    device = device if device is not None else torch.device("cpu")
    plan = make_plan(device, timeout_s, roles=roles, cpu_rank=config.cpu_rank,
                     exchange_dtype=config.exchange_dtype if method_cls.two_roles else "fp32",
                     trainer_world=trainer_world)
    if sharding == "fsdp2":
        return FSDP2Roles(plan) if roles else FSDP2(plan)
    if sharding == "deepspeed":  # role mode refused in trainer_sharding
        return DeepSpeed(plan)
    if sharding is not None:
        raise ValueError(f"unknown sharding {sharding!r}")
    if roles:
        return Roles(plan)
    return DataParallel(plan) if plan.distributed else Layout(plan)


def single_process() -> Layout:
    return Layout(ParallelPlan())
