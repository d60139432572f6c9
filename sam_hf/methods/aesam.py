"""AE-SAM (Jiang, Yang, Zhang and Kwok, ICLR 2023, "An adaptive policy to employ sharpness-aware minimization"):
SAM only on the steps where the squared gradient norm is large for its running distribution.

Optimizer step t of T (Trainer's max_steps), g_t = grad f(x_t, B_t):

    s_t      = ||g_t||^2
    mu_t     = delta mu_(t-1) + (1 - delta) s_t                       (running mean, forgetting rate delta)
    sigma2_t = delta sigma2_(t-1) + (1 - delta) (s_t - mu_t)^2        (running variance)
    c_t      = (t/T) lambda_1 + (1 - t/T) lambda_2                    (from lambda_2 at t = 0 to lambda_1 at t = T)
    s_t >= mu_t + c_t sqrt(sigma2_t):  SAM: the base optimizer steps with grad f(x_t + rho g_t/||g_t||, B_t)
    otherwise:                         the base optimizer steps with g_t (the clean gradient, already computed)

The decision is made after the clean pass, so a non-SAM step costs one pass and its gradient is the clean one.
mu and sigma2 start at 0 (the paper's initial values are not stated; with delta = 0.9 they are forgotten within
~20 steps). No code from the authors was found; the rule is the paper's, as transcribed in
tests/helpers/family_reference/aesam.py. Defaults: rho = 0.2 and delta = 0.9 (SAMPa paper, Appendix B.4);
lambda_1 = -1, lambda_2 = 1 (the AE-SAM paper's setting, also in the Asynchronous SAM paper's Table A.2): c falls
from 1 to -1, so SAM runs on about 16% of the steps early and 84% late, about half overall.

With several processes s_t is the norm of the averaged gradient (the clean gradient is all-reduced first), so
every rank takes the same decision and 1 and N processes agree. A non-finite s_t (an fp16 overflow, which
Trainer skips) leaves mu and sigma2 as they were and takes the base step. Logs `sam/active` (the share of SAM
steps over the logging interval). State: t, mu, sigma2 and the count of SAM steps (checkpointed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import SharpnessConfig, _bad, option
from ..registry import Example, register_method
from ..tensors import backup, restore, zero_grads
from .base import SharpnessMethod, StepResult, run_batches
from .rules import AscentOptions


@dataclass
class AESAMConfig(AscentOptions, SharpnessConfig):
    rho: float = option(0.2, "radius of the perturbation on the SAM steps (SAMPa paper, Appendix B.4: 0.2)")
    delta: float = option(0.9, "AE-SAM's forgetting rate of the running mean and variance of ||g||^2, in [0, 1) "
                          "(Appendix B.4: 0.9)", example=0.9)
    lam1: float = option(-1.0, "AE-SAM's threshold coefficient c_t at the end of the run (c_t runs linearly from "
                         "lam2 to lam1)", example=-1.0)
    lam2: float = option(1.0, "AE-SAM's threshold coefficient c_t at the start of the run: SAM where ||g||^2 >= "
                         "mean + c_t std", example=1.0)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.delta < 1.0:
            raise _bad("delta", self.delta, "delta (the forgetting rate) must be in [0, 1) (e.g. delta=0.9)")


def threshold_coef(t: int, total: int, lam1: float, lam2: float) -> float:
    """c_t = (t/T) lambda_1 + (1 - t/T) lambda_2."""
    return (t / total) * lam1 + (1.0 - t / total) * lam2


class AESAM(SharpnessMethod):
    extra_copies = 1  # the weight backup, on SAM steps
    needs_total_steps = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.t, self.mu, self.sigma2, self.sam_steps = 0, 0.0, 0.0, 0

    def step(self, batches, passes):
        params, layout, cfg = self.params, self.layout, self.config
        zero_grads(params)
        loss = run_batches(passes, batches, clean=True)
        layout.all_reduce_grads(params)
        scale = passes.loss_scale()
        norm = layout.norm(p.grad.float() for p in params if p.grad is not None)  # one tensor at a time
        s = (float(norm) / scale) ** 2 if norm is not None else 0.0
        sam = False
        if math.isfinite(s):
            total = self.progress.total_steps or 1
            self.mu = cfg.delta * self.mu + (1.0 - cfg.delta) * s
            self.sigma2 = cfg.delta * self.sigma2 + (1.0 - cfg.delta) * (s - self.mu) ** 2
            sam = s >= self.mu + threshold_coef(self.t, total, cfg.lam1, cfg.lam2) * math.sqrt(self.sigma2)
        metrics = {"sam/active": float(sam), "sam/sq_grad_norm": s}
        if sam:
            saved = backup(params)
            _, applied, ascent_norm = self.perturb_([p.grad for p in params], scale)
            if applied:
                zero_grads(params)
                metrics["sam/perturbed_loss"] = run_batches(passes, batches, clean=False)
                restore(params, saved)
                layout.all_reduce_grads(params)
            metrics.update({"sam/ascent_grad_norm": ascent_norm, "sam/skipped_ascent": float(not applied)})
        self.t += 1
        self.sam_steps += int(sam)
        return StepResult(loss, metrics=metrics)

    def state_dict(self):
        return {"t": self.t, "mu": self.mu, "sigma2": self.sigma2, "sam_steps": self.sam_steps}

    def load_state_dict(self, state):
        self.t = int(state.get("t", 0))
        self.mu, self.sigma2 = float(state.get("mu", 0.0)), float(state.get("sigma2", 0.0))
        self.sam_steps = int(state.get("sam_steps", 0))


register_method("aesam", AESAM, AESAMConfig, "AE-SAM: SAM only on steps where ||g||^2 is above its running mean by a "
                "scheduled number of running standard deviations, the base optimizer's step otherwise",
                paper="Jiang et al. 2023",
                examples=(Example("AE-SAM", "rho=0.2,delta=0.9"), Example("AE-SAM (DDP)", "rho=0.2,delta=0.9", 2)))
