"""Starting the tests' worker processes: one free port, one torchrun command, one place for their environment.

The workers are modules of `tests.helpers` (dist_train, fsdp_train, ...): they run as `python -m` from the
repository root (`cwd=ROOT`), where `import tests.helpers...` and `import sam_hf` resolve to this checkout (the
children inherit PYTHONPATH too). A worker started by path (a script written to tmp_path, or hf_example.py through
`sam-hf launch`) has only its own folder on sys.path, as `python script.py` gives it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# one thread per process (2 CPU cores shared by every rank), output as it is written (a killed run keeps its log)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    """A TCP port no one listens on now (the OS picks it), for torchrun's rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# An elastic launch (restarts > 0), as docs/distributed.md recommends: the c10d rendezvous (--standalone) with
# the worker store not shared. torchrun's default (static rendezvous, or c10d sharing the agent's store) keeps one
# store for every attempt, and a restarted rank that reaches init_process_group before its peer reads the peer's
# address of the previous attempt: gloo's connectFullMesh is refused, or hangs (torch 2.13).
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun(nproc: int, *target: str, restarts: int = 0) -> list[str]:
    """The command that starts `nproc` processes of `target`: ("-m", "tests.helpers.MODULE", ARGS...) or a
    script path and its arguments; this interpreter's torch.distributed.run, on a free port (with `restarts`:
    elastic, run it with ELASTIC_ENV)."""
    rdzv = ["--max-restarts", str(restarts), "--standalone"] if restarts else ["--master_port", str(free_port())]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *rdzv,
            *map(str, target)]


def run(cmd: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root with ENV (plus `env`), capturing its text output."""
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def tool(name: str) -> str | None:
    """The console script installed beside this Python (not a pyenv shim, which costs a second), else PATH's."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else shutil.which(name)


def save_cases_on_gloo(out: str, cases: dict) -> None:
    """A worker's side: in one gloo process group, train every case (name -> a function returning its weights),
    rank 0 saving each case's weights to OUT/NAME.pt; the group is torn down however the cases end."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        for name, train in cases.items():
            weights = train()
            if dist.get_rank() == 0:
                torch.save(weights, os.path.join(out, f"{name}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
