"""SAM on a schedule (`interval`, `start`, `stop` for sam and msam): outside the active steps the step is exactly
the base optimizer's own one-pass step.

Identities: start=1 is bitwise `--optim <base>`; interval=1,start=0,stop=1 is bitwise the plain method. An
alternating schedule equals the reference (tests/helpers/reference.py) stepping SAM and its base optimizer in turn, and
resuming from a checkpoint taken before the switch equals never stopping.
"""

import copy

import pytest
import torch

import sam_hf
from tests.helpers.reference import Base, Reference
from tests.helpers.parity import ListDataset, TinyNet, stack, vector_rows
from tests.helpers.resume import assert_bitwise, interrupted_and_resumed, uninterrupted
from tests.helpers.tiny import MeanLossModel, args, vector_data, weights

STEPS = 4


def train(tmp_path, optim, optim_args, **kw):
    model = MeanLossModel()
    kw = {"max_steps": STEPS, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 4, **kw}
    trainer = sam_hf.SharpnessTrainer(model=model, args=args(tmp_path / optim, optim, optim_args, **kw),
                                      train_dataset=vector_data())
    trainer.train()
    return weights(model), [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("method,extra", [("sam", ""), ("msam", ",micro_batches=3")])
def test_start_at_the_end_is_the_base_optimizer(tmp_path, method, extra):
    base, base_logs = train(tmp_path, "adamw_torch", None)
    scheduled, logs = train(tmp_path, method, f"rho=0.5,start=1{extra}")
    assert_bitwise(scheduled, base)
    assert [h["sam/active"] for h in logs] == [0.0] * STEPS
    assert [h["loss"] for h in logs] == [h["loss"] for h in base_logs]


@pytest.mark.parametrize("method,extra", [("sam", ""), ("msam", ",micro_batches=3")])
def test_the_whole_run_is_the_plain_method(tmp_path, method, extra):
    plain, _ = train(tmp_path / "plain", method, f"rho=0.5{extra}")
    scheduled, logs = train(tmp_path / "scheduled", method, f"rho=0.5,interval=1,start=0,stop=1{extra}")
    assert_bitwise(scheduled, plain)
    assert [h["sam/active"] for h in logs] == [1.0] * STEPS


@pytest.mark.parametrize("optim_args,active", [
    ("interval=2", [1, 0, 1, 0, 1, 0]),
    ("interval=3", [1, 0, 0, 1, 0, 0]),
    ("start=0.5", [0, 0, 0, 1, 1, 1]),
    ("stop=0.5", [1, 1, 1, 0, 0, 0]),
    ("start=0.34,stop=0.9,interval=2", [0, 0, 0, 1, 0, 1]),  # steps 3..5 (0-based) of 6; 2.04 rounds up to 3
])
def test_schedule_matches_the_reference(tmp_path, optim_args, active):
    """The reference steps SAM where the schedule says and AdamW's own step elsewhere, on the same batches."""
    steps = len(active)
    rows = vector_rows(7 * steps)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    targs = args(tmp_path, "sam", f"rho=0.3,{optim_args}", max_steps=steps, per_device_train_batch_size=7,
                 learning_rate=0.02, weight_decay=0.1, train_sampling_strategy="sequential", max_grad_norm=0.0,
                 remove_unused_columns=False)
    trainer = sam_hf.SharpnessTrainer(model=model, args=targs, train_dataset=ListDataset(rows))
    trainer.train()
    assert [h["sam/active"] for h in trainer.state.log_history if "loss" in h] == active

    ref = Reference(ref_model, Base("adamw", lr=0.02, weight_decay=0.1), rho=0.3)
    batches = [stack(rows[t * 7:(t + 1) * 7]) for t in range(steps)]
    for batch, on in zip(batches, active):
        (ref.step_sam if on else ref.step_plain)(batch)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref_model.state_dict()[k], rtol=0, atol=1e-5)


def test_logged_share_of_active_steps(tmp_path):
    _, logs = train(tmp_path, "sam", "rho=0.1,interval=4", max_steps=8, logging_steps=4)
    assert [h["sam/active"] for h in logs] == [0.25, 0.25]


@pytest.mark.parametrize("optim_args", ["rho=0.1,start=0.5", "rho=0.1,stop=0.5", "rho=0.1,micro_batches=2,interval=2"])
def test_resume_across_the_switch_is_exact(tmp_path, optim_args):
    """Checkpoint at step 3 of 6, the switch at step 3: the resumed run equals the uninterrupted one bitwise."""
    optim = "msam" if "micro_batches" in optim_args else "sam"
    data = vector_data()
    resumed, _, _ = interrupted_and_resumed(tmp_path, optim, optim_args, lambda seed=0: MeanLossModel(seed=seed), data)
    assert_bitwise(resumed, uninterrupted(tmp_path, optim, optim_args, lambda seed=0: MeanLossModel(seed=seed), data))
