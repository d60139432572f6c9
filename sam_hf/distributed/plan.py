"""The process layout of a run: world size, rank, and for role mode the 2 x k device mesh.

Role mode (DESIGN.md, "With several processes") puts the two gradient passes of a step on two halves of the
ranks: a 2 x k `DeviceMesh` with dims (`role`, `dp`); role 0 computes the step's first gradient, role 1 the
second, each data parallel over its k ranks, and ranks (0, i) and (1, i) read the same shard stream. Which
layout a run gets is decided in `layouts.make_layout`; this module only builds what it asks for.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import SharpnessConfigError
from .placement import cpu_ascent_world_message

SUPPORTED_BACKENDS = ("gloo", "nccl")


@dataclass
class ParallelPlan:
    mode: str = "single"  # single | data | roles
    world_size: int = 1
    rank: int = 0
    role: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    timeout_s: float = 1800.0
    mesh: object = None
    dp_group: object = None
    peer: int = 0  # role mode: the global rank of the other role's rank with this dp index
    exchange_dtype: str = "fp32"  # role mode: what the gradients cross the link as (optim_args exchange_dtype)
    mixed_devices: bool = False  # ascent_device=cpu: a CPU ascent rank beside the descent rank's device
    staging_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if self.mode == "roles":
            return f"role-parallel 2 x {self.dp_size} mesh (rank {self.rank}: role {self.role}, dp {self.dp_rank})"
        return f"{self.mode} ({self.world_size} process{'es' if self.world_size != 1 else ''})"


def _destroy_process_group() -> None:
    """At exit, tear the process group down while Python still runs: left to interpreter teardown, gloo's
    threads can abort the process ("terminate called without an active exception") after a finished run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def device_backend(device: torch.device) -> str:
    """The backend of the default process group that carries `device`'s tensors.

    A group started with one backend names it (`dist.get_backend()`: "gloo", "nccl"). One started without
    (`init_process_group()`, as accelerate does where it finds no accelerator) gets torch's default of one backend
    per device type: `get_backend()` then says "undefined" (or "cpu:gloo,cuda:nccl") and `get_backend_config()`
    lists them, e.g. "cpu:gloo"."""
    backend = str(dist.get_backend())
    if backend in SUPPORTED_BACKENDS:
        return backend
    per_device = dict(p.strip().split(":", 1) for p in str(dist.get_backend_config()).split(",") if ":" in p)
    return per_device.get(device.type, backend)


def meant_several_processes(env=os.environ) -> str | None:
    """A warning for a one-process run whose launcher was asked for several, else None: `accelerate launch
    --num_processes N` without --multi_gpu starts one process through its simple launcher, which sets MASTER_ADDR
    (for N > 1) but no WORLD_SIZE."""
    if "MASTER_ADDR" in env and "WORLD_SIZE" not in env and any(k.startswith("ACCELERATE_") for k in env):
        return ("sam_hf: this run has 1 process, but accelerate launch was asked for several (MASTER_ADDR is set, "
                "WORLD_SIZE is not): without --multi_gpu its launcher starts one process; add --multi_gpu (on a "
                "machine without GPUs, also --use_cpu in the script's arguments)")
    return None


def make_plan(device: torch.device, timeout_s: float, roles: bool = False, cpu_rank: bool = False,
              exchange_dtype: str = "fp32", trainer_world: int | None = None) -> ParallelPlan:
    """The plan for this process: one process, data parallel over all ranks, or (`roles`) the 2 x k role mesh.
    `cpu_rank`: rank 1 may run on the CPU beside a GPU rank 0 (Asynchronous SAM's `ascent_device=cpu`).
    `trainer_world`: the number of processes transformers works with (TrainingArguments.world_size); it must be
    torch.distributed's, or each process would train alone on the whole data while sam_hf pairs them up."""
    world = world_size()
    if trainer_world is not None and trainer_world != world:
        raise SharpnessConfigError(
            f"sam_hf: torch.distributed runs {world} processes but transformers sees {trainer_world} (accelerate "
            "found no GPU, and without --use_cpu it trains each process alone on the whole data): add --use_cpu "
            "(CPU processes over gloo)")
    if world == 1:
        return ParallelPlan(timeout_s=timeout_s)
    backend = device_backend(device)
    if backend not in SUPPORTED_BACKENDS:
        raise SharpnessConfigError(f"sam_hf runs on the gloo and nccl backends; this run's {device.type} tensors go "
                                   f"through {backend!r}: add --ddp_backend gloo (CPU) or nccl (GPUs)")
    atexit.unregister(_destroy_process_group)  # registered once, however many trainers a script builds
    atexit.register(_destroy_process_group)
    # TrainingArguments gives a CPU process's group no timeout (gloo's 30 min default): let --ddp_timeout bound
    # gloo's own waits on every rank, as it does on GPU ranks
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:
        set_timeout(datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    staging = torch.device("cpu") if backend == "gloo" else device
    kinds: list[str] = [""] * world
    dist.all_gather_object(kinds, device.type)
    mixed = check_devices(kinds, backend, cpu_rank)
    base = dict(world_size=world, rank=rank, timeout_s=timeout_s, staging_device=staging, mixed_devices=mixed,
                exchange_dtype=exchange_dtype)
    if not roles:
        return ParallelPlan(mode="data", **base)
    from torch.distributed.device_mesh import init_device_mesh

    k = world // 2
    mesh = init_device_mesh(staging.type, (2, k), mesh_dim_names=("role", "dp"))
    role, dp_rank = mesh.get_local_rank("role"), mesh.get_local_rank("dp")
    return ParallelPlan(mode="roles", role=role, dp_rank=dp_rank, dp_size=k, mesh=mesh, dp_group=mesh.get_group("dp"),
                        peer=int(mesh.mesh[1 - role, dp_rank]), **base)


def check_devices(kinds: list[str], backend: str, cpu_rank: bool = False) -> bool:
    """Every rank on the same device kind, or the one mix sam_hf supports (ascent_device=cpu). Returns whether
    the replicas may differ by round-off: with ascent_device=cpu, even where both ranks happen to be CPUs."""
    mixed = len(set(kinds)) > 1
    if not cpu_rank:
        if mixed:
            raise SharpnessConfigError(
                f"sam_hf: the ranks run on different device kinds {kinds}; every rank must take the same optimizer "
                "step, so put them on one kind, or use asyncsam with ascent_device=cpu (only rank 1 on the CPU)")
        return False
    if len(kinds) != 2:
        raise SharpnessConfigError(cpu_ascent_world_message(len(kinds)))
    if "gloo" not in backend:
        raise SharpnessConfigError(f"optim_args: ascent_device=cpu needs --ddp_backend gloo (NCCL cannot reach a CPU "
                                   f"rank), this run uses {backend!r}; add --ddp_backend gloo")
    if kinds[1] != "cpu":
        raise SharpnessConfigError(
            f"optim_args: ascent_device=cpu, but rank 1 (the ascent rank) runs on {kinds[1]}; start the script "
            "through `sam-hf launch` (or -m sam_hf.launch), which places it, or call "
            "sam_hf.place_ascent_rank(optim, optim_args, 'gloo') before building TrainingArguments")
    return True
