"""Gradient accumulation: B_t is the whole accumulated batch (DESIGN.md).

Every method with per_device_train_batch_size=4, gradient_accumulation_steps=2
takes the same steps as with batch 8 and no accumulation, to round-off; the
loss normalisation follows Trainer's own rules (MeanLossModel has no **kwargs,
so Trainer divides its loss by the accumulation steps; BERT's forward takes
**kwargs, so Trainer does not, and sam_hf follows it there too).
"""

import pytest
import torch
from transformers import Trainer

import sam_hf
from tests.helpers.tiny import (METHOD_CASES, MeanLossModel, args, assert_same_weights, text_data, tiny_bert, vector_data,
                                weights)

CASES = {k: METHOD_CASES[k] for k in ('sam', 'msam', 'sampa', 'asyncsam_r1', 'asyncsam')}
STEPS = 6  # 32 samples / 8 = 4 steps per epoch: the run crosses an epoch boundary (SAMPa holds a batch across it)
TOL = 1e-6


class RecordingModel(MeanLossModel):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def forward(self, x, labels=None):
        self.seen.append(x.detach().clone())
        return super().forward(x, labels)


def run(tmp_path, optim, optim_args, batch, ga, model=None, data=None, cls=sam_hf.SharpnessTrainer, **kw):
    model = MeanLossModel() if model is None else model
    trainer = cls(model=model, args=args(tmp_path, optim, optim_args, per_device_train_batch_size=batch,
                                         gradient_accumulation_steps=ga, **{"max_steps": STEPS, **kw}),
                  train_dataset=vector_data() if data is None else data)
    trainer.train()
    return weights(model), trainer


def test_data_order_is_the_same(tmp_path):
    """Batch 8 is exactly two consecutive batches of 4 (same seeded RandomSampler permutation), across epochs."""
    seen = []
    for batch, ga in [(8, 1), (4, 2)]:
        model = RecordingModel()
        run(tmp_path, "adamw_torch", None, batch, ga, model=model, cls=Trainer)
        assert all(len(x) == batch for x in model.seen)
        seen.append(torch.cat(model.seen))
    assert len(seen[0]) == STEPS * 8
    assert torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("case", list(CASES))
def test_accumulation_equals_big_batch(tmp_path, case):
    optim, optim_args = CASES[case]
    big, _ = run(tmp_path, optim, optim_args, batch=8, ga=1)
    acc, trainer = run(tmp_path, optim, optim_args, batch=4, ga=2)
    start = weights(MeanLossModel())
    assert any(not torch.equal(start[k], big[k]) for k in big), "training did not move the weights"
    assert_same_weights(big, acc, atol=TOL, rtol=0)
    assert trainer.state.global_step == STEPS


def test_accumulation_perturbs_with_the_whole_batch(tmp_path):
    """Negative control: perturbing per micro-batch (mSAM with m = 2 on batch 8) is measurably different,
    so the tolerance above would catch SAM that perturbs each accumulation micro-batch on its own."""
    sam_acc, _ = run(tmp_path, "sam", "rho=0.1", batch=4, ga=2)
    per_micro, _ = run(tmp_path, "msam", "rho=0.1,micro_batches=2", batch=8, ga=1)
    diff = max((sam_acc[k] - per_micro[k]).abs().max().item() for k in sam_acc)
    assert diff > 100 * TOL


@pytest.mark.parametrize("case", ["sam", "sampa"])
def test_accumulation_logged_loss_matches_big_batch(tmp_path, case):
    """The logged `loss` (Trainer's sum over the cycle of loss / accumulation steps) is the batch-8 loss."""
    optim, optim_args = CASES[case]
    _, big = run(tmp_path, optim, optim_args, batch=8, ga=1)
    _, acc = run(tmp_path, optim, optim_args, batch=4, ga=2)
    big_losses = [h["loss"] for h in big.state.log_history if "loss" in h]
    acc_losses = [h["loss"] for h in acc.state.log_history if "loss" in h]
    assert len(big_losses) == len(acc_losses) == STEPS
    assert acc_losses == pytest.approx(big_losses, rel=1e-5)


def _bert_run(tmp_path, cls, optim, optim_args=None, batch=4, ga=2, **kw):
    model = tiny_bert()
    trainer = cls(model=model, args=args(tmp_path, optim, optim_args, per_device_train_batch_size=batch,
                                         gradient_accumulation_steps=ga, max_grad_norm=0.0, **{"max_steps": 1, **kw}),
                  train_dataset=text_data())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return weights(model), losses, trainer


def test_bert_follows_trainer_loss_scale(tmp_path):
    """tiny BERT's forward takes **kwargs, so Trainer (transformers 5.x) does not divide its loss by the
    accumulation steps. sam_hf reports and steps on the same scale as Trainer, whatever that scale is."""
    assert Trainer(model=tiny_bert(), args=args(tmp_path), train_dataset=text_data()).model_accepts_loss_kwargs
    plain_w, plain_loss, _ = _bert_run(tmp_path, Trainer, "adamw_torch")
    same_w, same_loss, _ = _bert_run(tmp_path, sam_hf.SharpnessTrainer, "adamw_torch")
    assert_same_weights(plain_w, same_w)  # SharpnessTrainer with a plain optimizer is Trainer
    assert same_loss == plain_loss
    # SAM's first step reports the clean loss at x_0 on the same data: Trainer's first logged loss.
    _, sam_loss, _ = _bert_run(tmp_path, sam_hf.SharpnessTrainer, "sam", "rho=0.05")
    assert sam_loss == pytest.approx(plain_loss, rel=1e-6)

    # The gradient scale too. With plain SGD one step moves x by lr * grad; Trainer's own ratio between the
    # accumulated and the big-batch step (k = 2 while Trainer skips the division, 1 if it ever divides) is SAM's.
    start = weights(tiny_bert())
    sgd = dict(lr_scheduler_type="constant", learning_rate=0.1)

    def delta(cls, optim, optim_args, batch, ga):
        w, _, _ = _bert_run(tmp_path, cls, optim, optim_args, batch=batch, ga=ga, **sgd)
        return torch.cat([(w[k] - start[k]).flatten() for k in start])

    k_trainer = delta(Trainer, "sgd", None, 4, 2).norm() / delta(Trainer, "sgd", None, 8, 1).norm()
    d_acc = delta(sam_hf.SharpnessTrainer, "sam", "rho=0.05,base=sgd", 4, 2)
    d_big = delta(sam_hf.SharpnessTrainer, "sam", "rho=0.05,base=sgd", 8, 1)
    torch.testing.assert_close(d_acc, k_trainer * d_big, atol=1e-6, rtol=1e-4)


# SAMPa's held B_t keeps the accumulation count of the cycle it came from (the short last cycle of an epoch
# differs from the next one).


@pytest.mark.parametrize("case", ["sam", "msam", "sampa", "asyncsam"])
def test_short_last_cycle_of_an_epoch(tmp_path, case):
    """36 samples: batch 8 gives steps of 8,8,8,8,4; batch 4 x 2 gives (4,4) x 4 and a last cycle of one
    micro-batch (Trainer syncs at the epoch end). Both see the same samples per step, so the same weights."""
    optim, optim_args = CASES[case]
    data = vector_data(n=36)
    big, t_big = run(tmp_path, optim, optim_args, batch=8, ga=1, data=data, max_steps=-1, num_train_epochs=2)
    acc, t_acc = run(tmp_path, optim, optim_args, batch=4, ga=2, data=data, max_steps=-1, num_train_epochs=2)
    assert t_big.state.global_step == t_acc.state.global_step == 10
    assert_same_weights(big, acc, atol=TOL, rtol=0)
