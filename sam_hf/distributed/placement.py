"""Heterogeneous Asynchronous SAM: the ascent rank on the CPU, the descent rank on the GPU.

`TrainingArguments` picks each process's device, and starts the process group, the
moment it is built, before any Trainer exists. So the placement is decided
earlier, from the command line: on rank 1 of a 2-process `asyncsam` run with
`ascent_device=cpu`, `ACCELERATE_USE_CPU=true` makes TrainingArguments choose the
CPU, and both ranks must use gloo (NCCL cannot reach a CPU rank).

`sam-hf launch` (and `-m sam_hf.launch`) does this from the script's own flags.
A script that builds TrainingArguments itself without the launcher calls
`sam_hf.place_ascent_rank(optim, optim_args)` first; SharpnessTrainer checks the
result and says what to do if a rank is on the wrong device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from .. import registry
from ..config import SharpnessConfig, SharpnessConfigError

logger = logging.getLogger(__name__)

ASCENT_RANK = 1


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def wants_cpu_ascent(optim, optim_args: str | None) -> bool:
    """Whether the run asks for a CPU rank beside a GPU one (Asynchronous SAM's ascent_device=cpu)."""
    if not registry.is_method(optim):
        return False
    return SharpnessConfig.from_optim_args(optim, optim_args).cpu_rank


def place_ascent_rank(optim, optim_args: str | None, ddp_backend: str | None,
                      env: MutableMapping[str, str] = os.environ) -> bool:
    """Before TrainingArguments: put the ascent rank of an `ascent_device=cpu` run on the CPU.

    Returns whether this run is one (whatever this rank's role); the world size and rank come from the
    launcher's environment (torchrun, accelerate launch). Other runs are left alone. `ddp_backend` is the
    one the script will give TrainingArguments: it must be gloo, or the GPU rank would start NCCL while the
    CPU rank starts gloo, and neither could reach the other."""
    if not wants_cpu_ascent(optim, optim_args):
        return False
    world = int(env.get("WORLD_SIZE", "1"))
    if world != 2:  # refused now: on one process a gloo backend in TrainingArguments would fail inside transformers
        raise SharpnessConfigError(cpu_ascent_world_message(world))
    if ddp_backend != "gloo":
        raise SharpnessConfigError(f"optim_args: ascent_device=cpu needs --ddp_backend gloo (NCCL cannot reach a "
                                   f"CPU rank), got {ddp_backend!r}; pass ddp_backend='gloo' to TrainingArguments")
    if int(env.get("RANK", "0")) == ASCENT_RANK:
        env["ACCELERATE_USE_CPU"] = "true"
    return True


def cpu_ascent_world_message(world: int) -> str:
    """The refusal of `ascent_device=cpu` on a world size other than 2 (also parallel.the layout plan's)."""
    if world == 1:
        return ("optim_args: ascent_device=cpu needs 2 processes (a descent rank and a CPU ascent rank), this run "
                "has 1; launch with sam-hf launch under torchrun --nproc_per_node 2, or drop ascent_device")
    return (f"optim_args: ascent_device=cpu needs exactly 2 processes (a descent rank and a CPU ascent rank), "
            f"got {world}; launch 2, or drop ascent_device")


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `--flag value` or `--flag=value` in argv (also spelt with dashes, as HfArgumentParser
    accepts: --optim-args); None when absent."""
    spellings = (flag, flag.replace("_", "-"))
    for i, arg in enumerate(argv):
        if arg in spellings:
            return argv[i + 1] if i + 1 < len(argv) else None
        name, sep, value = arg.partition("=")
        if sep and name in spellings:
            return value
    return None


def place_from_argv(argv: list[str], env: MutableMapping[str, str] = os.environ) -> list[str]:
    """`sam-hf launch`: apply `place_ascent_rank` to a script's `--optim`/`--optim_args` flags.

    Returns argv, with `--ddp_backend gloo` added when the script's command line gives no backend. (A script
    reading its arguments from a JSON file is not looked into: it calls `place_ascent_rank` itself.)"""
    optim = _flag_value(argv, "--optim")
    optim_args = _flag_value(argv, "--optim_args")
    if optim is None or not wants_cpu_ascent(optim, optim_args):
        return argv
    backend = _flag_value(argv, "--ddp_backend")
    if backend not in (None, "gloo"):
        raise SharpnessConfigError(f"optim_args: ascent_device=cpu needs --ddp_backend gloo (NCCL cannot reach a "
                                   f"CPU rank), got --ddp_backend {backend}; use gloo or drop the flag")
    place_ascent_rank(optim, optim_args, "gloo", env)  # refuses a world size other than 2 before gloo is added
    if backend is None:
        logger.info("sam_hf: ascent_device=cpu: adding --ddp_backend gloo (NCCL cannot reach a CPU rank)")
        argv = [*argv, "--ddp_backend", "gloo"]
    return argv
