"""GSAM (Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan and Liu, ICLR 2022, "Surrogate gap guided
sharpness-aware minimization", Algorithm 1).

One step on batch B, base optimizer O at learning rate lr_t:

    rho_t  = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)      (rho is rho_max; rho_t = rho when
                                                                                 lr_max = lr_min)
    g      = grad f(x, B);   g_p = grad f(x + rho_t g/||g||, B)                 (SAM's perturbed gradient)
    g_perp = g - (<g, g_p>/||g_p||^2) g_p                                       (the clean gradient's part
                                                                                 orthogonal to g_p)
    O steps with  g_p - alpha g_perp

Sign (official code, big_vision `gsam_gradient` with minimize_fp=True and the PyTorch port's
`gradient_decompose`): x moves by +lr alpha g_perp, which lowers the surrogate gap h = f(x + e) - f(x), whose
gradient g_p - g has orthogonal part -g_perp, without changing f(x + e) to first order. alpha = 0 is SAM.
rho_t follows the learning rate linearly and is not clipped (during a warmup from 0, lr_t < lr_min gives
rho_t < rho_min); lr_t is the base optimizer's current learning rate (its first parameter group), the one this
step is taken with; lr_max is the schedule's peak (`lr_max=0`: the `initial_lr` torch's schedulers record, the
configured learning rate), lr_min its final value (0 for Hugging Face's linear and cosine schedules).

Several processes: by default g and g_p are each averaged over the ranks before the decomposition (GSAM on the
global batch, so 1 and N processes agree, as sam_hf's SAM). The authors perturb and decompose per worker and
average the final gradient afterwards (big_vision: "g_gsam is not averaged across workers"; the PyTorch port uses
DDP's no_sync): `sync_ascent=false` does that (refused where every backward averages over the ranks, FSDP2).

Defaults: the SAMPa paper does not run GSAM. alpha = 0.4 is the PyTorch port's example (juntang-zhuang/GSAM); the
official ViT-B/32 ImageNet configuration (big_vision vit_i1k_gsam_no_aug.py) uses rho_max 0.6, rho_min 0.1,
alpha 0.6, lr_min = 0.01 lr_max. rho = 0.05 as sam_hf's SAM, rho_min = 0: rho_t proportional to the learning
rate under a schedule that decays to 0, constant under a constant schedule.

Memory: the weight backup and g (two copies; g_p is `.grad`). Cost: two passes, as SAM, and three inner products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SharpnessConfig, SharpnessConfigError, _bad, option
from ..registry import Example, register_method
from ..tensors import backup, restore, take_grads, zero_grads
from .base import SharpnessMethod, StepResult, run_batches
from .rules import AscentOptions
from .vectors import grads, inner_products


@dataclass
class GSAMConfig(AscentOptions, SharpnessConfig):
    rho: float = option(0.05, "GSAM's rho_max: the radius at the schedule's peak learning rate lr_max")
    rho_min: float = option(0.0, "GSAM's rho_min: the radius at the learning rate lr_min (rho_t is linear in the "
                            "learning rate between the two)", example=0.01)
    alpha: float = option(0.4, "GSAM's alpha: the base optimizer steps with g_p - alpha g_perp, g_perp the clean "
                          "gradient's part orthogonal to the perturbed gradient g_p (alpha = 0 is SAM)", example=0.4)
    lr_max: float = option(0.0, "GSAM: the learning rate at which rho_t = rho (0: the base optimizer's initial "
                           "learning rate, the schedule's peak)", example=1e-3)
    lr_min: float = option(0.0, "GSAM: the learning rate at which rho_t = rho_min (0: where Hugging Face's linear "
                           "and cosine schedules end)", example=0.0)
    sync_ascent: bool = option(True, "several processes: decompose the gradients averaged over the ranks (GSAM on "
                               "the global batch); false perturbs and decomposes per rank as the authors' code does, "
                               "averaging the final gradient", example="false")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.rho_min <= self.rho:
            raise _bad("rho_min", self.rho_min, f"rho_min must be in [0, rho={self.rho}] (e.g. rho_min=0.01)")
        if not self.alpha >= 0:
            raise _bad("alpha", self.alpha, "alpha must be >= 0 (e.g. alpha=0.4; 0 is SAM)")
        if self.lr_max < 0 or self.lr_min < 0:
            raise _bad("lr_max" if self.lr_max < 0 else "lr_min", min(self.lr_max, self.lr_min),
                       "learning rates must be >= 0")
        if self.lr_max and self.lr_min > self.lr_max:
            raise _bad("lr_min", self.lr_min, f"lr_min must be <= lr_max={self.lr_max}")


def proportional_rho(lr: float, lr_max: float, lr_min: float, rho_max: float, rho_min: float) -> float:
    """rho_t = rho_min + (rho_max - rho_min)(lr - lr_min)/(lr_max - lr_min); rho_max where lr_max == lr_min."""
    if lr_max == lr_min:
        return rho_max
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)


class GSAM(SharpnessMethod):
    extra_copies = 2  # the weight backup and g, alive through the perturbed pass

    @classmethod
    def check(cls, config, layout, samples_per_rank=None) -> None:
        if not config.sync_ascent and layout.reduces_every_pass:
            raise SharpnessConfigError(
                f"optim_args: sync_ascent=false (each rank perturbs and decomposes its own gradients) does not run "
                f"under {layout.describe()}: every backward pass averages the gradients over the ranks. Drop "
                "sync_ascent (GSAM on the global batch)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_max = self.config.lr_max or None  # read from the optimizer at the first step where not given

    def rho_t(self) -> float:
        group = self.optimizer.param_groups[0]
        lr = float(group["lr"])
        if self.lr_max is None:
            self.lr_max = float(group.get("initial_lr", lr))
        cfg = self.config
        return proportional_rho(lr, self.lr_max, cfg.lr_min, cfg.rho, cfg.rho_min)

    def step(self, batches, passes):
        params, layout, cfg = self.params, self.layout, self.config
        scale = passes.loss_scale()
        zero_grads(params)
        loss = run_batches(passes, batches, clean=True)
        if cfg.sync_ascent:
            layout.all_reduce_grads(params)
        rho = self.rule.rho = self.rho_t()
        g = take_grads(params, scale)  # unscaled fp32, .grad's own tensors
        saved = backup(params)
        _, applied, norm = self.perturb_(g)
        metrics = {"sam/rho": rho, "sam/ascent_grad_norm": norm, "sam/skipped_ascent": float(not applied)}
        if applied:
            zero_grads(params)
            metrics["sam/perturbed_loss"] = run_batches(passes, batches, clean=False)
            restore(params, saved)
            del saved
            if cfg.sync_ascent:
                layout.all_reduce_grads(params)
            self._combine(g, scale)
        else:  # g_p = g, so g_perp = 0: the step is g
            del saved
            with torch.no_grad():
                for p, u in zip(params, g):
                    p.grad = None if u is None else (u.mul_(scale) if scale != 1.0 else u).to(p.dtype)
        if not cfg.sync_ascent:
            layout.all_reduce_grads(params)
        return StepResult(loss, metrics=metrics)

    @torch.no_grad()
    def _combine(self, g, scale: float) -> None:
        """.grad (g_p, scaled) <- g_p - alpha g_perp = (1 + alpha c) g_p - alpha g, c = <g, g_p>/||g_p||^2."""
        params, alpha = self.params, self.config.alpha
        g_p = grads(params)
        dot, pp = inner_products(self.layout, params, (g, g_p), (g_p, g_p))  # <g, g_p> s, ||g_p||^2 s^2
        c = dot * scale / pp if float(pp) > 0 else torch.zeros(())  # in unscaled units
        for p, u in zip(params, g):
            if p.grad is None and u is None:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_((1.0 + alpha * c).to(p.grad.device, p.grad.dtype))
            if u is not None:
                p.grad.sub_((u * (alpha * scale)).to(p.grad.dtype))

    def state_dict(self):
        return {"lr_max": self.lr_max}

    def load_state_dict(self, state):
        self.lr_max = state.get("lr_max", self.lr_max)


register_method("gsam", GSAM, GSAMConfig, "GSAM: SAM's perturbed gradient minus alpha times the clean gradient's part "
                "orthogonal to it, with rho following the learning-rate schedule",
                paper="Zhuang et al. 2022, Algorithm 1",
                examples=(Example("GSAM", "rho=0.05,alpha=0.4"), Example("GSAM (DDP)", "rho=0.05,alpha=0.4", 2)))
