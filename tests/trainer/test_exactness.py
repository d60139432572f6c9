"""With rho -> 0 every method is its base optimizer, on every path a user takes (DESIGN.md, "Units").

rho = 1e-12 moves no float32 weight (far below one ulp), so each perturbed pass is the clean one and the
identities hold up to the round-off of adding a step's gradient up in other pieces: SAM, mSAM (any m, slices of
Trainer's micro-batches included) and Asynchronous SAM (any r) equal a plain Trainer run with the base optimizer;
SAMPa with lam = 0 equals it one Trainer step later (its first step only computes g_0 and leaves the weights, the
optimizer state and the learning-rate schedule alone). The logged `loss` and `grad_norm` are Trainer's too.

Every case accumulates 3 micro-batches of 4 samples under a warm-up + linear-decay schedule with clipping on, and
the loss kinds normalise differently in transformers 5.x:

  mean       a model without **kwargs: the micro-batch mean, divided by the accumulation steps
  kwargs     forward takes **kwargs yet returns a plain mean (as BERT classifiers do): Trainer passes the count and
             does not divide by the accumulation steps
  func       a user compute_loss_func dividing the summed loss by num_items_in_batch
  causal     a GPT-2 causal LM: token losses over the cycle's num_items_in_batch (uneven lengths, -100 labels)
  smoothing  label smoothing on a tiny BERT (Trainer's LabelSmoother, which divides by the count it is given)
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

import sam_hf
from tests.helpers.tiny import KwargsMeanModel, MeanLossModel, args as make_args, text_data, tiny_bert, vector_data

STEPS, BATCH, ACCUMULATION = 4, 4, 3
RHO = 1e-12
# GPT-2's fused c_attn bias holds the key bias, whose gradient is identically zero (softmax ignores a shift shared
# by all keys): autograd returns round-off there, which AdamW normalises into steps of order lr, so summing a
# step's gradient in other pieces moves those few elements by ~1e-6 more.
ATOL = {"causal": 2e-5}


def sum_over_count(outputs, labels, num_items_in_batch=None):
    losses = nn.functional.cross_entropy(outputs["logits"], labels, reduction="none")
    return losses.sum() / num_items_in_batch


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def causal_data(n=STEPS * BATCH * ACCUMULATION, length=10):
    """Sequences of 3 to 10 tokens, right-padded; labels -100 on padding and on some real tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    labels = torch.where(mask.bool() & (torch.rand(n, length, generator=g) > 0.2), ids, -100)
    return Dataset.from_dict({"input_ids": (ids * mask).tolist(), "attention_mask": mask.tolist(),
                              "labels": labels.tolist()})


def vectors():
    return vector_data(n=STEPS * BATCH * ACCUMULATION)


# kind: (model factory, data factory, extra TrainingArguments, Trainer kwargs)
KINDS = {
    "mean": (MeanLossModel, vectors, {}, {}),
    "kwargs": (KwargsMeanModel, vectors, {}, {}),
    "func": (MeanLossModel, vectors, {}, {"compute_loss_func": sum_over_count}),
    "causal": (tiny_gpt2, causal_data, {}, {}),
    "smoothing": (tiny_bert, lambda: text_data(n=STEPS * BATCH * ACCUMULATION), {"label_smoothing_factor": 0.1}, {}),
}

# id: (optim, optim_args, steps behind the base run)
METHODS = {
    "sam": ("sam", f"rho={RHO}", 0),
    "asam": ("sam", f"rho={RHO},adaptive=true", 0),
    "msam-m5": ("msam", f"rho={RHO},micro_batches=5", 0),  # 12 samples: 3, 3, 2, 2, 2 across micro-batches of 4
    "msam-m12": ("msam", f"rho={RHO},micro_batches=12", 0),  # one sample each
    "asyncsam-r0.4": ("asyncsam", f"rho={RHO},ascent_batch_ratio=0.4", 0),  # A_t: a micro-batch and a slice
    "sampa-lam0": ("sampa", f"rho={RHO},lam=0", 1),
}


class Snapshots(TrainerCallback):
    """The weights after every optimizer step."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(tmp_path, kind, optim="adamw_torch", optim_args=None):
    make_model, make_data, extra, trainer_kwargs = KINDS[kind]
    args = make_args(tmp_path / optim, optim, optim_args, max_steps=STEPS, per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=ACCUMULATION, lr_scheduler_type="linear", warmup_steps=2,
                     weight_decay=0.01, max_grad_norm=1.0, train_sampling_strategy="sequential",
                     remove_unused_columns=False, **extra)
    snapshots = Snapshots()
    trainer = sam_hf.SharpnessTrainer(model=make_model(), args=args, train_dataset=make_data(),
                                      callbacks=[snapshots], **trainer_kwargs)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return snapshots.weights, logs, trainer


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    return {kind: run(tmp_path_factory.mktemp(kind), kind) for kind in KINDS}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_rho_to_zero_is_the_base_optimizer(base_runs, tmp_path, kind, method):
    optim, optim_args, lag = METHODS[method]
    base_weights, base_logs, _ = base_runs[kind]
    weights, logs, trainer = run(tmp_path, kind, optim, optim_args)
    final = weights[STEPS]
    expected = base_weights[STEPS - lag]
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=ATOL.get(kind, 2e-6),
                                   msg=lambda m, name=name: f"{kind}/{method}: {name}: {m}")
    # the case has power: the base optimizer's trajectory moved these weights measurably
    assert max(float((base_weights[STEPS][k] - base_weights[1][k]).abs().max()) for k in expected) > 1e-3

    assert len(logs) == STEPS
    if optim == "sampa":
        # the first step made no update, and says so; the learning rate of update k is the schedule's k-th value
        assert logs[0]["sam/skipped_update"] == 1.0 and logs[0]["grad_norm"] == 0.0
        assert [h["learning_rate"] for h in logs[1:]] == pytest.approx([h["learning_rate"] for h in base_logs[:-1]])
        assert [h["grad_norm"] for h in logs[1:]] == pytest.approx([h["grad_norm"] for h in base_logs[:-1]], rel=1e-5)
        # its loss, at the lookahead point y_{t+1} = x_{t+1} here, is the base run's at the same step
        assert [h["loss"] for h in logs] == pytest.approx([h["loss"] for h in base_logs], rel=1e-5)
        return
    # Trainer's own units: the gradient that clipping sees and the logged loss do not depend on the method
    assert [h["grad_norm"] for h in logs] == pytest.approx([h["grad_norm"] for h in base_logs], rel=1e-5)
    if optim != "asyncsam":  # Asynchronous SAM logs the clean loss on A_t, in whole-batch units
        assert [h["loss"] for h in logs] == pytest.approx([h["loss"] for h in base_logs], rel=1e-5)


def test_the_count_probe_reads_the_loss_kind(base_runs, tmp_path):
    """mSAM's slices are weighted by how the loss uses num_items_in_batch, measured once per trainer."""
    found = {}
    for kind in ("kwargs", "func", "causal", "smoothing"):
        _, _, trainer = run(tmp_path / kind, kind, "msam", f"rho={RHO},micro_batches=5")
        found[kind] = trainer._sharpness_loss_uses_count
    assert found == {"kwargs": False, "func": True, "causal": True, "smoothing": True}


def test_sampa_first_value_of_a_warmup_is_used(tmp_path):
    """Under a warm-up from 0 the first update has learning rate 0: SAMPa's second Trainer step moves nothing."""
    model = MeanLossModel()
    before = copy.deepcopy(model.state_dict())
    args = make_args(tmp_path, "sampa", "rho=0.05,lam=0.5", max_steps=2, lr_scheduler_type="linear", warmup_steps=5,
                     weight_decay=0.0)
    trainer = sam_hf.SharpnessTrainer(model=model, args=args, train_dataset=vector_data())
    trainer.train()
    assert trainer.lr_scheduler.last_epoch == 1  # one update, one scheduler step
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
