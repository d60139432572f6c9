"""TRL's SFTTrainer on 2 processes (gloo): the same rules as for Trainer. A TRL script that never imports sam_hf
(tests/helpers/trl_sft.py) runs under torchrun and under accelerate launch through `-m sam_hf.launch`:

* role mode (SAMPa, Asynchronous SAM) equals 1 process with the same per-device batch: weights, the logged loss,
  and TRL's own per-pass metrics (num_tokens, entropy, mean_token_accuracy), each sample counted once;
* data parallel (SAM, mSAM) equals 1 process accumulating the same micro-batches (transformers' DDP rule):
  weights, loss and num_tokens.

TRL gathers its metrics over the ranks on every pass; sam_hf's two roles run different passes, so the gathers go
over a role's own ranks and the counting role's metrics are handed to the others (no deadlock, no double count).
"""

import pytest
import torch

pytest.importorskip("trl")

import sam_hf  # noqa: E402,F401  (the 1-process runs get the methods through the Trainer patch)
from tests.helpers import processes  # noqa: E402
from tests.helpers.trl_sft import train  # noqa: E402

# run by path through the launcher: the script is a user's, outside any package
SCRIPT = processes.ROOT / "tests" / "helpers" / "trl_sft.py"
TOOL = processes.tool

# name: (optim, optim_args, per-device batch on 2 ranks, accumulation of the 1-process equivalent)
CASES = {
    "sam": ("sam", "rho=0.1", 4, 2),
    "msam": ("msam", "rho=0.1,micro_batches=4", 4, 2),
    "sampa": ("sampa", "rho=0.1,lam=0.2", 8, 1),
    "asyncsam": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 8, 1),
}
ROLE_METRICS = ("loss", "num_tokens", "entropy", "mean_token_accuracy")


def launcher(kind):
    if kind == "torchrun":
        return [TOOL("torchrun"), "--standalone", "--nproc_per_node", "2"]
    return [TOOL("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def run_two(out, kind, names):
    cases = [f"{n}:{CASES[n][0]}:{CASES[n][1]}:{CASES[n][2]}:1" for n in names]
    cmd = [*launcher(kind), "-m", "sam_hf.launch", str(SCRIPT), "--out_dir", str(out), "--cases", *cases]
    proc = processes.run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    return run_two(tmp_path_factory.mktemp("trl_torchrun"), "torchrun", list(CASES))


def check(out, tmp_path, name):
    optim, optim_args, batch, ga = CASES[name]
    trainer, one = train(tmp_path, optim, optim_args, batch=batch, ga=ga)
    two = torch.load(out / f"{name}.pt")
    for k in one:
        # 2e-5: GPT-2's key bias has an identically zero gradient, whose round-off AdamW normalises into steps of
        # order lr (see test_exactness.ATOL); every other weight agrees to ~1e-7
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=0, msg=lambda m, k=k: f"{name}: {k}: {m}")
    logs_one = [h for h in trainer.state.log_history if "loss" in h]
    logs_two = [h for h in torch.load(out / f"{name}.log") if "loss" in h]
    keys = ROLE_METRICS if optim in ("sampa", "asyncsam") else ("loss", "num_tokens")
    for key in keys:
        assert [h[key] for h in logs_two] == pytest.approx([h[key] for h in logs_one], rel=1e-5), key


@pytest.mark.parametrize("name", list(CASES))
def test_sft_on_two_processes_equals_one(torchrun_runs, tmp_path, name):
    check(torchrun_runs, tmp_path, name)


def test_sft_under_accelerate_launch(tmp_path):
    out = run_two(tmp_path / "acc", "accelerate", ["sampa"])
    check(out, tmp_path / "one", "sampa")


def test_other_trl_trainers_are_refused_on_several_processes():
    """DPOTrainer & co. keep their own loss and metric collectives: refused by name before training."""
    from sam_hf import SharpnessConfigError, SharpnessMixin
    from sam_hf.distributed.layouts import DataParallel
    from sam_hf.distributed.plan import ParallelPlan

    class DPOTrainer:  # stands in for trl's: only its module and name matter to the check
        __module__ = "trl.trainer.dpo_trainer"

    class Probe(SharpnessMixin, DPOTrainer):
        pass

    with pytest.raises(SharpnessConfigError, match="DPOTrainer runs in one process only.*SFTTrainer"):
        Probe.__new__(Probe)._check_world(sam_hf.SharpnessConfig.create("sam"),
                                          DataParallel(ParallelPlan(mode="data", world_size=2)))
