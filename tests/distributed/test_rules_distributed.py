"""The ascent rules on several processes (gloo on CPU): the result does not depend on how many processes computed it.

Trainer cases run in one torchrun launch of tests/helpers/dist_train.py (shared with test_distributed.py: conftest's
`five_step_runs`; 2 processes: data parallel, and role mode
for SAMPa and Asynchronous SAM, where SAMPa's side gradients, BiSAM's q and mSAM's per-micro-batch gradients,
travel from role 1 to role 0) and one of 4 processes (google-research/sam's ascent_group_size against mSAM on the
equivalent partition; SAMPa's micro-batches and BiSAM on a 2 x 2 mesh). Plain loops (SharpnessOptimizer) run
tests/helpers/rules_loop.py on 2 processes. Each is compared with one process on the same global batch, to
tests/distributed/test_distributed.py's tolerance (1e-6: fp32, means over 4 samples averaged against means over 8).
"""

import pytest
import torch

from tests.helpers import processes, rules_loop
from tests.helpers.dist_train import model_kind, train

STEPS = 5

# name: (optim, optim_args, per-device batch on 2 ranks, the 1-process equivalent (optim, optim_args, batch)); a name
# ending in _bn trains a model with BatchNorm (SAM-ON perturbs its affine parameters): in role mode only, where every
# rank sees the whole batch (data parallel BatchNorm normalises each rank's half on its own)
TWO = {
    "sam_vasso_ddp": ("sam", "rho=0.1,rule=vasso", 4, ("sam", "rho=0.1,rule=vasso", 8)),
    "sam_bisam_ddp": ("sam", "rho=0.1,rule=bisam", 4, ("sam", "rho=0.1,rule=bisam", 8)),
    "msam_asam_ddp": ("msam", "rho=0.5,rule=asam,micro_batches=4", 4, ("msam", "rho=0.5,rule=asam,micro_batches=4", 8)),
    "sampa_asam_roles": ("sampa", "rho=0.5,rule=asam", 8, ("sampa", "rho=0.5,rule=asam", 8)),
    "sampa_sam_on_roles_bn": ("sampa", "rho=0.1,rule=sam_on", 8, ("sampa", "rho=0.1,rule=sam_on", 8)),
    "sampa_vasso_roles": ("sampa", "rho=0.1,rule=vasso", 8, ("sampa", "rho=0.1,rule=vasso", 8)),
    "sampa_bisam_roles": ("sampa", "rho=0.1,rule=bisam", 8, ("sampa", "rho=0.1,rule=bisam", 8)),
    "sampa_msam2_roles": ("sampa", "rho=0.1,micro_batches=2", 8, ("sampa", "rho=0.1,micro_batches=2", 8)),
    # data parallel: each rank's held micro-batch is its own half; BiSAM's q averaged as g_t is
    "sampa_msam2_ddp": ("sampa", "rho=0.1,micro_batches=2,parallel=off", 4, ("sampa", "rho=0.1,micro_batches=2", 8)),
    "sampa_bisam_ddp": ("sampa", "rho=0.1,rule=bisam,parallel=off", 4, ("sampa", "rho=0.1,rule=bisam", 8)),
    "asyncsam_vasso_roles": ("asyncsam", "rho=0.1,rule=vasso,ascent_batch_ratio=0.5", 8,
                             ("asyncsam", "rho=0.1,rule=vasso,ascent_batch_ratio=0.5", 8)),
    "asyncsam_tau2_random_roles": ("asyncsam", "rho=0.1,staleness=2,ascent_samples=random,ascent_batch_ratio=0.5", 8,
                                   ("asyncsam", "rho=0.1,staleness=2,ascent_samples=random,ascent_batch_ratio=0.5", 8)),
    "asyncsam_bisam_roles": ("asyncsam", "rho=0.1,rule=bisam,ascent_batch_ratio=0.5", 8,
                             ("asyncsam", "rho=0.1,rule=bisam,ascent_batch_ratio=0.5", 8)),
}
# 4 processes: ranks [0, 1] and [2, 3] share a perturbation, i.e. mSAM with m = 2 over the global batch of 8, whose
# micro-batch j is group j's 4 samples (accelerate deals consecutive per-rank batches); SAMPa on a 2 x 2 mesh (each
# role data parallel over 2 ranks): micro_batches=4 is 2 micro-batches per rank, not averaged over the role's ranks
FOUR = {
    "sam_group2": ("sam", "rho=0.1,ascent_group_size=2", 2, ("msam", "rho=0.1,micro_batches=2", 8)),
    "sampa_msam4_mesh": ("sampa", "rho=0.1,micro_batches=4", 4, ("sampa", "rho=0.1,micro_batches=4", 8)),
    "sampa_bisam_mesh": ("sampa", "rho=0.1,rule=bisam", 4, ("sampa", "rho=0.1,rule=bisam", 8)),
}


# Each rank's held micro-batch gradients are its own: the checkpoint gathers them from every data shard (beside the
# gathered B_t), and every rank resumes with its own. Resumed on the same 2 processes from step 2 by conftest's
# `five_step_runs` (see test_distributed.RESUMED_ON_TWO).
RESUMED_ON_TWO = {"sampa_msam2_ddp_again": ("two", "sampa", "rho=0.1,micro_batches=2,parallel=off", 4, None)}


def launch(worker, nproc, *args, timeout=600):
    """`nproc` processes of the worker module tests.helpers.`worker`."""
    return processes.run(processes.torchrun(nproc, "-m", f"tests.helpers.{worker}", *args), timeout=timeout)


@pytest.fixture
def runs(five_step_runs):
    """NAME -> the folder its multi-process run wrote to (the TWO and FOUR cases: one launch each, shared with
    test_distributed.py in conftest's `five_step_runs`)."""
    return lambda name: five_step_runs / ("two" if name in TWO else "four")


def assert_close(a, b, atol=1e-6):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", list(TWO) + list(FOUR))
def test_processes_equal_one(runs, tmp_path, name):
    optim, optim_args, batch = {**TWO, **FOUR}[name][3]
    _, one = train(str(tmp_path), optim, optim_args, batch=batch, steps=STEPS, batchnorm=name.endswith("_bn"),
                   model=model_kind(name))
    two = torch.load(runs(name) / f"{name}.pt")
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"RULES {name}: max |diff| = {diff:.3g}")
    assert_close(one, two)
    assert_close(torch.load(runs(name) / f"{name}.rank0.pt"), torch.load(runs(name) / f"{name}.rank1.pt"),
                 atol=0)  # replicas
    if "_roles" in name or "_mesh" in name:  # the two passes really ran on two ranks
        assert any("sam/exchange_seconds" in h for h in torch.load(runs(name) / f"{name}.log"))


def test_ascent_groups_differ_from_global_sam(runs, tmp_path):
    """The 4-process group case is not plain SAM: the per-group perturbation matters at this scale."""
    _, sam = train(str(tmp_path), "sam", "rho=0.1", batch=8, steps=STEPS)
    group = torch.load(runs("sam_group2") / "sam_group2.pt")
    assert max(float((sam[k] - group[k]).abs().max()) for k in sam) > 1e-4


def test_plain_loops_on_two_processes_equal_one(tmp_path):
    proc = launch("rules_loop", 2, str(tmp_path), *rules_loop.CASES)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for name, case in rules_loop.CASES.items():
        one, two = rules_loop.train(*case), torch.load(tmp_path / f"{name}.pt")
        print(f"RULES loop {name}: max |diff| = {max(float((one[k] - two[k]).abs().max()) for k in one):.3g}")
        assert_close(one, two, atol=1e-12 if name.endswith("_fp64") else 1e-6)
        if name.endswith("_fp64"):
            assert all(v.dtype == torch.float64 for v in two.values())


@pytest.mark.parametrize("layout,optim_args,message", [
    ("ddp", "rho=0.1,ascent_group_size=3", "does not divide the 2 processes"),
    ("one", "rho=0.1,ascent_group_size=2", "does not divide the 1 process"),
    ("ddp", "rho=0.1,rule=vasso,sync_ascent=false", "rule=vasso with sync_ascent=false"),
    ("ddp", "rho=0.1,rule=vasso,ascent_group_size=1", "moving average would differ"),
    ("fsdp2", "rho=0.1,ascent_group_size=1", "every backward pass averages"),
], ids=["not-a-divisor", "one-process", "vasso-per-rank", "vasso-groups", "fsdp2"])
def test_impossible_groups_are_refused(layout, optim_args, message):
    from sam_hf import SharpnessConfig, SharpnessConfigError
    from sam_hf.distributed.layouts import FSDP2, DataParallel, Layout
    from sam_hf.distributed.plan import ParallelPlan
    from sam_hf.methods import SAM

    plan = ParallelPlan(mode="data", world_size=2)
    made = {"ddp": DataParallel(plan), "one": Layout(), "fsdp2": FSDP2(plan)}[layout]
    with pytest.raises(SharpnessConfigError, match=message):
        SAM.check(SharpnessConfig.from_optim_args("sam", optim_args), made)


def test_sampa_micro_batches_data_parallel_resume_equals_uninterrupted(five_step_runs):
    """SAMPa with micro_batches=2 in data parallel, resumed on its 2 processes from its checkpoint at step 2: bit for
    bit the run that never stopped (RESUMED_ON_TWO above)."""
    checkpoint = five_step_runs / "two" / "sampa_msam2_ddp" / "run" / "checkpoint-2"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["sam_hf"]
    assert len(state["a_parts"]) == 2 and all(len(a) == 1 for a in state["a_parts"])  # one micro-batch per rank
    assert_close(torch.load(five_step_runs / "two" / "sampa_msam2_ddp.pt"),
                 torch.load(five_step_runs / "resumed" / "sampa_msam2_ddp_again.pt"), atol=0)
