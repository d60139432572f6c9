"""Asynchronous SAM (Jo et al., Algorithm 1, tau = 1): a one-step-stale, smaller ascent.

With A_t the first ceil(r |B_t|) samples of B_t, r = `ascent_batch_ratio`:

    t = 0:   step O with grad f(x_0, B_0);                          a_0 = grad f(x_0, A_0)
    t >= 1:  step O with grad f(x_t + rho a_{t-1}/||a_{t-1}||, B_t);  a_t = grad f(x_t, A_t)

The descent at step t needs only a_{t-1}, so with two processes a_t is computed
on the second device while the first computes the descent (`parallel.py`),
and r is chosen so the ascent hides behind the descent (`ascent_batch_ratio=auto`
measures both devices; in one process `auto` means r = 1). In one process
the two passes run one after the other, the descent first.

The reported `loss` is f(x_t, A_t), the clean loss on the ascent batch. Memory, beyond the base optimizer's own:
one copy (SAM's, the weight backup), written into a_{t-1}'s buffers as the perturbation consumes them
(`perturb_keeping_x`), then a_t and the descent gradient: `.grad`'s own tensors, handed over without copies. In
role mode the other role's gradient is received into the spent a_{t-1}'s buffers.
"""

from __future__ import annotations

import logging
import time

import torch

from ..batching import batch_size as _size
from ..batching import leading_samples
from ..parallel import take_grads
from .base import SharpnessMethod, StepResult, as_tensor, restore, run_batches, run_pieces, to_device, zero_grads
from .sampa import perturb_keeping_x

logger = logging.getLogger(__name__)
AUTO_STEPS = 3  # steps measured (after the first) before ascent_batch_ratio=auto fixes r


class AsyncSAM(SharpnessMethod):
    name = "asyncsam"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        r = self.config.ascent_batch_ratio
        self.auto_ratio = r == "auto"  # measured in role-parallel mode only; r = 1 until then
        self.ratio = 1.0 if r == "auto" else float(r)
        self.a = None  # a_{t-1}, unscaled fp32
        self._spent = None  # role mode: a_{t-1}'s buffers once spent, for the exchange to receive into
        self.steps_seen = 0
        self._timings: list[tuple[float, float, float]] = []  # descent s, ascent s/sample, step-time gap s

    EXTRA_KEYS = ("loss", "perturbed_loss", "applied", "ascent_grad_norm", "descent_seconds", "ascent_seconds",
                  "ascent_samples", "descent_step_seconds", "ascent_step_seconds")
    last_step_seconds = 0.0  # this rank's last optimizer step, timed by SharpnessOptimizer while measuring

    @property
    def times_optimizer_step(self) -> bool:
        return self.auto_ratio and self.role_parallel

    def synchronize(self) -> None:
        """Wait for this rank's queued GPU work, so a timing counts it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def descent_grad(self, batches, passes):
        """grad f(x_t + rho a_{t-1}/||a_{t-1}||, B_t) in .grad (unperturbed on the first step)."""
        params = self.params
        zero_grads(params)
        if self.a is None:
            return run_batches(passes, batches, clean=True), False, torch.zeros(())
        # a_{t-1} has done its work once the perturbation is applied: its buffers take x's backup
        saved, applied, norm = perturb_keeping_x(self, self.a)
        self.a = None
        loss = run_batches(passes, batches, clean=False)
        restore(params, saved)
        if self.role_parallel:  # the backup's buffers (a_{t-1}'s) receive the ascent gradient a_t
            self._spent = saved
        return loss, applied, norm

    def role_pass(self, role: int, batches, passes) -> dict:
        """Role 0: the descent gradient on B_t; role 1: the ascent gradient a_t = grad f(x_t, A_t)."""
        start = time.perf_counter()
        if role == 0:
            loss, applied, norm = self.descent_grad(batches, passes)
            out = {"perturbed_loss": loss, "applied": float(applied), "ascent_grad_norm": norm}
            key = "descent_seconds"
        else:
            zero_grads(self.params)
            self._spend_a()  # the ascent rank never uses a_{t-1}: its buffers receive the descent gradient
            pieces = leading_samples(batches, self.ratio)
            samples = sum(_size(p.batch) for p in pieces)
            # each piece contributes its part of the step's loss: report it in the units of the whole batch
            share = samples / sum(_size(b) for b in batches)
            out = {"loss": run_pieces(passes, pieces, clean=True) / share, "ascent_samples": samples}
            key = "ascent_seconds"
        if self.auto_ratio and self.role_parallel:  # timing a GPU pass needs its kernels finished
            self.synchronize()
        out[key] = time.perf_counter() - start
        out["descent_step_seconds" if role == 0 else "ascent_step_seconds"] = self.last_step_seconds
        return out

    def _spend_a(self) -> None:
        if self.role_parallel and self.a is not None:
            self._spent = self.a
        self.a = None

    def receive_buffers(self):
        """The spent a_{t-1}'s buffers, handed to `parallel.exchange` to receive the other role's gradient into."""
        out, self._spent = self._spent, None
        return out

    def step(self, batches, passes):
        scale = passes.loss_scale()
        first = self.a is None
        extras = self.role_pass(0, batches, passes)
        passes.all_reduce_grads(self.params)
        descent = take_grads(self.params, scale)  # no copy: .grad's own tensors, unscaled in place
        if first and self.ratio >= 1.0:  # A_0 = B_0: the descent gradient is a_0
            ascent, extras["loss"] = [None if d is None else d.clone() for d in descent], extras["perturbed_loss"]
        else:
            extras.update(self.role_pass(1, batches, passes))
            passes.all_reduce_grads(self.params)
            ascent = take_grads(self.params, scale)
        return self.finish(descent, ascent, batches, extras, scale)

    def finish(self, descent, ascent, batches, extras, scale) -> StepResult:
        """Step with the descent gradient; keep a_t for the next step. Both are unscaled fp32 and this method's to
        keep (`take_grads`, the exchange): the descent tensors become `.grad`, rescaled in place."""
        params = self.params
        self._spent = None
        with torch.no_grad():
            for p, d in zip(params, descent):
                if d is not None and scale != 1.0:
                    d.mul_(scale)
                p.grad = None if d is None else d.to(p.dtype)
        self.a = ascent
        self.steps_seen += 1
        if self.role_parallel and self.auto_ratio and self.steps_seen > 1:
            self._measure(extras, batches)
        device = self.device
        loss = as_tensor(extras.get("loss", 0.0), device)
        metrics = {"sam/perturbed_loss": as_tensor(extras.get("perturbed_loss", 0.0), device),
                   "sam/ascent_batch_ratio": self.ratio}
        if self.steps_seen > 1:
            metrics.update({"sam/ascent_grad_norm": as_tensor(extras.get("ascent_grad_norm", 0.0), device),
                            "sam/skipped_ascent": 1.0 - float(extras.get("applied", 0.0))})
        return StepResult(loss, metrics=metrics)

    def _measure(self, extras, batches) -> None:
        """`ascent_batch_ratio=auto`: pick r so the ascent rank's step hides behind the descent rank's.

        Per step, the descent rank spends its pass plus its optimizer step, and the ascent rank r |B| samples at
        its per-sample speed plus its own optimizer step (on a CPU ascent rank, not negligible):
        r = (descent + its step - ascent rank's step) / (seconds per sample x |B|), within [1/|B|, 1]."""
        get = lambda key: float(extras.get(key, 0.0))  # noqa: E731
        self._timings.append((get("descent_seconds"), get("ascent_seconds") / max(get("ascent_samples"), 1.0),
                              get("descent_step_seconds") - get("ascent_step_seconds")))
        if len(self._timings) < AUTO_STEPS:
            return
        descent, per_sample, step_gap = (sorted(t[i] for t in self._timings)[len(self._timings) // 2] for i in range(3))
        total = sum(_size(b) for b in batches)
        self.ratio = min(1.0, max(1.0 / total, (descent + step_gap) / max(per_sample * total, 1e-12)))
        self.auto_ratio = False
        logger.info("sam_hf: ascent_batch_ratio=auto chose r=%.3f (descent %.4f s/step, ascent %.6f s/sample, "
                    "optimizer steps: descent rank minus ascent rank %.4f s)",
                    self.ratio, descent, per_sample, step_gap)

    def state_dict(self):
        return {"a": self.a, "ratio": self.ratio, "steps_seen": self.steps_seen, "auto_ratio": self.auto_ratio,
                "timings": self._timings}

    def load_state_dict(self, state):
        self.a = to_device(state.get("a"), self.device)
        self._spent = None
        self.ratio = float(state.get("ratio", self.ratio))
        self.steps_seen = int(state.get("steps_seen", 1 if self.a is not None else 0))
        self.auto_ratio = bool(state.get("auto_ratio", self.auto_ratio))
        self._timings = [tuple(t) + (0.0,) * (3 - len(t)) for t in state.get("timings", [])]
