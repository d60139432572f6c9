"""SAMPa-lambda (Xie et al., 2024, Algorithms 1 and 2): SAM whose two gradients are independent.

The step that updates x_t uses the held batch B_t and the new batch B_{t+1}:

    x~_t    = x_t + rho g_t / ||g_t||            g~_t    = grad f(x~_t, B_t)   (the ascent rule:
    y_{t+1} = ModelUpdate_{m_t}(x_t, g_t)        g_{t+1} = grad f(y_{t+1}, B_{t+1})    ASAM's T with
    G_t     = (1 - lambda) g~_t + lambda g_{t+1}  x_{t+1}, m_{t+1} = O.step(x_t, G_t)   adaptive=true)

A term whose weight is 0 is not computed into G: lambda = 0 steps with g~_t
alone (g_{t+1} is still needed as the next g_t), lambda = 1 with g_{t+1} alone
(g~_t is not computed at all).

Both gradients depend only on g_t (from the previous step), never on each
other: with two processes they run at the same time (the role-parallel layout, distributed/layouts/roles.py).
ModelUpdate is the base optimizer's own step, in closed form (methods/lookahead.py),
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

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..batching import TrainerBatch
from ..config import RoleOptions, SharpnessConfig, SharpnessConfigError, _bad, option
from ..registry import Example, register_method
from ..tensors import as_tensor, backup, restore, set_grads, take_grads, to_device, zero_grads
from . import lookahead
from .base import StepResult, TwoRoleMethod, run_batches
from .rules import AscentOptions

COMBINE_CHUNK = 262144  # elements: G and the cosine's three dot products, chunk by chunk on a CPU
LOOKAHEAD_BASES = ("adamw_torch", "adamw_torch_fused", "sgd")  # base optimizers lookahead=optimizer is tested with


@dataclass
class SAMPaConfig(RoleOptions, AscentOptions, SharpnessConfig):
    lam: float = option(0.2, "SAMPa's lambda in G = (1 - lambda) g~_t + lambda g_(t+1), in [0, 1] (SAMPa-0.2: "
                        "the papers' choice, with twice SAM's rho)", example=0.2)
    lookahead: str = option("optimizer", "SAMPa's ModelUpdate: optimizer (the base optimizer's own step, closed "
                            "form for AdamW/Adam/SGD) or sgd (y = x - lr g, any base)", choices=("optimizer", "sgd"))

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.lam <= 1.0:
            raise _bad("lam", self.lam, "lam must be in [0, 1] (e.g. lam=0.2)")
        if self.lookahead == "optimizer" and self.base not in LOOKAHEAD_BASES:
            raise SharpnessConfigError(
                f"optim_args: lookahead=optimizer has a closed form for base in {list(LOOKAHEAD_BASES)}, "
                f"not base={self.base!r}; use lookahead=sgd (y = x - lr * g) or one of those bases")


def _count(batch):
    """The batch's `num_items_in_batch` (Trainer's loss normaliser for its accumulation cycle), if any."""
    return getattr(batch, "num_items_in_batch", None)


class SAMPa(TwoRoleMethod):
    skips_first_update = True
    extra_copies = 2  # SAM's backup and g_t, kept from one step to the next
    role_names = ("perturbed gradient g~_t", "lookahead gradient g_{t+1}")
    metrics_role = 1  # the lookahead pass on B_{t+1} is the one that counts (B_t counted a step earlier)
    EXTRA_KEYS = ("loss", "perturbed_loss", "applied", "ascent_grad_norm")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.lookahead == "optimizer" and not lookahead.supports(self.optimizer):
            raise SharpnessConfigError(
                f"optim_args: lookahead=optimizer has no closed form for {type(self.optimizer).__name__}; "
                "use lookahead=sgd or an AdamW/Adam/SGD base optimizer")
        self.g: list[torch.Tensor | None] | None = None  # g_t, unscaled fp32
        self.held: list[dict] | None = None  # B_t
        self._x_saved: list[torch.Tensor] | None = None  # one process: x, backed up by the lookahead pass
        self._held_shards: list | None = None  # B_t from every data shard, gathered for a checkpoint

    # ---- the two independent halves ------------------------------------
    def perturbed_grad(self, passes):
        """g~_t = grad f(x_t + rho g_t/||g_t||, B_t), left in .grad. Returns (loss, applied, ||g_t||)."""
        params = self.params
        zero_grads(params)
        saved, self._x_saved = self._x_saved, None
        if saved is not None:  # one process: the lookahead pass backed x up and restored it
            _, applied, norm = self.perturb_(self.g)
        elif self.layout.roles:  # g_t's buffers take x's backup as the perturbation consumes them
            saved, applied, norm = self.perturb_(self.g, keep_x=True)
        else:
            saved = backup(params)
            _, applied, norm = self.perturb_(self.g)
        self.g = None  # g_t has done its work (in one process the lookahead pass ran first)
        loss = run_batches(passes, self.held, clean=False)  # BatchNorm statistics come from the lookahead pass
        restore(params, saved)
        self.spend(saved)  # role mode: the backup's buffers (g_t's) receive the other role's gradient
        return loss, applied, norm

    def lookahead_grad(self, batches, passes, finite_g: bool):
        """g_{t+1} = grad f(ModelUpdate(x_t, g_t), B_{t+1}), left in .grad. Returns the loss."""
        params = self.params
        zero_grads(params)
        saved = None
        if finite_g:
            grads = {p: t for p, t in zip(self.params, self.g) if t is not None}
            if self.layout.roles:  # the perturbation is the other role's: g_t's buffers take x's backup
                kept = lookahead.apply_lookahead_(self.optimizer, grads, self.config.lookahead,
                                                  grad_scale=self._clip_coef(), keep_x=True)
                saved = [kept[p] if p in kept else p.detach().clone() for p in params]
                self.g = None
            else:  # one process: g_t is still to perturb with; this backup serves the perturbed pass too
                saved = backup(params)
                lookahead.apply_lookahead_(self.optimizer, grads, self.config.lookahead, grad_scale=self._clip_coef())
            del grads
        self._spend_g()
        loss = run_batches(passes, batches, clean=True)
        if saved is not None:
            restore(params, saved)
            if self.layout.roles:  # the backup's buffers (g_t's) receive the other role's gradient
                self.spend(saved)
            else:
                self._x_saved = saved
        return loss

    def _spend_g(self) -> None:
        """g_t is not needed again this step on a rank that does not perturb: in role mode its buffers receive the
        other role's gradient; in one process they are freed before the perturbed backward pass."""
        if self.layout.roles:
            self.spend(self.g)
            self.g = None

    def _clip_coef(self):
        """Trainer's clipping of g_t, as torch.nn.utils.clip_grad_norm_ computes it (applied per parameter)."""
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return 1.0
        norm = self.layout.norm(t for t in self.g if t is not None)
        if norm is None:
            return 1.0
        return torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)

    # ---- one step -------------------------------------------------------------
    def role_pass(self, role: int, batches, passes) -> dict:
        """Role 0: g~_t on the held batch; role 1: g_{t+1} on the new one (g_0 on the first step)."""
        if role == 0:
            zero_grads(self.params)
            if self.g is None or self.config.lam == 1.0:  # first step: nothing to perturb; lam = 1: not used
                self.spend(self.g)
                self.g = None
                return {}
            loss, applied, norm = self.perturbed_grad(passes)
            return {"perturbed_loss": loss, "applied": float(applied), "ascent_grad_norm": norm}
        finite = self.g is not None and self.layout.all_finite(self.g)
        return {"loss": self.lookahead_grad(batches, passes, finite_g=finite)}

    def step(self, batches, passes):
        """One process: the two passes in turn, the lookahead pass first, so that g_t, which the perturbation
        still needs, is freed before the perturbed backward pass (SAM's backup plus one copy at the peak)."""
        scale = passes.loss_scale()
        extras = self.role_pass(1, batches, passes)
        self.layout.all_reduce_grads(self.params)
        g_next = take_grads(self.params, scale)  # no copy: .grad's own tensors, unscaled in place
        extras.update(self.role_pass(0, batches, passes))
        self.layout.all_reduce_grads(self.params)
        return self.finish(take_grads(self.params, scale), g_next, batches, extras, scale)

    def finish(self, g_tilde, g_next, batches, extras, scale) -> StepResult:
        """G_t = (1 - lam) g~_t + lam g_{t+1} into .grad (scaled); g_t <- g_{t+1}; B_t <- B_{t+1}.

        `g_tilde` and `g_next` are unscaled fp32 and this method's to keep or give away (`take_grads`, the
        exchange): G is combined in place in g~_t's buffers, which become `.grad`; g_{t+1}'s become g_t."""
        params, lam, layout = self.params, self.config.lam, self.layout
        loss = as_tensor(extras.get("loss", 0.0), self.device)
        first = self.g is None and self.held is None
        self.g = self._spent = self._x_saved = self._held_shards = None  # what is left of g_t is freed before G
        if first:  # keep g_0, leave x and the optimizer state alone
            if layout.all_finite(g_next):
                self.g, self.held = g_next, list(batches)
                set_grads(params, [None if t is None else torch.zeros_like(t) for t in g_next], 1.0)
            else:  # an overflow: hand it on so a GradScaler backs off; the next step is a first step again
                set_grads(params, g_next, scale)
            return StepResult(loss, skip_update=True, metrics={"sam/perturbed_loss": loss, "sam/skipped_update": 1.0})
        if lam == 0.0:  # a term whose weight is 0 is not computed into G (0 * inf would be NaN)
            set_grads(params, g_tilde, scale)
        elif lam == 1.0:  # G = g_{t+1}, which is also the next g_t: .grad gets a copy
            del g_tilde
            set_grads(params, [None if t is None else t.clone() for t in g_next], scale)
        else:
            combined, dots, sq_a, sq_b, whole = [], [], [], [], []
            with torch.no_grad():
                for gt, gn in zip(g_tilde, g_next):
                    if gt is not None and gn is not None:
                        a, b = layout.local(gt), layout.local(gn)  # this rank's part
                        # in place: g~_t is not needed again. On a CPU, chunk by chunk (the same bits): the three
                        # dot products and the combine then read each chunk from cache
                        step = COMBINE_CHUNK if a.device.type == "cpu" and a.is_contiguous() and b.is_contiguous() \
                            else max(a.numel(), 1)
                        a, b = a.reshape(-1), b.reshape(-1)
                        for s in range(0, a.numel(), step):
                            ac, bc = a[s:s + step], b[s:s + step]
                            whole.append(layout.is_whole(gt))
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
            set_grads(params, combined, scale)
        self.g, self.held = g_next, list(batches)
        metrics = self._metrics(extras)
        if 0.0 < lam < 1.0:
            # over the shards under FSDP2 (a parameter FSDP left whole counted once)
            dot, sq_a, sq_b = layout.totals(dots, sq_a, sq_b, like=params, replicated=whole)
            metrics["sam/grad_cosine"] = dot / (sq_a * sq_b).sqrt().clamp_min(1e-30) if dots else torch.zeros(())
        return StepResult(loss, metrics=metrics)

    def _metrics(self, extras) -> dict:
        if self.config.lam == 1.0:  # no perturbed pass
            return {}
        return {"sam/perturbed_loss": as_tensor(extras.get("perturbed_loss", 0.0), self.device),
                "sam/ascent_grad_norm": as_tensor(extras.get("ascent_grad_norm", 0.0), self.device),
                "sam/skipped_ascent": 1.0 - float(extras.get("applied", 0.0))}

    # ---- checkpointing ------------------------------------------------------
    # B_t is per rank: each data shard holds its part of the step's batch. A checkpoint keeps all of it
    # (`prepare_checkpoint` gathers the shards), as whole micro-batches in units that do not depend on the number of
    # processes: a mean loss weighs each of the M micro-batches 1/M; a loss normalised by `num_items_in_batch` keeps
    # the step's count over the data-parallel replicas. A run on N processes then gives each data shard M/N of
    # them, where N divides M: 2 -> 1, 1 (with accumulation) -> 2, 4 -> 2, role mode <-> one process.
    def _part(self, batch) -> dict:
        count = _count(batch)
        if count is not None and self.layout.replica_fraction != 1.0:  # the count over the replicas (role
            count = count * self.layout.replica_fraction  # mode: half of what Trainer gathered over all ranks)
        return {"batch": {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()},
                "num_items": count.cpu() if torch.is_tensor(count) else count}

    def prepare_checkpoint(self) -> None:
        own = None if self.held is None or not all(isinstance(b, Mapping) for b in self.held) else \
            [self._part(b) for b in self.held]
        self._held_shards = self.layout.gather_data_shards(own)

    def state_dict(self):
        if self.held is not None and not all(isinstance(b, Mapping) for b in self.held):
            # a plain closure (no batch to save): the run resumes with a first step, which computes g again
            return {"g": None, "held": None, "held_num_items": None, "held_accumulation_steps": None}
        shards = self._held_shards
        if shards is not None and self.held is not None and all(s is not None for s in shards):
            return {"g": self.g, "held_parts": [part for shard in shards for part in shard]}  # B_t, shard by shard
        # not gathered (a plain loop on several processes): this rank's own part, for the same layout to resume
        held = None if self.held is None else [dict(b) for b in self.held]
        counts = None if self.held is None else [_count(b) for b in self.held]
        steps = None if self.held is None else [getattr(b, "accumulation_steps", None) for b in self.held]
        return {"g": self.g, "held": held, "held_num_items": counts, "held_accumulation_steps": steps}

    def load_state_dict(self, state):
        device = self.device
        self.g = to_device(state.get("g"), device)
        self.held = self._spent = self._x_saved = self._held_shards = None
        if state.get("held_parts") is not None:
            self.held = self._my_parts(state["held_parts"])
        elif state.get("held") is not None:  # this rank's own part, as saved (the same layout)
            counts = state.get("held_num_items") or [None] * len(state["held"])
            steps = state.get("held_accumulation_steps") or [None] * len(state["held"])
            self.held = [TrainerBatch.of(b, to_device(c, device), n)
                         for b, c, n in zip(to_device(state["held"], device), counts, steps)]
        for batch in self.held or []:  # B_t was counted in the per-pass metrics of the step that handed it in
            batch.metrics_counted = True

    def _my_parts(self, parts) -> list:
        """This data shard's micro-batches of the saved B_t, normalised as this layout's accumulation would."""
        shards, index, total = self.layout.data_parallel_size, self.layout.data_rank, len(parts)
        if total % shards:
            raise SharpnessConfigError(
                f"sam_hf: the checkpoint's held batch B_t is {total} micro-batch(es) over all processes, which "
                f"cannot be shared evenly by this run's {shards} data-parallel ranks ({self.layout.describe()}): "
                f"resume on a number of data-parallel ranks that divides {total}, or on the layout that saved it")
        per = total // shards
        held = []
        for part in parts[index * per:(index + 1) * per]:
            count = part["num_items"]
            if count is not None:
                count = to_device(count, self.device)
                if self.layout.replica_fraction != 1.0:
                    count = count / self.layout.replica_fraction
            held.append(TrainerBatch.of(to_device(part["batch"], self.device), count, per))
        return held


register_method("sampa", SAMPa, SAMPaConfig, "SAMPa-lambda: the ascent and the lookahead gradient are independent, "
                "so two processes compute them at once", paper="Xie et al. 2024, Algorithms 1 and 2",
                examples=(Example("SAMPa-0.2", "rho=0.1,lam=0.2"),
                          Example("SAMPa-0.2, base=sgd momentum=0.9", "rho=0.1,lam=0.2,base=sgd,momentum=0.9",
                                  bench=False),
                          Example("SAMPa-0.2", "rho=0.1,lam=0.2", 2),
                          Example("SAMPa-0.2 (bf16 exchange)", "rho=0.1,lam=0.2,exchange_dtype=bf16", 2)))
