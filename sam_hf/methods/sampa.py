"""SAMPa-lambda (Xie et al., 2024, Algorithms 1 and 2): SAM whose two gradients are independent.

The step that updates x_t uses the held batch B_t and the new batch B_{t+1}:

    x~_t    = x_t + rho g_t / ||g_t||            g~_t    = grad f(x~_t, B_t)   (the ascent rule: ASAM's T,
    y_{t+1} = ModelUpdate_{m_t}(x_t, g_t)        g_{t+1} = grad f(y_{t+1}, B_{t+1})    SAM-ON, VaSSO, BiSAM:
    G_t     = (1 - lambda) g~_t + lambda g_{t+1}  x_{t+1}, m_{t+1} = O.step(x_t, G_t)   see below)

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

The ascent rules with SAMPa's held gradient (computed at the lookahead point y_t, not at x_t; the SAMPa paper's
Table 8 combinations):

    asam, sam_on   e_t from g_t, with T (ASAM) evaluated at x_t, the weights being perturbed; SAM-ON: g_t on N.
    vasso          m_t = (1 - theta) m_{t-1} + theta g_t (m_0 = g_0): the average of the lookahead-point
                   gradients, updated on every rank when g_t arrives (in `finish`); e_t = rho m_t/||m_t||.
    bisam          e_t from q_t = grad Q(y_t, B_t), the lower bound's gradient at the same point and batch as g_t,
                   while ModelUpdate and the lambda-term use grad f: the lookahead pass computes both gradients
                   at y_{t+1} (two forward + backward passes over B_{t+1}, the second with the first's random
                   state, so dropout masks agree; in role mode q_{t+1} travels to role 0 after the exchange).

mSAM + SAMPa (`micro_batches=m`): B_t is split into m micro-batches B_{t,j} (sizes differing by at most one, as
mSAM splits them), each with its own perturbation. The lookahead pass runs the m micro-batches of B_{t+1} one by
one at y_{t+1} and keeps each one's gradient:

    g_{t,j} = grad f_{B_{t,j}}(y_t)   (each micro-batch's part of the step's loss, mSAM's units)
    g_t     = sum_j g_{t,j}                                   the full-batch gradient: ModelUpdate's input
    g~_t    = sum_j grad f_{B_{t,j}}(x_t + rho g_{t,j}/||g_{t,j}||)   one perturbation per micro-batch
    G_t     = (1 - lambda) g~_t + lambda g_{t+1},  g_{t+1} = sum_j g_{t+1,j}

(BiSAM: e_{t,j} from q_{t,j} = grad Q(y_t, B_{t,j})). m = 1 is SAMPa. rule=vasso with m > 1 is refused (one
average, m ascent gradients a step). As in mSAM, with several data-parallel ranks each rank takes m / N of
the micro-batches and its g_{t,j} stay its own; the full g_t is averaged over the ranks; under FSDP2 each rank
cuts its share into m slices and micro-batch j is the ranks' j-th slices together. In role mode the m held
gradients travel from role 1 to role 0 after the exchange (m more gradients one way per step).

Memory, beyond the base optimizer's own: one copy more than SAM's (its weight
backup): g_t, kept from one step to the next. In role mode each rank's pass
writes x's backup into g_t's buffers as it consumes them (`perturb_keeping_x`,
`apply_lookahead_(keep_x=True)`), and after the pass those buffers receive
the other role's gradient; in one process the lookahead pass runs first, its
backup serves the perturbed pass too, and g_t is freed once the perturbation
has used it. The step's two gradients are `.grad`'s own tensors, handed over
without copies, and G is combined in place in g~_t's. VaSSO adds its average (3 copies); BiSAM or
micro_batches=m hold the m ascent gradients of B_t while the lookahead pass makes those of B_{t+1} (2m + 1 copies
in one process: the backup, m held, m new and their sum).
"""


from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..batching import TrainerBatch, batch_size, slice_batch, split_samples
from ..config import RoleOptions, SharpnessConfig, SharpnessConfigError, _bad, option
from ..registry import Example, register_method
from ..tensors import as_tensor, backup, restore, set_grads, take_grads, to_device, zero_grads
from . import lookahead
from .base import Randomness, StepResult, TwoRoleMethod, run_batches, run_pieces
from .msam import _ranks_sharing, refuse_vasso_per_micro_batch
from .rules import RULES, AscentOptions

COMBINE_CHUNK = 262144  # elements: G and the cosine's three dot products, chunk by chunk on a CPU
LOOKAHEAD_BASES = ("adamw_torch", "adamw_torch_fused", "sgd")  # base optimizers lookahead=optimizer is tested with


@dataclass
class SAMPaConfig(RoleOptions, AscentOptions, SharpnessConfig):
    lam: float = option(0.2, "SAMPa's lambda in G = (1 - lambda) g~_t + lambda g_(t+1), in [0, 1] (SAMPa-0.2: "
                        "the papers' choice, with twice SAM's rho)", example=0.2)
    lookahead: str = option("optimizer", "SAMPa's ModelUpdate: optimizer (the base optimizer's own step, closed "
                            "form for AdamW/Adam/SGD) or sgd (y = x - lr g, any base)", choices=("optimizer", "sgd"))
    micro_batches: int = option(1, "mSAM + SAMPa: micro-batches per step, each with its own perturbation from its "
                                "own held gradient (1: SAMPa; the SAMPa paper's Table 8 uses batch 128 / 32 = 4)",
                                example=4)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.lam <= 1.0:
            raise _bad("lam", self.lam, "lam must be in [0, 1] (e.g. lam=0.2)")
        if self.micro_batches < 1:
            raise _bad("micro_batches", self.micro_batches, "micro_batches must be >= 1 (e.g. micro_batches=4)")
        if self.lookahead == "optimizer" and self.base not in LOOKAHEAD_BASES:
            raise SharpnessConfigError(
                f"optim_args: lookahead=optimizer has a closed form for base in {list(LOOKAHEAD_BASES)}, "
                f"not base={self.base!r}; use lookahead=sgd (y = x - lr * g) or one of those bases")


def _count(batch):
    """The batch's `num_items_in_batch` (Trainer's loss normaliser for its accumulation cycle), if any."""
    return getattr(batch, "num_items_in_batch", None)


class SAMPa(TwoRoleMethod):
    rules = RULES  # every ascent rule (rules.py)
    skips_first_update = True
    extra_copies = 2  # SAM's backup and g_t, kept from one step to the next
    role_names = ("perturbed gradient g~_t", "lookahead gradient g_{t+1}")
    metrics_role = 1  # the lookahead pass on B_{t+1} is the one that counts (B_t counted a step earlier)
    EXTRA_KEYS = ("loss", "perturbed_loss", "skipped", "ascent_grad_norm")

    @classmethod
    def check(cls, config, layout, samples_per_rank=None) -> None:
        super().check(config, layout, samples_per_rank)
        refuse_vasso_per_micro_batch(config, "sampa")
        m, ranks = config.micro_batches, _ranks_sharing(layout)
        if m == 1:  # SAMPa: one perturbation from the global g_t
            return
        if m % ranks:
            raise SharpnessConfigError(
                f"optim_args: micro_batches={m} cannot be spread evenly over the {ranks} data-parallel processes of "
                f"{layout.describe()}; use a multiple of {ranks} (e.g. micro_batches={ranks * max(1, m // ranks)})")
        if samples_per_rank is not None and m // ranks > samples_per_rank:
            raise SharpnessConfigError(
                f"optim_args: micro_batches={m} is larger than the {samples_per_rank * ranks} samples of a step; use "
                f"micro_batches <= {samples_per_rank * ranks}")

    @classmethod
    def copies(cls, config) -> float:
        if config.rule == "bisam" or config.micro_batches > 1:
            return 2 * config.micro_batches + 1  # the backup, m held and m new ascent gradients, their sum
        return super().copies(config)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.lookahead == "optimizer" and not lookahead.supports(self.optimizer):
            raise SharpnessConfigError(
                f"optim_args: lookahead=optimizer has no closed form for {type(self.optimizer).__name__}; "
                "use lookahead=sgd or an AdamW/Adam/SGD base optimizer")
        self.g: list[torch.Tensor | None] | None = None  # g_t, unscaled fp32
        # the held ascent directions, one per micro-batch of B_t (BiSAM: q_{t,j}; else g_{t,j}); None: [g_t]
        self.a: list[list[torch.Tensor | None]] | None = None
        self._next_a = None  # the lookahead pass's ascent directions for B_{t+1}
        self.held: list[dict] | None = None  # B_t
        self._x_saved: list[torch.Tensor] | None = None  # one process: x, backed up by the lookahead pass
        self._held_shards: list | None = None  # B_t from every data shard, gathered for a checkpoint
        self._a_shards: list | None = None  # the held directions of every data shard (micro-batches per rank)
        self.local_micro_batches = max(1, self.config.micro_batches // _ranks_sharing(self.layout))
        # the ascent directions are held apart from g_t (BiSAM's are another loss's; mSAM's one per micro-batch)
        self.separate = self.rule.ascent_loss is not None or self.config.micro_batches > 1

    def _parts(self, batches):
        """The micro-batches of a step's batch, as lists of pieces (an epoch's short last batch: one per sample)."""
        return split_samples(batches, min(self.local_micro_batches, sum(batch_size(b) for b in batches)))
    # ---- the two independent halves ------------------------------------
    def perturbed_grad(self, passes):
        """g~_t = sum_j grad f(x_t + e_{t,j}, B_{t,j}) (one micro-batch: grad f(x_t + rho g_t/||g_t||, B_t)), left
        in .grad. Returns (loss, skipped perturbations, mean ascent norm)."""
        params = self.params
        zero_grads(params)
        directions, spare = (self.a, self.g) if self.a is not None else ([self.g], None)
        self.a = self.g = None  # each direction is dropped once its perturbation is applied
        parts = self._parts(self.held) if len(directions) > 1 else [None]
        saved, self._x_saved = self._x_saved, None
        loss, skipped, norms = 0.0, 0.0, []
        for j, pieces in enumerate(parts):
            d, directions[j] = directions[j], None
            if saved is None and self.layout.roles and len(parts) == 1:  # d's buffers take x's backup
                saved, applied, norm = self.perturb_(d, keep_x=True)
            else:  # one process: the lookahead pass backed x up and restored it
                saved = self.rule.backup(params) if saved is None else saved
                _, applied, norm = self.perturb_(d)
            del d
            # BatchNorm statistics come from the lookahead pass
            loss = loss + (run_batches(passes, self.held, clean=False) if pieces is None
                           else run_pieces(passes, pieces, clean=False))
            restore(params, saved)
            skipped += float(not applied)
            norms.append(norm)
        # role mode: spent buffers (g_t's, or the backup's) receive the other role's gradient
        self.spend(spare if spare is not None else saved)
        return loss, skipped, torch.stack(norms).mean()

    def lookahead_grad(self, batches, passes, finite_g: bool):
        """g_{t+1} = grad f(ModelUpdate(x_t, g_t), B_{t+1}), left in .grad. Returns the loss."""
        params = self.params
        zero_grads(params)
        saved = None
        if finite_g:
            grads = {p: t for p, t in zip(self.params, self.g) if t is not None}
            with self.layout.base_optimizer(self.optimizer) as optimizer:  # its groups hold self.params
                if self.layout.roles:  # the perturbation is the other role's: g_t's buffers take x's backup
                    kept = lookahead.apply_lookahead_(optimizer, grads, self.config.lookahead,
                                                      grad_scale=self._clip_coef(), keep_x=True)
                    saved = [kept[p] if p in kept else p.detach().clone() for p in params]
                    self.g = None
                else:  # one process: g_t is still to perturb with; this backup serves the perturbed pass too
                    saved = backup(params)
                    lookahead.apply_lookahead_(optimizer, grads, self.config.lookahead, grad_scale=self._clip_coef())
                    if self.separate:  # the perturbation uses the held ascent directions, not g_t
                        self.g = None
            del grads
        self._spend_g()
        if self.layout.roles:  # this rank never perturbs: the held ascent directions are not needed
            self.a = None
        if self.separate:
            loss, self._next_a = self._lookahead_directions(batches, passes)
        else:
            loss = run_batches(passes, batches, clean=True)
        if saved is not None:
            restore(params, saved)
            if self.layout.roles:  # the backup's buffers (g_t's) receive the other role's gradient
                self.spend(saved)
            else:
                self._x_saved = saved
        return loss

    def _lookahead_directions(self, batches, passes):
        """At y_{t+1}: grad f of each micro-batch of B_{t+1}, summed into .grad (g_{t+1}), and the ascent direction
        of each (BiSAM: grad Q, a second pass with the first's random state; else grad f itself), returned
        unscaled. With one micro-batch the direction is averaged over the data-parallel ranks as g_{t+1} is."""
        params, scale, ascent = self.params, passes.loss_scale(), self.rule.ascent_loss
        parts = self._parts(batches) if self.config.micro_batches > 1 else [None]
        total, directions, loss = None, [], 0.0

        def run(pieces, **kw):
            return run_batches(passes, batches, **kw) if pieces is None else run_pieces(passes, pieces, **kw)

        for pieces in parts:
            zero_grads(params)
            randomness = Randomness(self.device) if ascent is not None else None
            loss = loss + run(pieces, clean=True)
            f = take_grads(params, scale)
            if ascent is None:
                directions.append(f)
                f = [None if t is None else t.clone() for t in f] if total is None else f
            total = f if total is None else [a if b is None else (b if a is None else a.add_(b))
                                             for a, b in zip(total, f)]
            del f
            if ascent is not None:  # at the same point and batch, the same dropout masks
                with randomness.again():
                    run(pieces, clean=False, ascent=ascent)
                if pieces is None:  # one direction: the global ascent gradient, as g_{t+1} is
                    self.layout.all_reduce_grads(params)
                directions.append(take_grads(params, scale))
        set_grads(params, total, scale)  # g_{t+1}: averaged over the ranks and exchanged as the plain one is
        return loss, directions

    # ---- side gradients (role mode): the ascent directions role 0 needs next step --------------------------
    def side_count(self, batches) -> int:
        if not self.separate:
            return 0
        return len(self._parts(batches)) if self.config.micro_batches > 1 else 1

    @property
    def side_averaged(self) -> bool:
        return self.config.micro_batches == 1  # m > 1: each rank's micro-batches are its own (mSAM's spread)

    def side_gradients(self) -> list:
        out, self._next_a = self._next_a, None
        return out

    def receive_side(self, gradients: list) -> None:
        self._next_a = gradients

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
            if self.held is None or self.config.lam == 1.0:  # first step: nothing to perturb; lam = 1: not used
                self.spend(self.g)
                self.g = self.a = None
                return {}
            loss, skipped, norm = self.perturbed_grad(passes)
            return {"perturbed_loss": loss, "skipped": skipped, "ascent_grad_norm": norm}
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
        next_a, self._next_a = self._next_a, None
        # whatever is left of g_t and the held directions is freed before G is built
        self.g = self.a = self._spent = self._x_saved = self._held_shards = self._a_shards = None
        if first:  # keep g_0, leave x and the optimizer state alone
            if layout.all_finite(g_next):
                self.g, self.a, self.held = g_next, next_a, list(batches)
                self.rule.absorb(g_next)  # VaSSO: m_0 = g_0
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
        self.g, self.a, self.held = g_next, next_a, list(batches)
        self.rule.absorb(g_next)  # VaSSO: m_{t+1} = (1 - theta) m_t + theta g_{t+1}, on every rank
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
                "sam/skipped_ascent": float(extras.get("skipped", 0.0))}

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
        if self._directions_per_rank():  # each data shard's micro-batch gradients are its own
            self._a_shards = self.layout.gather_data_shards(to_device(self.a, torch.device("cpu")))

    def _directions_per_rank(self) -> bool:
        """micro_batches > 1 over several data-parallel ranks that each cut their own share (not FSDP2)."""
        return self.config.micro_batches > 1 and _ranks_sharing(self.layout) > 1

    def _a_state(self) -> dict:
        if self._a_shards is not None and all(a is not None for a in self._a_shards):
            return {"a_parts": self._a_shards}
        return {} if self.a is None else {"a": self.a}  # plain SAMPa holds no directions apart from g_t

    def _my_directions(self, state):
        """The held ascent directions this rank resumes with; micro-batch gradients gathered from every data shard
        belong to the shard that computed them, so they resume on as many data-parallel ranks only."""
        parts = state.get("a_parts")
        if parts is None and state.get("a") is None:
            return None
        saved = 1 if parts is None else len(parts)
        shards = self.layout.data_parallel_size if self._directions_per_rank() else 1
        if parts is None and (shards == 1 or state.get("held_parts") is None):  # (or this rank's own, as saved)
            return to_device(state["a"], self.device)
        if saved != shards:
            raise SharpnessConfigError(
                f"sam_hf: the checkpoint holds SAMPa's micro-batch gradients (micro_batches="
                f"{self.config.micro_batches}) of {saved} data shard(s), each computed on its own share of B_t; "
                f"this run has {shards} ({self.layout.describe()}): resume on the layout that saved it")
        return to_device(parts[self.layout.data_rank if shards > 1 else 0], self.device)

    def state_dict(self):
        if self.held is not None and not all(isinstance(b, Mapping) for b in self.held):
            # a plain closure (no batch to save): the run resumes with a first step, which computes g again
            return {"g": None, "held": None, "held_num_items": None, "held_accumulation_steps": None,
                    **self.rule_state()}
        shards = self._held_shards
        if shards is not None and self.held is not None and all(s is not None for s in shards):
            return {"g": self.g, **self._a_state(), "held_parts": [part for shard in shards for part in shard],
                    **self.rule_state()}  # B_t, shard by shard
        # not gathered (a plain loop on several processes): this rank's own part, for the same layout to resume
        held = None if self.held is None else [dict(b) for b in self.held]
        counts = None if self.held is None else [_count(b) for b in self.held]
        steps = None if self.held is None else [getattr(b, "accumulation_steps", None) for b in self.held]
        return {"g": self.g, **self._a_state(), "held": held, "held_num_items": counts,
                "held_accumulation_steps": steps, **self.rule_state()}

    def load_state_dict(self, state):
        device = self.device
        self.g = to_device(state.get("g"), device)
        self.a = self._my_directions(state)
        self.load_rule_state(state)
        self.held = self._spent = self._x_saved = self._held_shards = self._a_shards = self._next_a = None
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
            parts = _cut_rows(parts, shards // total if shards % total == 0 else 0)
            if parts is None:
                raise SharpnessConfigError(
                    f"sam_hf: the checkpoint's held batch B_t is {total} micro-batch(es) over all processes, which "
                    f"cannot be shared evenly by this run's {shards} data-parallel ranks ({self.layout.describe()}), "
                    f"neither whole nor cut into equal row blocks: resume on a number of data-parallel ranks that "
                    f"divides {total}, or on the layout that saved it")
            total = len(parts)
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


def _cut_rows(parts, k: int):
    """Each saved micro-batch cut into `k` equal blocks of rows (None where it cannot be): the blocks k data-parallel
    ranks would have held of it. A block keeps the micro-batch's count: under data parallelism a rank's loss is
    normalised by the count over all ranks' rows (average_tokens_across_devices), and a mean loss needs none."""
    if k < 2:
        return None
    out = []
    for part in parts:
        sizes = {v.shape[0] for v in part["batch"].values() if torch.is_tensor(v) and v.dim() > 0}
        if len(sizes) != 1 or next(iter(sizes)) % k or not all(torch.is_tensor(v) for v in part["batch"].values()):
            return None
        n = next(iter(sizes)) // k
        out += [dict(part, batch=slice_batch(part["batch"], i * n, (i + 1) * n)) for i in range(k)]
    return out


register_method("sampa", SAMPa, SAMPaConfig, "SAMPa-lambda: the ascent and the lookahead gradient are independent, "
                "so two processes compute them at once", paper="Xie et al. 2024, Algorithms 1 and 2",
                examples=(Example("SAMPa-0.2", "rho=0.1,lam=0.2"),
                          Example("SAMPa-0.2, base=sgd momentum=0.9", "rho=0.1,lam=0.2,base=sgd,momentum=0.9",
                                  bench=False),
                          # the SAMPa paper's Table 8 (its Appendix B.4: each variant's rho doubled, lam = 0.2)
                          Example("SAMPa + mSAM (m=4)", "rho=0.1,lam=0.2,micro_batches=4"),
                          Example("SAMPa + ASAM", "rho=1.0,lam=0.2,rule=asam"),
                          Example("SAMPa + SAM-ON", "rho=1.0,lam=0.2,rule=sam_on", meter=False),
                          Example("SAMPa + VaSSO", "rho=0.1,lam=0.2,rule=vasso,theta=0.4"),
                          Example("SAMPa + BiSAM", "rho=0.1,lam=0.2,rule=bisam,mu=1"),
                          Example("SAMPa-0.2", "rho=0.1,lam=0.2", 2),
                          Example("SAMPa + BiSAM", "rho=0.1,lam=0.2,rule=bisam", 2, bench=False),
                          Example("SAMPa-0.2 (bf16 exchange)", "rho=0.1,lam=0.2,exchange_dtype=bf16", 2)))
