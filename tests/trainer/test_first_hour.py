"""What a new user sees in the first hour: which layout a run chose, warnings said once, figures explained."""

import contextlib
import io
import logging
from types import SimpleNamespace

import pytest
import torch

import sam_hf
from sam_hf import registry
from sam_hf.distributed import plan as parallel
from sam_hf.distributed.layouts import make_layout
from sam_hf.config import SharpnessConfig
from sam_hf.trainer import loss_factor_note
from tests.helpers.tiny import MeanLossModel, args, vector_data


@contextlib.contextmanager
def sam_hf_log(level=logging.INFO):
    """Everything the `sam_hf` loggers write at `level` or above (and transformers' verbosity put back after)."""
    from transformers.utils import logging as hf_logging

    logger, stream, before = logging.getLogger("sam_hf"), io.StringIO(), hf_logging.get_verbosity()
    handler = logging.StreamHandler(stream)
    handler.setLevel(level)
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(before)


def test_a_one_process_run_says_which_layout_it_runs(tmp_path, monkeypatch):
    for var in ("MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with sam_hf_log() as log:
        sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=vector_data(),
                                args=args(tmp_path, "sampa", "rho=0.1", log_level="info"))
    assert "sam_hf: sampa runs one process" in log.getvalue()
    assert "accelerate launch was asked for several" not in log.getvalue()


def test_accelerate_launch_without_multi_gpu_is_pointed_at_it(tmp_path, monkeypatch):
    """`accelerate launch --num_processes 2` without --multi_gpu runs one process (its simple launcher sets
    MASTER_ADDR and MASTER_PORT, no WORLD_SIZE): the one-process run says so, and what to add."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for var, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "ACCELERATE_USE_CPU": "False",
                       "ACCELERATE_MIXED_PRECISION": "no"}.items():
        monkeypatch.setenv(var, value)
    with sam_hf_log(logging.WARNING) as log:
        sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=vector_data(), args=args(tmp_path, "sam"))
    assert "this run has 1 process" in log.getvalue() and "add --multi_gpu" in log.getvalue()


class _ThreeRanks:
    """torch.distributed as rank `rank` of 3 CPU processes over gloo sees it, for make_plan (no process group)."""

    def __init__(self, monkeypatch, rank):
        d = parallel.dist
        for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                            "get_world_size": lambda group=None: 3, "get_rank": lambda group=None: rank,
                            "get_backend": lambda group=None: "gloo"}.items():
            monkeypatch.setattr(d, name, value)

        def all_gather_object(out, obj, group=None):
            out[:] = [obj] * len(out)

        monkeypatch.setattr(d, "all_gather_object", all_gather_object)
        monkeypatch.setattr(d.distributed_c10d, "_set_pg_timeout", lambda timeout: None, raising=False)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_sampa_on_an_odd_world_size_warns_once(monkeypatch, rank):
    """SAMPa on 3 processes runs data parallel: said by rank 0 only, not once per rank."""
    _ThreeRanks(monkeypatch, rank)
    with sam_hf_log(logging.WARNING) as log:
        cfg = SharpnessConfig.from_optim_args("sampa", "rho=0.1")
        plan = make_layout(cfg, registry.get("sampa").method, torch.device("cpu"), 60.0).plan
    assert plan.mode == "data" and plan.world_size == 3
    assert ("runs data parallel" in log.getvalue()) == (rank == 0), log.getvalue()


def test_parallel_on_an_odd_world_size_fails_before_training(monkeypatch):
    """parallel=on splits the ranks into two roles: on 3 processes it is refused, saying what works."""
    _ThreeRanks(monkeypatch, 0)
    cfg = SharpnessConfig.from_optim_args("sampa", "parallel=on")
    with pytest.raises(sam_hf.SharpnessConfigError, match=r"world size is 3 \(odd\); use 2 or 4 processes, or "
                                                          "parallel=off"):
        make_layout(cfg, registry.get("sampa").method, torch.device("cpu"), 60.0)


def test_the_loss_factor_on_several_processes_is_stated_once():
    args_ = SimpleNamespace(average_tokens_across_devices=True)
    data = parallel.ParallelPlan(mode="data", world_size=2, dp_size=1)
    roles = parallel.ParallelPlan(mode="roles", world_size=4, dp_size=2)
    note = loss_factor_note(args_, data, True)
    assert "2 processes" in note and "multiplies each rank's training loss by 2" in note
    assert "eval_loss" in note and "Where transformers itself surprises" in note
    assert "multiplies each rank's training loss by 2 " in loss_factor_note(args_, roles, True)  # k, not 2k
    assert loss_factor_note(args_, parallel.ParallelPlan(mode="roles", world_size=2, dp_size=1), True) is None
    assert loss_factor_note(args_, parallel.ParallelPlan(), True) is None  # one process: no factor
    assert loss_factor_note(args_, data, False) is None  # a loss that takes no count: transformers multiplies nothing
    assert loss_factor_note(SimpleNamespace(average_tokens_across_devices=False), data, True) is None
