"""The plain-PyTorch API: `SharpnessOptimizer(base, "sam", ...).step(closure)` is the method SharpnessTrainer runs.

A plain loop on the same batches equals SharpnessTrainer (same base optimizer, clipping, constant schedule);
PyTorch's own closures run the methods that do not cut the batch; resume from `state_dict()` equals never
stopping; 2 processes (data parallel or role mode) equal 1; a Lightning module trains with it unchanged.
"""

import pytest
import torch

import sam_hf
from tests.helpers import plain_loop, processes
from tests.helpers.tiny import METHOD_CASES, MeanLossModel, args, vector_data, weights

CASES = {**METHOD_CASES, "sam_interval": ("sam", "rho=0.1,interval=2")}
# AdamW on 4 steps: Trainer's and the loop's arithmetic are the same ops on the same tensors; round-off only
ATOL = 1e-6


def trainer_weights(tmp_path, optim, optim_args):
    model = MeanLossModel()
    trainer = sam_hf.SharpnessTrainer(model=model, train_dataset=vector_data(n=plain_loop.GLOBAL_BATCH * plain_loop.STEPS),
                                      args=args(tmp_path, optim, optim_args, max_steps=plain_loop.STEPS,
                                                per_device_train_batch_size=plain_loop.GLOBAL_BATCH,
                                                train_sampling_strategy="sequential", max_grad_norm=1.0))
    trainer.train()
    return weights(model)


@pytest.mark.parametrize("case", CASES)
def test_a_plain_loop_equals_sharpness_trainer(tmp_path, case):
    optim, optim_args = CASES[case]
    plain = plain_loop.train(optim, optim_args)
    trained = trainer_weights(tmp_path, optim, optim_args)
    start = MeanLossModel().state_dict()
    for k in plain:
        torch.testing.assert_close(plain[k], trained[k], atol=ATOL, rtol=0)
        assert not torch.equal(plain[k], start[k])  # it trained


@pytest.mark.parametrize("case", ["sam", "asam", "sampa"])
def test_pytorch_closures_run_the_methods_that_do_not_cut_the_batch(case):
    optim, optim_args = CASES[case]
    for k, v in plain_loop.train(optim, optim_args, closure="plain").items():
        torch.testing.assert_close(v, plain_loop.train(optim, optim_args)[k], atol=0, rtol=0)


@pytest.mark.parametrize("case", ["msam", "asyncsam"])
def test_methods_that_cut_the_batch_ask_for_a_batch_closure(case):
    with pytest.raises(TypeError, match="sam_hf.BatchClosure"):
        plain_loop.train(*CASES[case], closure="plain")


@pytest.mark.parametrize("case", ["sampa", "asyncsam", "sam_interval"])
def test_resume_from_state_dict_equals_never_stopping(case):
    """SAMPa's g_t and held batch, Asynchronous SAM's a_(t-1) and the schedule's step count travel in
    state_dict(); SAMPa's held batch gets the next closure's loss_fn."""
    optim, optim_args = CASES[case]
    full, saved = plain_loop.train(optim, optim_args, save_at=2)
    resumed = plain_loop.train(optim, optim_args, resume_from=saved)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=0, rtol=0)


def test_keys_and_values_are_checked_as_optim_args_are():
    base = torch.optim.AdamW(MeanLossModel().parameters())
    with pytest.raises(sam_hf.SharpnessConfigError, match="lam=0.2 applies to sampa only"):
        sam_hf.SharpnessOptimizer(base, "sam", rho=0.05, lam=0.2)
    with pytest.raises(sam_hf.SharpnessConfigError, match="rho must be > 0"):
        sam_hf.SharpnessOptimizer(base, "sampa", "rho=-1")
    with pytest.raises(sam_hf.SharpnessConfigError, match="the base optimizer is the one you pass"):
        sam_hf.SharpnessOptimizer(base, "sam", "base=sgd,momentum=0.9")
    with pytest.raises(sam_hf.SharpnessConfigError, match="unknown key momentum"):
        sam_hf.SharpnessOptimizer(base, "sam", momentum=0.9)
    with pytest.raises(sam_hf.SharpnessConfigError, match="rho='big!' is not a number"):
        sam_hf.SharpnessOptimizer(base, "sam", rho="big!")
    with pytest.raises(sam_hf.SharpnessConfigError, match=r"rho=\[0.1\] is not a float"):
        sam_hf.SharpnessOptimizer(base, "sam", rho=[0.1])


@pytest.mark.slow  # a torchrun launch
def test_two_processes_equal_one(tmp_path):
    """Data parallel (SAM, mSAM, SAMPa parallel=off) and role mode (SAMPa, Asynchronous SAM): one torchrun launch,
    every rank starting from its own model (the optimizer gives them rank 0's), each case against 1 process."""
    proc = processes.run(processes.torchrun(2, "-m", "tests.helpers.plain_loop", tmp_path, *plain_loop.CASES),
                         timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, (optim, optim_args) in plain_loop.CASES.items():
        one = plain_loop.train(optim, optim_args)
        two = torch.load(tmp_path / f"{name}.pt")
        for k in one:  # a mean over 8 samples against two means over 4, averaged: round-off
            torch.testing.assert_close(two[k], one[k], atol=ATOL, rtol=0, msg=lambda m, k=k, n=name: f"{n} {k}: {m}")


def test_a_lightning_module_trains_with_it_unchanged():
    """Lightning's automatic optimization calls optimizer.step(closure=...) with its own closure (training_step
    and backward): SAM and SAMPa then equal the plain loop on the same batches."""
    lightning = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader

    rows = vector_data(n=plain_loop.GLOBAL_BATCH * plain_loop.STEPS).with_format("torch")

    class Module(lightning.LightningModule):
        def __init__(self, optim, optim_args):
            super().__init__()
            self.model = MeanLossModel()
            self.optim, self.optim_args = optim, optim_args

        def training_step(self, batch, batch_idx):
            return self.model(batch["x"], batch["labels"])["loss"]

        def configure_optimizers(self):
            base = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.0)
            return sam_hf.SharpnessOptimizer(base, self.optim, self.optim_args, model=self.model, max_grad_norm=1.0)

    for case in ("sam", "sampa"):
        optim, optim_args = CASES[case]
        module = Module(optim, optim_args)
        trainer = lightning.Trainer(max_steps=plain_loop.STEPS, accelerator="cpu", logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, DataLoader(rows, batch_size=plain_loop.GLOBAL_BATCH, shuffle=False))
        want = plain_loop.train(optim, optim_args, closure="plain")
        for k, v in module.model.state_dict().items():
            torch.testing.assert_close(v, want[k], atol=ATOL, rtol=0, msg=lambda m, k=k, c=case: f"{c} {k}: {m}")
