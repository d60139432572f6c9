"""The process group's backend: torch's default group (one backend per device type) is accepted where gloo or
nccl carries the tensors; a run that transformers takes for a lone process is refused with the fix."""

import json

import torch

from tests.helpers import processes


def test_a_process_group_started_without_a_backend(tmp_path):
    """`init_process_group()` without a backend (accelerate's call where it finds no accelerator) gives torch's
    default group, whose get_backend() is 'undefined' while gloo carries the CPU tensors: sam_hf runs on it. When
    transformers takes each process for a lone one (no GPU and no --use_cpu), sam_hf says in one line what to add."""
    proc = processes.run(processes.torchrun(2, "-m", "tests.helpers.default_group", tmp_path), timeout=300,
                         env={"CUDA_VISIBLE_DEVICES": ""})  # a machine without a GPU
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["backend"] == "undefined" and r["world_size"] == 2
        assert r["plan"].startswith("role-parallel 2 x 1"), r["plan"]
        assert "add --use_cpu" in r["without_use_cpu"] and "\n" not in r["without_use_cpu"], r["without_use_cpu"]
        assert "sam_hf: sam runs data parallel (2 processes)" in r["log"], r["log"]
        assert r["log"].count("multiplies each rank's training loss by 2") == 1, r["log"]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
