"""LookSAM (Liu, Mai, Chen, Hsieh and You, CVPR 2022, Algorithm 1): SAM's gradient every k-th step, and in
between the clean gradient plus the part of SAM's gradient that is orthogonal to it, reused.

Optimizer step t (counted from 0, so the first step is a SAM step), batch B_t, g = grad f(x_t, B_t):

    t mod k == 0:   g_s = grad f(x_t + rho g/||g||, B_t)                                   (SAM; the ascent rule)
                    g_v = g_s - ||g_s|| cos(g, g_s) g/||g||  =  g_s - (<g, g_s>/||g||^2) g  (kept until the next)
                    the base optimizer steps with g_s
    otherwise:      the base optimizer steps with g + alpha (||g|| / ||g_v||) g_v           (one pass)

Norms and the projection are over the whole parameter vector (Algorithm 1; "Look-LayerSAM" is the layer-wise
LAMB variant). pytorch_optimizer's LookSAM projects and rescales per parameter tensor instead, which is not the
paper's rule (0.5 apart after 11 steps in our check); Leminhbinh0209/LookSAM projects globally but its first SAM
step stores the weights instead of the gradient as old_grad, so its g_v of steps 1..k-1 is wrong.

With several processes every gradient is averaged over the ranks first (no DDP code exists from the authors; this
is SAM's global rule, so 1 and N processes agree). A zero or non-finite g at a SAM step gives no perturbation
(g_s = g, so g_v = 0); a g_v of norm zero or not finite adds nothing on the steps that reuse it.

Memory: g_v (one copy, unscaled fp32, kept between steps), and on SAM steps the weight backup (one more, freed
after the step). Cost: (1 + 1/k) passes per step on average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SharpnessConfig, _bad, option
from ..registry import Example, register_method
from ..tensors import backup, restore, take_grads, to_device, zero_grads
from .base import SharpnessMethod, StepResult, run_batches
from .rules import AscentOptions
from .vectors import grads, inner_products


@dataclass
class LookSAMConfig(AscentOptions, SharpnessConfig):
    k: int = option(5, "LookSAM: SAM's gradient every k-th optimizer step, the reused direction in between (SAMPa "
                    "paper, Appendix B.4: k = 5)", example=5)
    alpha: float = option(0.7, "LookSAM: weight of the reused direction, g + alpha ||g||/||g_v|| g_v (Appendix B.4: "
                          "0.7)", example=0.7)

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise _bad("k", self.k, "k must be a whole number >= 1 (k=5: SAM every 5th step; k=1 is SAM)")
        if not self.alpha >= 0:
            raise _bad("alpha", self.alpha, "alpha must be >= 0 (e.g. alpha=0.7)")


class LookSAM(SharpnessMethod):
    extra_copies = 2  # g_v, kept between steps, and the weight backup on SAM steps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.t = 0  # optimizer steps taken (the schedule's counter)
        self.g_v = None  # unscaled fp32, indexed like self.params

    def step(self, batches, passes):
        params, layout, scale = self.params, self.layout, passes.loss_scale()
        zero_grads(params)
        loss = run_batches(passes, batches, clean=True)
        layout.all_reduce_grads(params)
        sam = self.t % self.config.k == 0
        metrics = {"sam/active": float(sam)}
        if sam:
            self.g_v = None  # replaced below: its memory goes back before the perturbed pass allocates .grad
            g = take_grads(params, scale)  # unscaled fp32, .grad's own tensors
            saved = backup(params)
            _, applied, norm = self.perturb_(g)
            if applied:
                zero_grads(params)
                metrics["sam/perturbed_loss"] = run_batches(passes, batches, clean=False)
                restore(params, saved)
                layout.all_reduce_grads(params)
            else:
                self._set(g, scale, copy=True)  # g_s = g
            del saved
            self.g_v = self._orthogonal_part(g, scale)
            metrics.update({"sam/ascent_grad_norm": norm, "sam/skipped_ascent": float(not applied)})
        else:
            self._add_reused(scale)
        self.t += 1
        return StepResult(loss, metrics=metrics)

    @torch.no_grad()
    def _orthogonal_part(self, g, scale: float):
        """g_v = g_s - (<g, g_s>/||g||^2) g, written into g's buffers (g_s is the scaled .grad)."""
        params = self.params
        g_s = grads(params)
        gs_g, g_g = inner_products(self.layout, params, (g, g_s), (g, g))
        coeff = (gs_g / scale / g_g) if float(g_g) > 0 else torch.zeros(())
        out = []
        for u, s in zip(g, g_s):
            if u is None and s is None:
                out.append(None)
                continue
            if u is None:
                u = torch.zeros_like(s, dtype=torch.float32)
            u.mul_(-coeff.to(u.device))
            if s is not None:
                u.add_(s.float(), alpha=1.0 / scale)
            out.append(u)
        return out

    @torch.no_grad()
    def _add_reused(self, scale: float) -> None:
        """.grad <- g + alpha ||g||/||g_v|| g_v (.grad holds g scaled by the loss scale: so does the added term)."""
        if self.g_v is None:
            return
        params = self.params
        norm_g = self.layout.norm(p.grad.float() for p in params if p.grad is not None)  # one tensor at a time
        norm_v = self.layout.norm(v for v in self.g_v if v is not None)
        if norm_g is None or norm_v is None or not bool(torch.isfinite(norm_v)) or float(norm_v) == 0.0:
            return
        coeff = self.config.alpha * norm_g / norm_v  # ||g|| is the scaled .grad's: the term comes out scaled too
        for p, v in zip(params, self.g_v):
            if v is None:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_((v * coeff.to(v.device)).to(p.grad.dtype))

    def _set(self, g, scale: float, copy: bool) -> None:
        with torch.no_grad():
            for p, u in zip(self.params, g):
                p.grad = None if u is None else (u * scale).to(p.dtype) if copy else u.to(p.dtype)

    def state_dict(self):
        return {"t": self.t, "g_v": self.g_v}

    def load_state_dict(self, state):
        self.t = int(state.get("t", 0))
        self.g_v = to_device(state.get("g_v"), self.device)


register_method("looksam", LookSAM, LookSAMConfig, "LookSAM: SAM's gradient every k-th step, its part orthogonal to "
                "the clean gradient reused in between", paper="Liu et al. 2022, Algorithm 1",
                examples=(Example("LookSAM (k=5)", "rho=0.05,k=5,alpha=0.7"),
                          # the memory meter measures steps 3-5: with k = 2 a SAM step (backup and g_v) is among them
                          Example("LookSAM (k=2)", "rho=0.05,k=2,alpha=0.7", bench=False),
                          Example("LookSAM (k=5, DDP)", "rho=0.05,k=5,alpha=0.7", 2)))
