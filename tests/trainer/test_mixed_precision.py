"""Mixed precision: bf16 and fp16 (GradScaler) take the fp32 steps up to precision.

bf16 runs under Trainer's own CPU autocast. accelerate gives no GradScaler on
CPU, so the fp16 tests hand the trainer a `torch.amp.GradScaler("cpu")` on a
fp32 model: `Accelerator.prepare_optimizer` passes `accelerator.scaler` to the
AcceleratedOptimizer (which then steps through `scaler.step` / `scaler.update`),
`accelerator.backward` scales the loss, and sam_hf reads the scale from
`accelerator.scaler`. That exercises exactly the unscaling logic (the scale
taken out before every norm and lookahead; overflow steps skipped) without
fp16 round-off. Under real fp16, accelerate also unscales before clipping;
`_emulate_fp16_unscale` does the same here.
"""

import functools
import math
import tempfile

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer

import sam_hf
from tests.helpers.tiny import METHOD_CASES, MeanLossModel, args, assert_same_weights, vector_data, weights

CASES = {**{k: METHOD_CASES[k] for k in ('sam', 'asam', 'msam', 'asyncsam')}, "sampa": ("sampa", "rho=0.1,lam=0.5")}
STEPS = 4
CLIP = 0.3  # clips most steps of this model, so the tests also see clipping after unscaling


def _norm_diff(a, b):
    return math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a))


def _emulate_fp16_unscale(trainer, scaler):
    """What `Accelerator.unscale_gradients` does under real fp16 (it is a no-op when mixed_precision != fp16)."""
    acc = trainer.accelerator

    def unscale_gradients(optimizer=None):
        for opt in acc._optimizers:
            while isinstance(opt, AcceleratedOptimizer):
                opt = opt.optimizer
            scaler.unscale_(opt)

    acc.unscale_gradients = unscale_gradients


class Counting:
    """Wraps scaler.scale to count the backward passes that went through the scaler."""

    def __init__(self, scaler):
        self.calls = 0
        self._scale = scaler.scale

        def scale(outputs):
            self.calls += 1
            return self._scale(outputs)

        scaler.scale = scale


def run(tmp_path, optim, optim_args, model=None, scaler=None, steps=STEPS, **kw):
    model = MeanLossModel() if model is None else model
    trainer = sam_hf.SharpnessTrainer(model=model, args=args(tmp_path, optim, optim_args, max_steps=steps, **kw),
                                      train_dataset=vector_data())
    counter = None
    if scaler is not None:
        trainer.accelerator.scaler = scaler  # picked up by Accelerator.prepare_optimizer inside train()
        _emulate_fp16_unscale(trainer, scaler)
        counter = Counting(scaler)
    trainer.train()
    if scaler is not None:
        assert isinstance(trainer.optimizer, AcceleratedOptimizer) and trainer.optimizer.scaler is scaler
        assert counter.calls >= steps  # every backward pass was scaled
    return weights(model), trainer


@functools.lru_cache(maxsize=None)
def _fp32(case, max_grad_norm=CLIP, optim_args_extra=""):
    optim, optim_args = CASES[case]
    with tempfile.TemporaryDirectory() as out:
        w, _ = run(out, optim, optim_args + optim_args_extra, max_grad_norm=max_grad_norm)
    return w


def fp32(case, **kw):
    return {k: v.clone() for k, v in _fp32(case, **kw).items()}


@functools.lru_cache(maxsize=None)
def base_bf16_error(base: str, base_args: str | None) -> float:
    """What bf16 does to the base optimizer's own run, on this machine's kernels: ||w_bf16 - w_fp32|| over
    ||w_fp32 - w_0|| for a plain (non-sharpness) run of the same model, data, steps and clipping."""
    start = weights(MeanLossModel())
    with tempfile.TemporaryDirectory() as out:
        w32, _ = run(out, base, base_args, max_grad_norm=CLIP)
        w16, _ = run(out, base, base_args, bf16=True, max_grad_norm=CLIP)
    return _norm_diff(w16, w32) / _norm_diff(w32, start)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_close_to_fp32(tmp_path, case):
    """A method under bf16 autocast ends as close to its fp32 run, relative to how far the weights moved, as the base
    optimizer does to its own (about u = 2^-8 here, with every kernel tried): each step's gradients carry bf16's
    round-off, and the method adds one more pass of it per step, so twice the base optimizer's relative error,
    measured on the same kernels, bounds it. A constant would hold on the kernels it was measured on only."""
    optim, optim_args = CASES[case]
    # AdamW divides by sqrt(v): a coordinate whose gradient is near zero moves by up to lr either way, so
    # bf16 noise in it becomes an O(lr) weight difference. ASAM here has one such coordinate (3.6% of the
    # weight change with AdamW vs 0.28% with SGD); it is compared with SGD-with-momentum, the others with AdamW.
    extra = ",base=sgd,momentum=0.9" if case == "asam" else ""
    start = weights(MeanLossModel())
    ref = fp32(case, optim_args_extra=extra)
    bf16, trainer = run(tmp_path, optim, optim_args + extra, bf16=True, max_grad_norm=CLIP)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(torch.isfinite(v).all() for v in bf16.values())
    moved = _norm_diff(ref, start)
    assert moved > 1e-2
    base = base_bf16_error("sgd", "momentum=0.9") if case == "asam" else base_bf16_error("adamw_torch", None)
    assert 0 < base < 2 ** -6  # bf16 did round (u = 2^-8), and the base optimizer is not ill-conditioned here
    assert _norm_diff(bf16, ref) <= 2 * base * moved


class CastingModel(MeanLossModel):
    def forward(self, x, labels=None):
        return super().forward(x.to(self.net[0].weight.dtype), labels)


@pytest.mark.parametrize("case", ["sam", "msam", "sampa", "asyncsam"])
def test_bf16_weights_train_finite(tmp_path, case):
    """A model held in bf16 (not autocast): directions computed in fp32, weights stay finite and move."""
    optim, optim_args = CASES[case]
    model = CastingModel().to(torch.bfloat16)
    start = weights(model)
    after, trainer = run(tmp_path, optim, optim_args, model=model, learning_rate=5e-2)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(start[k], after[k]) for k in start)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("case,max_grad_norm", [(c, CLIP) for c in CASES] + [("sampa", 0.0)])
def test_fp16_scaler_trajectory_equals_fp32(tmp_path, case, max_grad_norm):
    """With loss scale 2**10 and no overflow, every step equals the fp32 step: the scale is taken out
    before every norm, lookahead and mix."""
    optim, optim_args = CASES[case]
    ref = fp32(case, max_grad_norm=max_grad_norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled, trainer = run(tmp_path, optim, optim_args, scaler=scaler, max_grad_norm=max_grad_norm)
    assert scaler.get_scale() == 2.0**10 and scaler._get_growth_tracker() == STEPS  # no step skipped
    assert_same_weights(ref, scaled, atol=1e-5, rtol=0)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h.get("sam/skipped_ascent", 0) == 0 for h in logged)


class LoudModel(MeanLossModel):
    """Loss x 1e4: with loss scale 2**127 every scaled gradient overflows fp32; with 2**87 none does."""

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if labels is not None:
            out["loss"] = out["loss"] * 1e4
        return out


def _overflow_scaler():
    # one overflow brings the scale from 2**127 to 2**87, where this model's gradients are finite
    return torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-40, growth_interval=1000)


@pytest.mark.parametrize("case", list(CASES))
def test_fp16_overflow_skips_the_step(tmp_path, case):
    optim, optim_args = CASES[case]
    start = weights(LoudModel())
    scaler = _overflow_scaler()
    after, trainer = run(tmp_path, optim, optim_args, model=LoudModel(), scaler=scaler, steps=1)
    assert trainer.accelerator.optimizer_step_was_skipped
    assert scaler.get_scale() == 2.0**87
    assert_same_weights(start, after)  # bitwise: the overflowing step changed nothing
    assert not trainer.optimizer.optimizer.base.state  # the base optimizer never stepped
    log = next(h for h in trainer.state.log_history if "loss" in h)
    if optim in ("sam", "msam"):  # these perturb on step 1 from the step's own gradient
        # the overflowing ascent is counted, not applied (mSAM counts each of its 4 micro-batches)
        assert log["sam/skipped_ascent"] == (4 if optim == "msam" else 1)


@pytest.mark.parametrize("case", list(CASES))
def test_fp16_overflow_then_recovers(tmp_path, case):
    """After the overflow the scale is reduced and training goes on, never NaN."""
    optim, optim_args = CASES[case]
    start = weights(LoudModel())
    scaler = _overflow_scaler()
    after, trainer = run(tmp_path, optim, optim_args, model=LoudModel(), scaler=scaler, steps=4,
                         learning_rate=1e-3)
    assert scaler.get_scale() == 2.0**87 and scaler._get_growth_tracker() == 3  # only step 1 skipped
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(start[k], after[k]) for k in start)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["sam/perturbed_loss"]) for h in logged[1:])
    if optim == "asyncsam":
        # a_0 came from the overflowing step: step 2 skips only its perturbation (counted) and still steps
        assert logged[1]["sam/skipped_ascent"] == 1
        assert all(h["sam/skipped_ascent"] == 0 for h in logged[2:])


def test_sampa_first_step_under_scaler_changes_nothing(tmp_path):
    """SAMPa's first step computes g_0 only: weights, optimizer state and the loss scale stay as they were."""
    optim, optim_args = CASES["sampa"]
    start = weights(MeanLossModel())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    after, trainer = run(tmp_path, optim, optim_args, scaler=scaler, steps=1)
    assert_same_weights(start, after)
    assert not trainer.optimizer.optimizer.base.state
    # reported to Trainer as a skipped step, as an overflow would be, so the learning-rate schedule waits too
    assert trainer.accelerator.optimizer_step_was_skipped and trainer.lr_scheduler.last_epoch == 0
    method = trainer.optimizer.optimizer.method
    assert method.g is not None and all(torch.isfinite(g).all() for g in method.g if g is not None)
    # g_0 is stored unscaled: it equals the fp32 run's g_0
    _, ref = run(tmp_path, optim, optim_args, steps=1)
    for a, b in zip(method.g, ref.optimizer.optimizer.method.g):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_sampa_overflow_on_first_step_retries_g0(tmp_path):
    """An overflow in g_0 keeps SAMPa in its first step (no g_t with inf is held)."""
    optim, optim_args = CASES["sampa"]
    scaler = _overflow_scaler()
    _, trainer = run(tmp_path, optim, optim_args, model=LoudModel(), scaler=scaler, steps=1)
    assert trainer.optimizer.optimizer.method.g is None
