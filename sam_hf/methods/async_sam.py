"""Asynchronous SAM (Jo, Lim and Lee, Algorithm 1 and Eq. (2)): a stale, smaller ascent.

With A_t a subset of ceil(r |B_t|) samples of B_t (r = `ascent_batch_ratio`) and staleness tau (`staleness`):

    t < tau:   step O with grad f(x_t, B_t);                                 a_t = grad f(x_t, A_t)
    t >= tau:  step O with grad f(x_t + rho a_{t-tau}/||a_{t-tau}||, B_t);    a_t = grad f(x_t, A_t)

(the ascent rule: ASAM's T, SAM-ON's norm layers; VaSSO averages the a_{t-tau} it perturbs with,
m_t = (1 - theta) m_{t-1} + theta a_{t-tau}, m_0 = a_0; BiSAM: a_t = grad Q(x_t, A_t), the lower bound's gradient).
Algorithm 1 fixes tau = 1, the default; Eq. (2) and Remark 1 allow any tau, though section 3.3 argues for
tau = 1 with a smaller r. A_t is the first ceil(r |B_t|) samples (`ascent_samples=first`, the default: on a
shuffled loader they already are random samples), or a uniformly random subset (`random`: the paper's "b' random
samples", which differ from the first ones when batches are ordered, e.g. grouped by length), drawn at step t
from a generator seeded with (ascent_seed, t), so every rank draws the same and a resumed run the same.

The descent at step t needs only a_{t-tau}, so with two processes a_t is computed
on the second device while the first computes the descent (the role-parallel layout, distributed/layouts/roles.py),
and r is chosen so the ascent hides behind the descent (`ascent_batch_ratio=auto`
measures both devices; in one process `auto` means r = 1). In one process
the two passes run one after the other, the descent first.

The reported `loss` is f(x_t, A_t), the clean loss on the ascent batch. Memory, beyond the base optimizer's own:
one copy (SAM's, the weight backup), written into a_{t-tau}'s buffers as the perturbation consumes them
(the rule's keep_x), then a_t and the descent gradient: `.grad`'s own tensors, handed over without copies; with
tau > 1, the tau - 1 later ascent gradients wait in a queue (checkpointed); VaSSO adds its average. In role mode
the other role's gradient is received into the spent a_{t-tau}'s buffers, and every rank keeps the queue.
"""


from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..batching import ascent_count, chosen_samples, leading_samples
from ..batching import batch_size as _size
from ..config import RoleOptions, SharpnessConfig, SharpnessConfigError, _bad, option, parse_float
from ..registry import Example, register_method
from ..tensors import as_tensor, restore, set_grads, take_grads, to_device, zero_grads
from .base import StepResult, TwoRoleMethod, run_batches, run_pieces
from .rules import RULES, AscentOptions

logger = logging.getLogger(__name__)
AUTO_STEPS = 3  # steps measured (after the first) before ascent_batch_ratio=auto fixes r


def _ratio(key: str, value: str):
    return "auto" if value.strip().lower() == "auto" else parse_float(key, value)


@dataclass
class AsyncSAMConfig(RoleOptions, AscentOptions, SharpnessConfig):
    ascent_batch_ratio: float | str = option(
        1.0, "Asynchronous SAM's r: the ascent batch A_t is the first ceil(r |B_t|) samples of B_t, r in (0, 1]; "
        "auto picks r from the two ranks' measured speeds so the ascent hides behind the descent", example=0.5,
        parse=_ratio)
    ascent_device: str = option("auto", "the ascent rank's device: auto (Trainer's device) or cpu (rank 1 "
                                "computes the ascent on the CPU beside a GPU rank 0)", choices=("auto", "cpu"))
    ascent_threads: int = option(0, "with ascent_device=cpu: the CPU rank's threads (0: every core but one)")
    staleness: int = option(1, "Asynchronous SAM's tau: step t perturbs with the ascent gradient of step t - tau "
                            "(Eq. (2); Algorithm 1 and the default: 1); the first tau steps are unperturbed",
                            example=2)
    ascent_samples: str = option("first", "which ceil(r |B_t|) samples of B_t form the ascent batch A_t: first (the "
                                 "leading ones) or random (a uniform subset drawn per step with ascent_seed)",
                                 choices=("first", "random"))
    ascent_seed: int = option(0, "ascent_samples=random: the seed of the per-step draws (step t uses (seed, t))",
                              example=1)

    def validate(self) -> None:
        super().validate()
        r = self.ascent_batch_ratio
        if r != "auto" and not (isinstance(r, float) and 0.0 < r <= 1.0):
            raise _bad("ascent_batch_ratio", r, "use a number in (0, 1] or auto")
        if self.ascent_device == "cpu" and self.parallel == "off":
            raise _bad("ascent_device", self.ascent_device,
                       "a CPU ascent rank needs the role-parallel layout; drop parallel=off")
        if self.ascent_threads < 0 or (self.ascent_threads and self.ascent_device != "cpu"):
            raise _bad("ascent_threads", self.ascent_threads,
                       "it sets the CPU ascent rank's threads: use a number >= 0 (0: every core but one) together "
                       "with ascent_device=cpu")
        if self.staleness < 1:
            raise _bad("staleness", self.staleness,
                       "use a whole number of steps >= 1 (the paper's tau; 1: Algorithm 1)")
        if self.was_given("ascent_seed") and self.ascent_samples != "random":
            raise SharpnessConfigError(f"optim_args: ascent_seed={self.ascent_seed} seeds ascent_samples=random; this "
                                       "run takes the first samples (ascent_samples=first): drop ascent_seed")

    @property
    def cpu_rank(self) -> bool:
        return self.ascent_device == "cpu"


class AsyncSAM(TwoRoleMethod):
    rules = RULES  # every ascent rule (rules.py)
    role_names = ("descent", "ascent")
    roles_hint = "2 processes (or parallel=on on an even number)"
    extra_copies = 2  # SAM's backup and a_(t-1), kept from one step to the next
    metrics_role = 0  # the descent pass on B_t is the one that counts (A_t is a slice of B_t)
    EXTRA_KEYS = ("loss", "perturbed_loss", "applied", "ascent_grad_norm", "descent_seconds", "ascent_seconds",
                  "ascent_samples", "descent_step_seconds", "ascent_step_seconds")

    @classmethod
    def roles_by_default(cls, world_size: int) -> bool:
        return world_size == 2  # 2k ranks with parallel=on

    @classmethod
    def copies(cls, config) -> float:
        return super().copies(config) + config.staleness - 1  # the queue's later ascent gradients

    @classmethod
    def check(cls, config, layout, samples_per_rank=None) -> None:
        super().check(config, layout, samples_per_rank)
        if config.cpu_rank and layout.sharded:
            raise SharpnessConfigError(
                f"optim_args: ascent_device=cpu puts a whole unsharded replica on the CPU ascent rank; it does not "
                f"combine with {layout.describe()}. Drop ascent_device (Asynchronous SAM then runs data parallel on "
                "the GPUs)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        r = self.config.ascent_batch_ratio
        self.auto_ratio = r == "auto"  # measured in role-parallel mode only; r = 1 until then
        self.ratio = 1.0 if r == "auto" else float(r)
        self.queue: list = []  # a_{t-tau}, ..., a_{t-1}, unscaled fp32, oldest first
        self.steps_seen = 0
        self._timings: list[tuple[float, float, float]] = []  # descent s, ascent s/sample, step-time gap s

    @property
    def slices_batches(self) -> bool:
        return self.auto_ratio or self.ratio < 1.0 or self.config.ascent_samples == "random"

    def _due(self):
        """a_{t-tau}, taken off the queue, where this step perturbs (None in the first tau steps)."""
        return self.queue.pop(0) if len(self.queue) >= self.config.staleness else None

    def ascent_pieces(self, batches):
        """A_t: the first ceil(r |B_t|) samples, or as many drawn at random with the generator of (seed, t)."""
        if self.config.ascent_samples == "first":
            return leading_samples(batches, self.ratio)
        total = sum(_size(b) for b in batches)
        g = torch.Generator().manual_seed(self.config.ascent_seed * 2**32 + self.steps_seen)
        rows = torch.randperm(total, generator=g)[:ascent_count(batches, self.ratio)]
        return chosen_samples(batches, rows.tolist())

    @property
    def times_optimizer_step(self) -> bool:
        return self.auto_ratio and self.layout.roles

    def descent_grad(self, batches, passes):
        """grad f(x_t + rho a_{t-tau}/||a_{t-tau}||, B_t) in .grad (unperturbed in the first tau steps)."""
        params = self.params
        zero_grads(params)
        due = self._due()
        if due is None:
            return run_batches(passes, batches, clean=True), False, torch.zeros(())
        # a_{t-tau} has done its work once the perturbation is applied: its buffers take x's backup
        saved, applied, norm = self.perturb_(due, keep_x=True)
        del due
        loss = run_batches(passes, batches, clean=False)
        restore(params, saved)
        self.spend(saved)  # role mode: the backup's buffers (a_{t-tau}'s) receive the ascent gradient a_t
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
            if self.layout.roles:  # the ascent rank never uses a_{t-tau}: its buffers receive the descent gradient
                self.spend(self._due())
            pieces = self.ascent_pieces(batches)
            samples = sum(_size(p.batch) for p in pieces)
            # each piece contributes its part of the step's loss: report it in the units of the whole batch
            share = samples / sum(_size(b) for b in batches)
            loss = run_pieces(passes, pieces, clean=True, ascent=self.rule.ascent_loss)
            out = {"loss": loss / share, "ascent_samples": samples}
            key = "ascent_seconds"
        if self.times_optimizer_step:  # timing a GPU pass needs its kernels finished
            self.synchronize()
        out[key] = time.perf_counter() - start
        out["descent_step_seconds" if role == 0 else "ascent_step_seconds"] = self.last_step_seconds
        return out

    def step(self, batches, passes):
        scale = passes.loss_scale()
        # unperturbed, A_t = B_t and the ascent of the training loss: the descent gradient is a_t
        same = len(self.queue) < self.config.staleness and self.ratio >= 1.0 and self.rule.ascent_loss is None
        extras = self.role_pass(0, batches, passes)
        self.layout.all_reduce_grads(self.params)
        descent = take_grads(self.params, scale)  # no copy: .grad's own tensors, unscaled in place
        if same:
            ascent, extras["loss"] = [None if d is None else d.clone() for d in descent], extras["perturbed_loss"]
        else:
            extras.update(self.role_pass(1, batches, passes))
            self.layout.all_reduce_grads(self.params)
            ascent = take_grads(self.params, scale)
        return self.finish(descent, ascent, batches, extras, scale)

    def finish(self, descent, ascent, batches, extras, scale) -> StepResult:
        """Step with the descent gradient; keep a_t for the next step. Both are unscaled fp32 and this method's to
        keep (`take_grads`, the exchange): the descent tensors become `.grad`, rescaled in place."""
        self._spent = None
        set_grads(self.params, descent, scale)
        self.queue.append(ascent)
        if len(self.queue) >= self.config.staleness:
            self.rule.absorb(self.queue[0])  # VaSSO: the average takes a_(t+1-tau), which step t + 1 perturbs with
        self.steps_seen += 1
        if self.layout.roles and self.auto_ratio and self.steps_seen > 1:
            self._measure(extras, batches)
        device = self.device
        loss = as_tensor(extras.get("loss", 0.0), device)
        metrics = {"sam/perturbed_loss": as_tensor(extras.get("perturbed_loss", 0.0), device),
                   "sam/ascent_batch_ratio": self.ratio}
        if self.steps_seen > self.config.staleness:  # a perturbed step
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
        # "a": the newest ascent gradient (tau = 1: the whole queue, as before staleness existed); "older": the rest
        return {"a": self.queue[-1] if self.queue else None, "older": self.queue[:-1], "ratio": self.ratio,
                "steps_seen": self.steps_seen, "auto_ratio": self.auto_ratio, "timings": self._timings,
                **self.rule_state()}

    def load_state_dict(self, state):
        a = to_device(state.get("a"), self.device)
        self.queue = to_device(list(state.get("older") or []), self.device) + ([a] if a is not None else [])
        self.load_rule_state(state)
        self._spent = None
        self.ratio = float(state.get("ratio", self.ratio))
        self.steps_seen = int(state.get("steps_seen", len(self.queue)))
        self.auto_ratio = bool(state.get("auto_ratio", self.auto_ratio))
        self._timings = [tuple(t) + (0.0,) * (3 - len(t)) for t in state.get("timings", [])]


register_method("asyncsam", AsyncSAM, AsyncSAMConfig, "Asynchronous SAM: a one-step-stale ascent on a smaller batch, "
                "computed on a second device while the first descends", paper="Jo, Lim and Lee, Algorithm 1 and Eq. (2)",
                examples=(Example("AsyncSAM (r=1)", "rho=0.05,ascent_batch_ratio=1"),
                          Example("AsyncSAM (r=0.5)", "rho=0.05,ascent_batch_ratio=0.5"),
                          Example("AsyncSAM (r=1)", "rho=0.05,ascent_batch_ratio=1", 2),
                          Example("AsyncSAM (r=0.5)", "rho=0.05,ascent_batch_ratio=0.5", 2),
                          Example("AsyncSAM (tau=2, random A_t)",
                                  "rho=0.05,ascent_batch_ratio=0.5,staleness=2,ascent_samples=random"),
                          Example("AsyncSAM + ASAM", "rho=0.5,ascent_batch_ratio=0.5,rule=asam", bench=False),
                          Example("AsyncSAM + VaSSO", "rho=0.05,ascent_batch_ratio=0.5,rule=vasso", bench=False),
                          Example("AsyncSAM + BiSAM", "rho=0.05,ascent_batch_ratio=0.5,rule=bisam", bench=False),
                          # the paper's heterogeneous case: rank 0 on the GPU, rank 1's ascent on the CPU
                          Example("AsyncSAM (CPU ascent, r=auto)", "rho=0.05,ascent_batch_ratio=auto,ascent_device=cpu",
                                  2)))
