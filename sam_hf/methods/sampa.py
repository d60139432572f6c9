"""SAMPa-lambda (Xie et al., 2024, Algorithms 1 and 2): SAM whose two gradients are independent.

The step that updates x_t uses the held batch B_t and the new batch B_{t+1}:

    x~_t    = x_t + rho g_t / ||g_t||            g~_t    = grad f(x~_t, B_t)
    y_{t+1} = ModelUpdate_{m_t}(x_t, g_t)        g_{t+1} = grad f(y_{t+1}, B_{t+1})
    G_t     = (1 - lambda) g~_t + lambda g_{t+1}  x_{t+1}, m_{t+1} = O.step(x_t, G_t)

Both gradients depend only on g_t (from the previous step), never on each
other: with two processes they run at the same time (see `parallel.py`).
ModelUpdate is the base optimizer's own step, in closed form (`lookahead.py`),
fed g_t clipped as Trainer clips the final gradient.

Trainer hands one batch per step, so the first step only computes
g_0 = grad f(x_0, B_0) (y_0 = x_0) and leaves x and the optimizer state
unchanged; it still counts as a Trainer step. The reported `loss` is
f(y_{t+1}, B_{t+1}), the loss at the lookahead point (at x_0 on the first step).

Memory: g_t, the weight backup and g~_t (three copies of the trainable weights).
"""

from __future__ import annotations

import torch

from ..batching import TrainerBatch
from ..lookahead import apply_lookahead_
from .base import (SharpnessMethod, StepResult, backup, grads_fp32, perturb_, restore, run_batches,
                   zero_grads)


def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def _count(batch):
    """The batch's `num_items_in_batch` (Trainer's loss normaliser for its accumulation cycle), if any."""
    return getattr(batch, "num_items_in_batch", None)


class SAMPa(SharpnessMethod):
    name = "sampa"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.g: list[torch.Tensor | None] | None = None  # g_t, unscaled fp32
        self.held: list[dict] | None = None  # B_t

    # ---- the two independent halves ------------------------------------
    def perturbed_grad(self, passes, scale):
        """g~_t = grad f(x_t + rho g_t/||g_t||, B_t), left in .grad. Returns (loss, applied, ||g_t||)."""
        params = self.params
        zero_grads(params)
        saved = backup(params)
        applied, norm = perturb_(params, self.g, 1.0, self.config)
        loss = run_batches(passes, self.held, clean=False)  # BatchNorm statistics come from the lookahead pass
        restore(params, saved)
        return loss, applied, norm

    def lookahead_grad(self, batches, passes, finite_g: bool):
        """g_{t+1} = grad f(ModelUpdate(x_t, g_t), B_{t+1}), left in .grad. Returns the loss."""
        params = self.params
        zero_grads(params)
        saved = None
        if finite_g:
            saved = backup(params)
            apply_lookahead_(self.optimizer, self._clipped_g(), self.config.lookahead)
        loss = run_batches(passes, batches, clean=True)
        if saved is not None:
            restore(params, saved)
        return loss

    def _clipped_g(self) -> dict:
        g = {p: gi for p, gi in zip(self.params, self.g) if gi is not None}
        if self.max_grad_norm and self.max_grad_norm > 0 and g:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g.values()]))
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
            g = {p: t * coef for p, t in g.items()}
        return g

    # ---- one Trainer step ------------------------------------------------
    def step(self, batches, passes):
        params, lam = self.params, self.config.lam
        scale = passes.loss_scale()
        if self.g is None:
            return self._first_step(batches, passes, scale)

        perturbed_loss, applied, norm = self.perturbed_grad(passes, scale)
        passes.all_reduce_grads(params)
        g_tilde = [p.grad for p in params]
        loss = self.lookahead_grad(batches, passes, finite_g=bool(torch.isfinite(norm)))
        passes.all_reduce_grads(params)
        return self._combine(g_tilde, batches, scale, loss, perturbed_loss, applied, norm)

    def _combine(self, g_tilde, batches, scale, loss, perturbed_loss, applied, norm):
        """G_t = (1 - lam) g~_t + lam g_{t+1} into .grad (scaled); g_t <- g_{t+1}; B_t <- B_{t+1}."""
        lam = self.config.lam
        dots, sq_a, sq_b = [], [], []
        with torch.no_grad():
            for i, (p, gt) in enumerate(zip(self.params, g_tilde)):
                g_next = None if p.grad is None else p.grad.float() / scale
                self.g[i] = g_next
                if gt is not None and g_next is not None:
                    gt32 = gt.float() / scale
                    dots.append((gt32 * g_next).sum())
                    sq_a.append(gt32.pow(2).sum())
                    sq_b.append(g_next.pow(2).sum())
                    p.grad.copy_(((1 - lam) * gt32 + lam * g_next).mul_(scale))
                elif gt is not None:
                    p.grad = gt.mul(1 - lam)
                elif p.grad is not None:
                    p.grad.mul_(lam)
        cosine = (torch.stack(dots).sum() / (torch.stack(sq_a).sum().sqrt() * torch.stack(sq_b).sum().sqrt()).clamp_min(1e-30)
                  if dots else torch.zeros(()))
        self.held = list(batches)
        return StepResult(loss, metrics={
            "sam/perturbed_loss": perturbed_loss, "sam/ascent_grad_norm": norm,
            "sam/skipped_ascent": float(not applied), "sam/grad_cosine": cosine,
        })

    def _first_step(self, batches, passes, scale):
        params = self.params
        zero_grads(params)
        loss = run_batches(passes, batches, clean=True)
        passes.all_reduce_grads(params)
        g0 = grads_fp32(params, scale)
        if all(g is None or bool(torch.isfinite(g).all()) for g in g0):
            self.g, self.held = g0, list(batches)
            for p in params:  # zeros, not None, so a GradScaler still records its (empty) inf check
                if p.grad is not None:
                    p.grad.zero_()
        # else: .grad keeps the overflow so a GradScaler backs off; the next step is a first step again
        return StepResult(loss, skip_update=True, metrics={"sam/perturbed_loss": loss})

    # ---- checkpointing ------------------------------------------------------
    def state_dict(self):
        held = None if self.held is None else [dict(b) for b in self.held]
        counts = None if self.held is None else [_count(b) for b in self.held]
        return {"g": self.g, "held": held, "held_num_items": counts}

    def load_state_dict(self, state):
        device = self.params[0].device if self.params else torch.device("cpu")
        self.g = _to_device(state.get("g"), device)
        self.held = None
        if state.get("held") is not None:
            counts = state.get("held_num_items") or [None] * len(state["held"])
            self.held = [TrainerBatch.of(b, _to_device(c, device)) for b, c in zip(_to_device(state["held"], device), counts)]
