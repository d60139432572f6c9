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

Memory, beyond the base optimizer's own: one copy more than SAM's (its weight
backup): g_t, kept from one step to the next. In role mode each rank's pass
writes x's backup into g_t's buffers as it consumes them (`perturb_keeping_x`,
`apply_lookahead_(keep_x=True)`), and after the pass those buffers receive
the other role's gradient; in one process the lookahead pass runs first, its
backup serves the perturbed pass too, and g_t is freed once the perturbation
has used it. The step's two gradients are `.grad`'s own tensors, handed over
without copies, and G is combined in place in g~_t's.
"""

from __future__ import annotations

import torch

from ..batching import TrainerBatch
from .. import sharding
from ..lookahead import apply_lookahead_
from ..parallel import take_grads
from .base import (SharpnessMethod, StepResult, _direction, _etas, as_tensor, ascent_norm, backup, global_norm,
                   restore, run_batches, to_device, zero_grads)


COMBINE_CHUNK = 262144  # elements: G and the cosine's three dot products, chunk by chunk on a CPU


def _count(batch):
    """The batch's `num_items_in_batch` (Trainer's loss normaliser for its accumulation cycle), if any."""
    return getattr(batch, "num_items_in_batch", None)


def _all_finite(tensors) -> bool:
    """One device sync for the whole list, not one per parameter; over all shards under FSDP2 (one collective).

    Plain tensors take a fast exact path: a finite sum proves every element finite (one inf or nan element makes
    any sum non-finite), so only a sum that overflows is checked element by element."""
    tensors = [t for t in tensors if t is not None]
    if not tensors or any(sharding.is_sharded(t) for t in tensors):
        return sharding.all_finite(tensors)
    total = torch.stack([t.sum().to(tensors[0].device, torch.float32) for t in tensors]).sum()
    return bool(torch.isfinite(total)) or sharding.all_finite(tensors)


@torch.no_grad()
def perturb_keeping_x(method: SharpnessMethod, directions) -> tuple[list[torch.Tensor], bool, torch.Tensor]:
    """`method.perturb_(directions, 1.0)` (x <- x + rho d/||d||, ASAM's T included, the same arithmetic), with
    x's backup written into each direction's own buffer once its step is computed: the directions are consumed,
    and the backup costs no new memory. Returns (backup, applied, norm)."""
    params, cfg = method.params, method.config
    norm = ascent_norm(params, directions, 1.0, cfg, method.rescaled)
    applied = bool(torch.isfinite(norm)) and float(norm) != 0.0
    coeff = cfg.rho / norm if applied else None
    saved = []
    for p, d, eta in zip(params, directions, _etas(params, cfg, method.rescaled)):
        x = p.detach()
        step = None
        if applied and d is not None:
            e = _direction(p, d, 1.0, eta)
            if eta is not None:
                e = e * (x.float().abs() + eta)  # T^2 d = T (T d)
            step = (e * coeff.to(e.device)).to(p.dtype)
            del e
        reuse = d is not None and d.dtype == x.dtype and d.shape == x.shape and d.is_contiguous() and x.is_contiguous()
        saved.append(d.copy_(x) if reuse else x.clone())
        if step is not None:
            p.add_(step)
    return saved, applied, norm


def _set_grads(params, grads, scale: float) -> None:
    """.grad <- grads * scale (in the parameter's dtype); None stays None. `grads` are the caller's to give away:
    fp32 ones become `.grad` as they are, rescaled in place (the method must not keep them)."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None and scale != 1.0:
                g.mul_(scale)
            p.grad = None if g is None else g.to(p.dtype)


class SAMPa(SharpnessMethod):
    name = "sampa"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.g: list[torch.Tensor | None] | None = None  # g_t, unscaled fp32
        self.held: list[dict] | None = None  # B_t
        self._spent: list[torch.Tensor | None] | None = None  # role mode: g_t's buffers, for the exchange
        self._x_saved: list[torch.Tensor] | None = None  # one process: x, backed up by the lookahead pass

    # ---- the two independent halves ------------------------------------
    def perturbed_grad(self, passes):
        """g~_t = grad f(x_t + rho g_t/||g_t||, B_t), left in .grad. Returns (loss, applied, ||g_t||)."""
        params = self.params
        zero_grads(params)
        saved, self._x_saved = self._x_saved, None
        if saved is not None:  # one process: the lookahead pass backed x up and restored it
            applied, norm = self.perturb_(self.g, 1.0)
        elif self.role_parallel:  # g_t's buffers take x's backup as the perturbation consumes them
            saved, applied, norm = perturb_keeping_x(self, self.g)
        else:
            saved = backup(params)
            applied, norm = self.perturb_(self.g, 1.0)
        self.g = None  # g_t has done its work (in one process the lookahead pass ran first)
        loss = run_batches(passes, self.held, clean=False)  # BatchNorm statistics come from the lookahead pass
        restore(params, saved)
        if self.role_parallel:  # the backup's buffers (g_t's) receive the other role's gradient
            self._spent = saved
        return loss, applied, norm

    def lookahead_grad(self, batches, passes, finite_g: bool):
        """g_{t+1} = grad f(ModelUpdate(x_t, g_t), B_{t+1}), left in .grad. Returns the loss."""
        params = self.params
        zero_grads(params)
        saved = None
        if finite_g:
            grads = {p: t for p, t in zip(self.params, self.g) if t is not None}
            if self.role_parallel:  # the perturbation is the other role's: g_t's buffers take x's backup
                kept = apply_lookahead_(self.optimizer, grads, self.config.lookahead, grad_scale=self._clip_coef(),
                                        keep_x=True)
                saved = [kept[p] if p in kept else p.detach().clone() for p in params]
                self.g = None
            else:  # one process: g_t is still to perturb with; this backup serves the perturbed pass too
                saved = backup(params)
                apply_lookahead_(self.optimizer, grads, self.config.lookahead, grad_scale=self._clip_coef())
            del grads
        if self.role_parallel:
            self._spend_g()
        loss = run_batches(passes, batches, clean=True)
        if saved is not None:
            restore(params, saved)
            if self.role_parallel:  # the backup's buffers (g_t's) receive the other role's gradient
                self._spent = saved
            else:
                self._x_saved = saved
        return loss

    def _spend_g(self) -> None:
        """g_t is not needed again this step: in role mode its buffers receive the other role's gradient
        (`receive_buffers`), in one process they are freed before the perturbed backward pass."""
        if self.role_parallel and self.g is not None:
            self._spent = self.g
        self.g = None

    def receive_buffers(self) -> list[torch.Tensor | None] | None:
        """The spent g_t's buffers, handed to `parallel.exchange` to receive the other role's gradient into."""
        out, self._spent = self._spent, None
        return out

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
                self._spend_g()
                return {}
            loss, applied, norm = self.perturbed_grad(passes)
            return {"perturbed_loss": loss, "applied": float(applied), "ascent_grad_norm": norm}
        finite = self.g is not None and _all_finite(self.g)
        return {"loss": self.lookahead_grad(batches, passes, finite_g=finite)}

    def step(self, batches, passes):
        """One process: the two passes in turn, the lookahead pass first, so that g_t, which the perturbation
        still needs, is freed before the perturbed backward pass (SAM's backup plus one copy at the peak)."""
        scale = passes.loss_scale()
        extras = self.role_pass(1, batches, passes)
        passes.all_reduce_grads(self.params)
        g_next = take_grads(self.params, scale)  # no copy: .grad's own tensors, unscaled in place
        extras.update(self.role_pass(0, batches, passes))
        passes.all_reduce_grads(self.params)
        return self.finish(take_grads(self.params, scale), g_next, batches, extras, scale)

    def finish(self, g_tilde, g_next, batches, extras, scale) -> StepResult:
        """G_t = (1 - lam) g~_t + lam g_{t+1} into .grad (scaled); g_t <- g_{t+1}; B_t <- B_{t+1}.

        `g_tilde` and `g_next` are unscaled fp32 and this method's to keep or give away (`take_grads`, the
        exchange): G is combined in place in g~_t's buffers, which become `.grad`; g_{t+1}'s become g_t."""
        params, lam = self.params, self.config.lam
        loss = as_tensor(extras.get("loss", 0.0), self.device)
        first = self.g is None and self.held is None
        self.g = self._spent = self._x_saved = None  # whatever is left of g_t is freed before G is built
        if first:  # keep g_0, leave x and the optimizer state alone
            if _all_finite(g_next):
                self.g, self.held = g_next, list(batches)
                _set_grads(params, [None if t is None else torch.zeros_like(t) for t in g_next], 1.0)
            else:  # an overflow: hand it on so a GradScaler backs off; the next step is a first step again
                _set_grads(params, g_next, scale)
            return StepResult(loss, skip_update=True, metrics={"sam/perturbed_loss": loss, "sam/skipped_update": 1.0})
        if lam == 0.0:  # a term whose weight is 0 is not computed into G (0 * inf would be NaN)
            _set_grads(params, g_tilde, scale)
        elif lam == 1.0:  # G = g_{t+1}, which is also the next g_t: .grad gets a copy
            del g_tilde
            _set_grads(params, [None if t is None else t.clone() for t in g_next], scale)
        else:
            combined, dots, sq_a, sq_b, plain = [], [], [], [], []
            with torch.no_grad():
                for gt, gn in zip(g_tilde, g_next):
                    if gt is not None and gn is not None:
                        a, b = sharding.local(gt), sharding.local(gn)  # this rank's shard
                        # in place: g~_t is not needed again. On a CPU, chunk by chunk (the same bits): the three
                        # dot products and the combine then read each chunk from cache
                        step = COMBINE_CHUNK if a.device.type == "cpu" and a.is_contiguous() and b.is_contiguous() \
                            else max(a.numel(), 1)
                        a, b = a.reshape(-1), b.reshape(-1)
                        for s in range(0, a.numel(), step):
                            ac, bc = a[s:s + step], b[s:s + step]
                            plain.append(not sharding.is_sharded(gt))
                            dots.append(torch.dot(ac, bc))
                            sq_a.append(torch.dot(ac, ac))
                            sq_b.append(torch.dot(bc, bc))
                            if step != a.numel():
                                ac.mul_(1 - lam).add_(bc, alpha=lam)
                        combined.append(gt if step != a.numel() else gt.mul_(1 - lam).add_(gn, alpha=lam))
                    else:
                        combined.append(None if gt is None and gn is None else gt.mul_(1 - lam) if gn is None
                                        else lam * gn)
            del g_tilde
            _set_grads(params, combined, scale)
        self.g, self.held = g_next, list(batches)
        metrics = self._metrics(extras)
        if 0.0 < lam < 1.0:
            # over the shards under FSDP2 (a parameter FSDP left unsharded counted once)
            dot, sq_a, sq_b = sharding.totals(dots, sq_a, sq_b, like=params, replicated=plain)
            metrics["sam/grad_cosine"] = dot / (sq_a * sq_b).sqrt().clamp_min(1e-30) if dots else torch.zeros(())
        return StepResult(loss, metrics=metrics)

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
        self.held = self._spent = self._x_saved = None
        if state.get("held") is not None:
            counts = state.get("held_num_items") or [None] * len(state["held"])
            steps = state.get("held_accumulation_steps") or [None] * len(state["held"])
            self.held = [TrainerBatch.of(b, to_device(c, device), n)
                         for b, c, n in zip(to_device(state["held"], device), counts, steps)]
