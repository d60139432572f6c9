"""SharpnessTrainer's weights after a few steps == the plain-PyTorch restatement in tests/helpers/reference.py.

For every method (SAM, ASAM, mSAM, SAMPa-lambda, Asynchronous SAM) with AdamW and
SGD-with-momentum bases, the Trainer is run for a few steps and the same steps
are replayed by `reference.Reference` on a copy of the initial model; all
weights must agree to 1e-5.

Batch order: `train_sampling_strategy="sequential"` makes Trainer read the data
set in order, so step t gets samples [t*bs, (t+1)*bs). The reference builds its
batches from the data set the same way, and the test also records the batches
Trainer actually handed to `training_step` and checks they are exactly those
(so a change in Trainer's sampling fails loudly here rather than as a
mysterious weight mismatch).

Each case also checks that it can tell the method apart from the plain base
optimizer (the weights differ by far more than the tolerance), so a method that
silently degenerated to its base optimizer could not pass.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

import sam_hf
from tests.helpers.parity import ListDataset, TinyNet, bert_rows, stack, tiny_bert, vector_rows
from tests.helpers.reference import Base, Reference

ATOL = 1e-5
STEPS = 4


# --------------------------------------------------------------------------- running both sides


class RecordingTrainer(sam_hf.SharpnessTrainer):
    """Records a copy of every batch Trainer hands to training_step (before the method sees it)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return super().training_step(model, inputs, num_items_in_batch)


def run_trainer(tmp_path, model, rows, optim, optim_args, bs, lr, weight_decay, max_grad_norm=0.0):
    args = TrainingArguments(
        output_dir=str(tmp_path), optim=optim, optim_args=optim_args, per_device_train_batch_size=bs,
        gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=lr, weight_decay=weight_decay,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=max_grad_norm,
        train_sampling_strategy="sequential", logging_steps=1, report_to=[], save_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=ListDataset(rows))
    trainer.seen = []
    trainer.train()
    return trainer


def reference_batches(rows, bs):
    return [stack(rows[t * bs:(t + 1) * bs]) for t in range(STEPS)]


def assert_batches_match(seen, expected):
    assert len(seen) == len(expected) == STEPS
    for got, want in zip(seen, expected):
        assert set(want) <= set(got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def assert_weights_equal(trained: nn.Module, ref: nn.Module, atol=ATOL):
    sa, sb = trained.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys()
    bad = {k: float((sa[k].float() - sb[k].float()).abs().max()) for k in sa
           if not torch.allclose(sa[k].float(), sb[k].float(), rtol=0, atol=atol)}
    assert not bad, f"weights differ from the reference beyond {atol}: {bad}"
    for k, v in sa.items():
        assert torch.isfinite(v.float()).all(), k


# --------------------------------------------------------------------------- the cases

ADAMW = dict(base="adamw", lr=0.02, wd=0.1)
SGD = dict(base="sgd", lr=0.1, wd=0.05, momentum=0.9)
SGD_NESTEROV = dict(base="sgd", lr=0.1, wd=0.05, momentum=0.9, nesterov=True, dampening=0.0)
SGD_DAMPENING = dict(base="sgd", lr=0.1, wd=0.05, momentum=0.9, dampening=0.3)


def optim_args_and_base(method_args: dict, base: dict):
    """(optim_args string for Trainer, reference.Base) for the same base optimizer."""
    pieces = [f"{k}={v}" for k, v in method_args.items()]
    if base["base"] == "adamw":
        pieces.append("base=adamw_torch_fused" if base.get("fused") else "base=adamw_torch")
        ref_base = Base("adamw", lr=base["lr"], weight_decay=base["wd"], fused=base.get("fused", False))
    else:
        pieces += ["base=sgd", f"momentum={base['momentum']}"]
        if "nesterov" in base:
            pieces.append(f"nesterov={str(base['nesterov']).lower()}")
        if "dampening" in base:
            pieces.append(f"dampening={base['dampening']}")
        ref_base = Base("sgd", lr=base["lr"], weight_decay=base["wd"], momentum=base["momentum"],
                        dampening=base.get("dampening", 0.0), nesterov=base.get("nesterov", False))
    return ",".join(pieces), ref_base


# (id, method, optim_args of the method, reference step kwargs)
METHODS = [
    ("sam", "sam", {"rho": 0.3}, {}),
    ("asam", "sam", {"rho": 0.5, "adaptive": "true", "eta": 0.05}, {}),
    ("msam-m3", "msam", {"rho": 0.3, "micro_batches": 3}, {"m": 3}),  # 7 samples: 3, 2, 2
    ("msam-m2", "msam", {"rho": 0.3, "micro_batches": 2}, {"m": 2}),  # 7 samples: 4, 3
    ("sampa-lam0.5", "sampa", {"rho": 0.3, "lam": 0.5}, {"lam": 0.5}),
    ("sampa-lam0", "sampa", {"rho": 0.3, "lam": 0.0}, {"lam": 0.0}),
    ("asyncsam-r1", "asyncsam", {"rho": 0.3, "ascent_batch_ratio": 1.0}, {"ratio": 1.0}),
    ("asyncsam-r0.5", "asyncsam", {"rho": 0.3, "ascent_batch_ratio": 0.5}, {"ratio": 0.5}),  # ceil(3.5) = 4
]
BASES = [("adamw", ADAMW), ("sgd", SGD)]


def reference_kwargs(method_args):
    return dict(rho=float(method_args["rho"]), adaptive=method_args.get("adaptive") == "true",
                eta=float(method_args.get("eta", 0.01)))


def check_parity(tmp_path, make_model, rows, bs, method, method_args, step_kwargs, base, max_grad_norm=0.0):
    optim_args, ref_base = optim_args_and_base(method_args, base)
    model = make_model()
    ref_model = copy.deepcopy(model)
    plain_model = copy.deepcopy(model)

    trainer = run_trainer(tmp_path, model, rows, method, optim_args, bs, base["lr"], base["wd"], max_grad_norm)
    batches = reference_batches(rows, bs)
    assert_batches_match(trainer.seen, batches)
    assert trainer.state.global_step == STEPS

    ref = Reference(ref_model, ref_base, max_grad_norm=max_grad_norm, **reference_kwargs(method_args))
    ref.run(method, batches, **step_kwargs)
    assert_weights_equal(trainer.model, ref_model)

    # the case has power: the method moves the weights measurably away from the plain base optimizer
    Reference(plain_model, ref_base, max_grad_norm=max_grad_norm).run("plain", batches)
    assert max_diff(ref_model, plain_model) > 100 * ATOL
    return trainer, ref


@pytest.mark.parametrize("base", [b for _, b in BASES], ids=[i for i, _ in BASES])
@pytest.mark.parametrize("case", METHODS, ids=[c[0] for c in METHODS])
def test_tinynet_parity(tmp_path, case, base):
    _, method, method_args, step_kwargs = case
    trainer, ref = check_parity(tmp_path, TinyNet, vector_rows(7 * STEPS), 7, method, method_args, step_kwargs,
                                base)
    assert ref.skipped == 0
    for p_name, p in trainer.model.named_parameters():
        if not p.requires_grad:  # the frozen parameter is neither perturbed nor stepped
            torch.testing.assert_close(p, TinyNet().get_parameter(p_name), rtol=0, atol=0)


@pytest.mark.parametrize("case", METHODS, ids=[c[0] for c in METHODS])
def test_bert_parity_adamw(tmp_path, case):
    _, method, method_args, step_kwargs = case
    check_parity(tmp_path, tiny_bert, bert_rows(6 * STEPS), 6, method, method_args, step_kwargs, ADAMW)


@pytest.mark.parametrize("case", [c for c in METHODS if c[0] in ("sam", "sampa-lam0.5", "asyncsam-r0.5")],
                         ids=lambda c: c[0])
def test_bert_parity_sgd(tmp_path, case):
    _, method, method_args, step_kwargs = case
    check_parity(tmp_path, tiny_bert, bert_rows(6 * STEPS), 6, method, method_args, step_kwargs, SGD)


# SAMPa's lookahead has its own SGD branches: Nesterov, dampening (only after the first momentum step).
@pytest.mark.parametrize("base", [SGD_NESTEROV, SGD_DAMPENING], ids=["nesterov", "dampening"])
@pytest.mark.parametrize("method,method_args,step_kwargs", [
    ("sampa", {"rho": 0.3, "lam": 0.5}, {"lam": 0.5}),
    ("sam", {"rho": 0.3}, {}),
], ids=["sampa", "sam"])
def test_sgd_variants_parity(tmp_path, method, method_args, step_kwargs, base):
    check_parity(tmp_path, TinyNet, vector_rows(7 * STEPS), 7, method, method_args, step_kwargs, base)


@pytest.mark.parametrize("method,method_args,step_kwargs", [
    ("sampa", {"rho": 0.3, "lam": 0.5}, {"lam": 0.5}),
    ("sam", {"rho": 0.3}, {}),
], ids=["sampa", "sam"])
def test_fused_adamw_parity(tmp_path, method, method_args, step_kwargs):
    """`base=adamw_torch_fused` (torch.optim.AdamW(fused=True)): the lookahead reads its state the same way."""
    check_parity(tmp_path, TinyNet, vector_rows(7 * STEPS), 7, method, method_args, step_kwargs,
                 dict(ADAMW, fused=True))


@pytest.mark.parametrize("base", [ADAMW, SGD], ids=["adamw", "sgd"])
def test_sampa_with_clipping(tmp_path, base):
    """max_grad_norm > 0: Trainer clips G; the lookahead uses g_t clipped by min(1, c/(||g_t|| + 1e-6))."""
    rows = vector_rows(7 * STEPS)
    max_grad_norm = 0.2
    trainer, ref = check_parity(tmp_path, TinyNet, rows, 7, "sampa", {"rho": 0.3, "lam": 0.5}, {"lam": 0.5}, base,
                                max_grad_norm=max_grad_norm)
    # the clipping was active (otherwise this case would test nothing new), for G and for g_t
    assert all(e["grad_norm"] > max_grad_norm for e in trainer.state.log_history if "grad_norm" in e
               and e.get("step", 0) > 1)
    assert float(Reference.norm(ref.g)) > max_grad_norm
    # and it matters: without clipping the weights come out different
    unclipped = TinyNet()
    Reference(unclipped, optim_args_and_base({}, base)[1], rho=0.3).run("sampa", reference_batches(rows, 7), lam=0.5)
    assert max_diff(unclipped, trainer.model) > 100 * ATOL


def test_sampa_first_step_leaves_weights_and_state(tmp_path):
    """SAMPa's first Trainer step only computes g_0: weights and optimizer state unchanged, step still counted."""
    model = TinyNet()
    before = copy.deepcopy(model)
    optim_args, _ = optim_args_and_base({"rho": 0.3, "lam": 0.5}, ADAMW)
    args = TrainingArguments(
        output_dir=str(tmp_path), optim="sampa", optim_args=optim_args, per_device_train_batch_size=7, max_steps=1,
        learning_rate=0.02, weight_decay=0.1, lr_scheduler_type="constant", train_sampling_strategy="sequential",
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, max_grad_norm=0.0)
    trainer = sam_hf.SharpnessTrainer(model=model, args=args, train_dataset=ListDataset(vector_rows(7)))
    trainer.train()
    assert trainer.state.global_step == 1
    assert max_diff(trainer.model, before) == 0.0
    assert len(trainer.optimizer.state) == 0  # AdamW never stepped: no exp_avg, no step count


# --------------------------------------------------------------------------- zero ascent gradients


def skipped_in_logs(trainer) -> float:
    return sum(e.get("sam/skipped_ascent", 0.0) for e in trainer.state.log_history)


@pytest.mark.parametrize("base", [ADAMW, SGD], ids=["adamw", "sgd"])
@pytest.mark.parametrize("method,method_args,step_kwargs,zero,expected_skips", [
    # step 1's whole batch has loss weight 0: its gradient is exactly zero
    ("sam", {"rho": 0.3}, {}, range(7, 14), 1),
    ("sam", {"rho": 0.5, "adaptive": "true"}, {}, range(7, 14), 1),
    # micro-batch 0 of step 2 (samples 14..16 of 7-sample batches split 3, 2, 2)
    ("msam", {"rho": 0.3, "micro_batches": 3}, {"m": 3}, range(14, 17), 1),
    # g_1 = grad f(y_1, B_1) = 0, so step 2 perturbs nothing (its lookahead still moves by the momentum)
    ("sampa", {"rho": 0.3, "lam": 0.5}, {"lam": 0.5}, range(7, 14), 1),
    # A_1 = the first 4 samples of B_1 are weighted 0: a_1 = 0, step 2's descent is unperturbed
    ("asyncsam", {"rho": 0.3, "ascent_batch_ratio": 0.5}, {"ratio": 0.5}, range(7, 11), 1),
], ids=["sam", "asam", "msam", "sampa", "asyncsam"])
def test_zero_ascent_gradient_skips_perturbation(tmp_path, method, method_args, step_kwargs, zero, expected_skips,
                                                 base):
    rows = vector_rows(7 * STEPS, zero_weight=set(zero))
    optim_args, ref_base = optim_args_and_base(method_args, base)
    model = TinyNet()
    ref_model = copy.deepcopy(model)
    trainer = run_trainer(tmp_path, model, rows, method, optim_args, 7, base["lr"], base["wd"])
    batches = reference_batches(rows, 7)
    assert_batches_match(trainer.seen, batches)
    ref = Reference(ref_model, ref_base, **reference_kwargs(method_args)).run(method, batches, **step_kwargs)
    assert ref.skipped == expected_skips  # the reference saw the zero gradient where intended
    assert_weights_equal(trainer.model, ref_model)  # finite, and equal to "no perturbation that step"
    assert skipped_in_logs(trainer) == expected_skips
    for e in trainer.state.log_history:
        for k, v in e.items():
            if isinstance(v, float) and k.startswith(("loss", "sam/", "grad_norm")):
                assert math.isfinite(v), (k, e)
