"""SAMPa-lambda (Xie et al., 2024, Algorithms 1 and 2): SAM whose two gradients are independent.

The step that updates x_t uses the held batch B_t and the new batch B_{t+1}:

    x~_t    = x_t + rho g_t / ||g_t||            g~_t    = grad f(x~_t, B_t)
    y_{t+1} = ModelUpdate_{m_t}(x_t, g_t)        g_{t+1} = grad f(y_{t+1}, B_{t+1})
    G_t     = (1 - lambda) g~_t + lambda g_{t+1}  x_{t+1}, m_{t+1} = O.step(x_t, G_t)

A term whose weight is 0 is not computed into G: lambda = 0 steps with g~_t
alone (g_{t+1} is still needed as the next g_t), lambda = 1 with g_{t+1} alone
(g~_t is not computed at all).

Both gradients depend only on g_t (from the previous step), never on each
other: with two processes they run at the same time (see `parallel.py`).
ModelUpdate is the base optimizer's own step, in closed form (`lookahead.py`),
fed g_t clipped as Trainer clips the final gradient.

Trainer hands one batch per step, so the first step only computes
g_0 = grad f(x_0, B_0) (y_0 = x_0) and leaves x, the optimizer state and the
learning-rate schedule unchanged; it still counts as a Trainer step (logged as
`sam/skipped_update`), so the k-th update runs at Trainer step k + 1 with the
schedule's k-th learning rate. The reported `loss` is
f(y_{t+1}, B_{t+1}), the loss at the lookahead point (at x_0 on the first step).

Memory: g_t, the weight backup and g~_t (three copies of the trainable weights).
"""

from __future__ import annotations

import torch

from ..batching import TrainerBatch
from ..lookahead import apply_lookahead_
from .base import (SharpnessMethod, StepResult, as_tensor, backup, global_norm, grads_fp32, restore,
                   run_batches, to_device, zero_grads)


def _count(batch):
    """The batch's `num_items_in_batch` (Trainer's loss normaliser for its accumulation cycle), if any."""
    return getattr(batch, "num_items_in_batch", None)


def _all_finite(tensors) -> bool:
    """One device sync for the whole list, not one per parameter."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def _set_grads(params, grads, scale: float) -> None:
    """.grad <- grads * scale (in the parameter's dtype); None stays None."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                p.grad = None
                continue
            out = (g * scale if scale != 1.0 else g).to(p.dtype)
            p.grad = out.clone() if out is g else out  # .grad must not alias the method's own buffers


class SAMPa(SharpnessMethod):
    name = "sampa"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.g: list[torch.Tensor | None] | None = None  # g_t, unscaled fp32
        self.held: list[dict] | None = None  # B_t

    # ---- the two independent halves ------------------------------------
    def perturbed_grad(self, passes):
        """g~_t = grad f(x_t + rho g_t/||g_t||, B_t), left in .grad. Returns (loss, applied, ||g_t||)."""
        params = self.params
        zero_grads(params)
        saved = backup(params)
        applied, norm = self.perturb_(self.g, 1.0)
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
            grads = {p: t for p, t in zip(self.params, self.g) if t is not None}
            apply_lookahead_(self.optimizer, grads, self.config.lookahead, grad_scale=self._clip_coef())
        loss = run_batches(passes, batches, clean=True)
        if saved is not None:
            restore(params, saved)
        return loss

    def _clip_coef(self) -> float:
        """Trainer's clipping of g_t, as torch.nn.utils.clip_grad_norm_ computes it (applied per parameter)."""
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return 1.0
        norm = global_norm(t for t in self.g if t is not None)
        if norm is None:
            return 1.0
        return torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)

    # ---- one Trainer step ------------------------------------------------
    EXTRA_KEYS = ("loss", "perturbed_loss", "applied", "ascent_grad_norm")

    def role_pass(self, role: int, batches, passes) -> dict:
        """Role 0: g~_t on the held batch; role 1: g_{t+1} on the new one (g_0 on the first step)."""
        if role == 0:
            zero_grads(self.params)
            if self.g is None or self.config.lam == 1.0:  # first step: nothing to perturb; lam = 1: not used
                return {}
            loss, applied, norm = self.perturbed_grad(passes)
            return {"perturbed_loss": loss, "applied": float(applied), "ascent_grad_norm": norm}
        finite = self.g is not None and _all_finite(self.g)
        return {"loss": self.lookahead_grad(batches, passes, finite_g=finite)}

    def step(self, batches, passes):
        scale = passes.loss_scale()
        extras = self.role_pass(0, batches, passes)
        passes.all_reduce_grads(self.params)
        g_tilde = grads_fp32(self.params, scale)
        extras.update(self.role_pass(1, batches, passes))
        passes.all_reduce_grads(self.params)
        return self.finish(g_tilde, grads_fp32(self.params, scale), batches, extras, scale)

    def finish(self, g_tilde, g_next, batches, extras, scale) -> StepResult:
        """G_t = (1 - lam) g~_t + lam g_{t+1} into .grad (scaled); g_t <- g_{t+1}; B_t <- B_{t+1}."""
        params, lam = self.params, self.config.lam
        loss = as_tensor(extras.get("loss", 0.0), self.device)
        first, self.g = self.g is None, None  # g_t is spent: free it before building G
        if first:  # keep g_0, leave x and the optimizer state alone
            if _all_finite(g_next):
                self.g, self.held = g_next, list(batches)
                _set_grads(params, [None if t is None else torch.zeros_like(t) for t in g_next], 1.0)
            else:  # an overflow: hand it on so a GradScaler backs off; the next step is a first step again
                _set_grads(params, g_next, scale)
            return StepResult(loss, skip_update=True, metrics={"sam/perturbed_loss": loss, "sam/skipped_update": 1.0})
        if lam in (0.0, 1.0):  # a term whose weight is 0 is not computed into G (0 * inf would be NaN)
            _set_grads(params, g_tilde if lam == 0.0 else g_next, scale)  # copies: .grad never aliases g_t
            self.g, self.held = g_next, list(batches)
            return StepResult(loss, metrics=self._metrics(extras))
        combined, dots, sq_a, sq_b = [], [], [], []
        with torch.no_grad():
            for gt, gn in zip(g_tilde, g_next):
                if gt is not None and gn is not None:
                    dots.append((gt * gn).sum())
                    sq_a.append(gt.pow(2).sum())
                    sq_b.append(gn.pow(2).sum())
                    combined.append(gt.mul_(1 - lam).add_(gn, alpha=lam))  # in place: g~_t is not needed again
                else:
                    combined.append(None if gt is None and gn is None else (1 - lam) * gt if gn is None else lam * gn)
        _set_grads(params, combined, scale)
        self.g, self.held = g_next, list(batches)
        cosine = (torch.stack(dots).sum() / (torch.stack(sq_a).sum() * torch.stack(sq_b).sum()).sqrt().clamp_min(1e-30)
                  if dots else torch.zeros(()))
        return StepResult(loss, metrics={**self._metrics(extras), "sam/grad_cosine": cosine})

    def _metrics(self, extras) -> dict:
        if self.config.lam == 1.0:  # no perturbed pass
            return {}
        return {"sam/perturbed_loss": as_tensor(extras.get("perturbed_loss", 0.0), self.device),
                "sam/ascent_grad_norm": as_tensor(extras.get("ascent_grad_norm", 0.0), self.device),
                "sam/skipped_ascent": 1.0 - float(extras.get("applied", 0.0))}

    # ---- checkpointing ------------------------------------------------------
    def state_dict(self):
        held = None if self.held is None else [dict(b) for b in self.held]
        counts = None if self.held is None else [_count(b) for b in self.held]
        steps = None if self.held is None else [getattr(b, "accumulation_steps", None) for b in self.held]
        return {"g": self.g, "held": held, "held_num_items": counts, "held_accumulation_steps": steps}

    def load_state_dict(self, state):
        device = self.device
        self.g = to_device(state.get("g"), device)
        self.held = None
        if state.get("held") is not None:
            counts = state.get("held_num_items") or [None] * len(state["held"])
            steps = state.get("held_accumulation_steps") or [None] * len(state["held"])
            self.held = [TrainerBatch.of(b, to_device(c, device), n)
                         for b, c, n in zip(to_device(state["held"], device), counts, steps)]
