"""Heterogeneous Asynchronous SAM (ascent_device=cpu): which rank goes where, and what is refused before training.

The 2-process runs are in test_distributed.py (parity, re-sync, divergence) and test_launch.py (the launcher
placing rank 1 under `accelerate launch`). Here: the placement rules and the device check, without processes.
"""

import os
import re

import pytest

import sam_hf
from sam_hf import SharpnessConfigError, launch
from sam_hf.config import SharpnessConfig
from sam_hf.distributed.placement import place_ascent_rank, place_from_argv
from sam_hf.distributed.plan import check_devices
from tests.helpers.tiny import MeanLossModel, args, vector_data

CPU_ASCENT = "rho=0.05,ascent_device=cpu"


@pytest.mark.parametrize("rank,cpu", [("0", False), ("1", True)])
def test_only_the_ascent_rank_goes_to_the_cpu(rank, cpu):
    env = {"WORLD_SIZE": "2", "RANK": rank}
    assert place_ascent_rank("asyncsam", CPU_ASCENT, "gloo", env)
    assert (env.get("ACCELERATE_USE_CPU") == "true") is cpu


@pytest.mark.parametrize("backend", [None, "nccl"])
def test_placement_without_gloo_is_refused_rather_than_hanging(backend):
    # the GPU rank would start NCCL and the CPU rank gloo: neither could reach the other
    env = {"WORLD_SIZE": "2", "RANK": "1"}
    with pytest.raises(SharpnessConfigError, match="ascent_device=cpu needs --ddp_backend gloo"):
        place_ascent_rank("asyncsam", CPU_ASCENT, backend, env)
    assert "ACCELERATE_USE_CPU" not in env


@pytest.mark.parametrize("optim,optim_args,world", [
    ("asyncsam", "rho=0.05", "2"),  # ascent_device=auto
    ("adamw_torch", None, "2"),
    ("sampa", "rho=0.05", "1"),
])
def test_other_runs_are_left_alone(optim, optim_args, world):
    env = {"WORLD_SIZE": world, "RANK": "1"}
    place_ascent_rank(optim, optim_args, "gloo", env)
    assert "ACCELERATE_USE_CPU" not in env


def test_launcher_adds_gloo_and_refuses_nccl():
    env = {"WORLD_SIZE": "2", "RANK": "1"}
    argv = ["--optim", "asyncsam", f"--optim_args={CPU_ASCENT}", "--output_dir", "x"]
    assert place_from_argv(argv, env) == [*argv, "--ddp_backend", "gloo"]
    assert env["ACCELERATE_USE_CPU"] == "true"
    dashed = ["--optim", "asyncsam", "--optim-args", CPU_ASCENT]  # HfArgumentParser's other spelling
    rank0 = {"WORLD_SIZE": "2", "RANK": "0"}
    assert place_from_argv(dashed, dict(rank0)) == [*dashed, "--ddp_backend", "gloo"]
    assert place_from_argv([*argv, "--ddp_backend", "gloo"], dict(rank0)) == [*argv, "--ddp_backend", "gloo"]
    with pytest.raises(SharpnessConfigError, match="ascent_device=cpu needs --ddp_backend gloo.*got --ddp_backend nccl"):
        place_from_argv([*argv, "--ddp_backend=nccl"], {"WORLD_SIZE": "2", "RANK": "0"})
    plain = ["--optim", "sampa", "--optim_args", "rho=0.1"]
    assert place_from_argv(plain, env) == plain


@pytest.mark.parametrize("world,message", [(None, "needs 2 processes.*this run has 1"), ("1", "this run has 1"),
                                           ("4", "needs exactly 2 processes.*got 4")])
def test_cpu_ascent_on_another_world_size_is_refused_by_the_launcher(tmp_path, capsys, monkeypatch, world, message):
    """One process: the launcher used to add --ddp_backend gloo, and transformers then failed inside the script with
    torch's "Default process group has not been initialized"; sam_hf's own refusal comes before the script starts."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('the script must not start')\n")
    rc = launch.main([str(script), "--optim", "asyncsam", "--optim_args", CPU_ASCENT, "--output_dir", "x"])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SharpnessConfigError, match=message):  # a script placing the rank itself hears the same
        place_ascent_rank("asyncsam", CPU_ASCENT, "gloo", dict(os.environ))
    assert "ACCELERATE_USE_CPU" not in os.environ


def test_launcher_reports_a_bad_combination_before_running(tmp_path, capsys):
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('the script must not start')\n")
    rc = launch.main([str(script), "--optim", "asyncsam", "--optim_args", CPU_ASCENT, "--ddp_backend", "nccl"])
    assert rc == 2
    assert "needs --ddp_backend gloo" in capsys.readouterr().err


def test_one_process_refuses_a_cpu_ascent_rank(tmp_path):
    with pytest.raises(SharpnessConfigError, match="ascent_device=cpu needs 2 processes"):
        sam_hf.SharpnessTrainer(model=MeanLossModel(), args=args(tmp_path, "asyncsam", CPU_ASCENT),
                                train_dataset=vector_data())


@pytest.mark.parametrize("how", ["flag", "accelerate-config"])
def test_fp16_with_a_cpu_ascent_rank_is_refused(tmp_path, monkeypatch, how):
    if how == "flag":
        targs = args(tmp_path, "asyncsam", CPU_ASCENT, fp16=True)
    else:  # `accelerate launch --mixed_precision fp16` reaches TrainingArguments through the environment
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        targs = args(tmp_path, "asyncsam", CPU_ASCENT)
    with pytest.raises(SharpnessConfigError, match="ascent_device=cpu with fp16 mixed precision.*--bf16"):
        sam_hf.SharpnessTrainer(model=MeanLossModel(), args=targs, train_dataset=vector_data())


def _cfg(optim_args):
    return SharpnessConfig.from_optim_args("asyncsam", optim_args)


@pytest.mark.parametrize("optim_args,kinds,backend,message", [
    ("rho=0.05", ["cuda", "cpu"], "gloo", "different device kinds"),
    (CPU_ASCENT, ["cuda", "cuda"], "gloo", "rank 1 \\(the ascent rank\\) runs on cuda.*sam-hf launch"),
    (CPU_ASCENT, ["cuda", "cpu"], "nccl", "needs --ddp_backend gloo"),
    (CPU_ASCENT, ["cuda", "cpu", "cpu"], "gloo", "exactly 2 processes"),
], ids=["mixed-without-cpu-ascent", "ascent-rank-on-gpu", "nccl", "three-ranks"])
def test_impossible_device_layouts_are_refused(optim_args, kinds, backend, message):
    with pytest.raises(SharpnessConfigError, match=message):
        check_devices(kinds, backend, _cfg(optim_args).cpu_rank)


@pytest.mark.parametrize("kinds", [["cuda", "cpu"], ["cpu", "cpu"]])
def test_a_cpu_ascent_rank_is_accepted(kinds):
    # ascent_device=cpu always uses the tolerant check and re-sync, so a CPU-only run exercises that path too
    assert check_devices(kinds, "gloo", _cfg(CPU_ASCENT).cpu_rank) is True
    assert check_devices(["cuda", "cuda"], "nccl", _cfg("rho=0.05").cpu_rank) is False
