"""Asynchronous SAM (Jo et al., Algorithm 1, tau = 1): a one-step-stale, smaller ascent.

With A_t the first ceil(r |B_t|) samples of B_t, r = `ascent_batch_ratio`:

    t = 0:   step O with grad f(x_0, B_0);                          a_0 = grad f(x_0, A_0)
    t >= 1:  step O with grad f(x_t + rho a_{t-1}/||a_{t-1}||, B_t);  a_t = grad f(x_t, A_t)

The descent at step t needs only a_{t-1}, so with two processes a_t is computed
on the second device while the first computes the descent (`parallel.py`),
and r is chosen so the ascent hides behind the descent (`ascent_batch_ratio=auto`
measures both devices; in one process `auto` means r = 1). In one process
the two passes run one after the other, the descent first.

The reported `loss` is f(x_t, A_t), the clean loss on the ascent batch
(f(x_0, B_0) on the first step). Memory: a_{t-1} and the weight backup, or
a_t and the held descent gradient (two copies of the trainable weights).
"""

from __future__ import annotations

from ..batching import leading_samples
from .base import (SharpnessMethod, StepResult, backup, grads_fp32, perturb_, restore, run_batches,
                   run_pieces, zero_grads)


class AsyncSAM(SharpnessMethod):
    name = "asyncsam"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        r = self.config.ascent_batch_ratio
        self.ratio = 1.0 if r == "auto" else float(r)
        self.a = None  # a_{t-1}, unscaled fp32

    def descent_grad(self, batches, passes):
        """grad f(x_t + rho a_{t-1}/||a_{t-1}||, B_t) in .grad. Returns (loss, applied, ||a_{t-1}||)."""
        params = self.params
        zero_grads(params)
        saved = backup(params)
        applied, norm = perturb_(params, self.a, 1.0, self.config)
        loss = run_batches(passes, batches, clean=False)
        restore(params, saved)
        return loss, applied, norm

    def ascent_grad(self, batches, passes):
        """a_t = grad f(x_t, A_t), kept unscaled in fp32. Returns the clean loss on A_t."""
        zero_grads(self.params)
        loss = run_pieces(passes, leading_samples(batches, self.ratio), clean=True)
        passes.all_reduce_grads(self.params)
        self.a = grads_fp32(self.params, passes.loss_scale())
        return loss

    def step(self, batches, passes):
        params = self.params
        if self.a is None:
            return self._first_step(batches, passes)
        perturbed_loss, applied, norm = self.descent_grad(batches, passes)
        passes.all_reduce_grads(params)
        descent, self.a = [p.grad for p in params], None
        loss = self.ascent_grad(batches, passes)
        for p, d in zip(params, descent):
            p.grad = d
        return StepResult(loss, metrics={
            "sam/perturbed_loss": perturbed_loss, "sam/ascent_grad_norm": norm,
            "sam/skipped_ascent": float(not applied), "sam/ascent_batch_ratio": self.ratio,
        })

    def _first_step(self, batches, passes):
        params = self.params
        zero_grads(params)
        loss = run_batches(passes, batches, clean=True)
        passes.all_reduce_grads(params)
        if self.ratio >= 1.0:  # A_0 = B_0: the descent gradient is a_0
            self.a = grads_fp32(params, passes.loss_scale())
        else:
            descent = [p.grad for p in params]
            self.ascent_grad(batches, passes)
            for p, d in zip(params, descent):
                p.grad = d
        return StepResult(loss, metrics={"sam/perturbed_loss": loss, "sam/ascent_batch_ratio": self.ratio})

    def state_dict(self):
        return {"a": self.a, "ratio": self.ratio}

    def load_state_dict(self, state):
        device = self.params[0].device if self.params else "cpu"
        self.a = None if state.get("a") is None else [None if t is None else t.to(device) for t in state["a"]]
        self.ratio = float(state.get("ratio", self.ratio))
