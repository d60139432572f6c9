"""SAM (Foret et al., 2021), with any ascent rule (ASAM, SAM-ON, VaSSO, BiSAM: methods/rules.py), optionally on a
schedule.

One step on batch B (all micro-batches of a gradient-accumulation cycle):

    g  = grad f(x, B)                  (BiSAM: grad Q(x, B), the lower bound of the 0-1 loss)
    e  = rho g / ||g||                 (the ascent rule; ASAM: rho T^2 g / ||T g||; SAM-ON: over the norm layers;
                                        VaSSO: rho m/||m|| with m <- (1 - theta) m + theta g)
    g~ = grad f(x + e, B)
    x is restored by copy; the base optimizer steps with g~.

Cost: two sequential forward+backward passes. Memory: one copy of the trainable weights (the backup x; SAM-ON:
of the normalization parameters only; VaSSO: one more, its average m); e is applied parameter by parameter from
`.grad`. A step whose ascent gradient is zero or not finite takes g~ = grad f(x, B) (BiSAM: one more pass, as
.grad then holds Q's gradient).

Several processes: the ascent gradient is averaged over the ranks first (exact SAM on the global batch).
`ascent_group_size=s` (google-research/sam's inner_group_size) averages it within groups of s consecutive ranks
only: ranks [0, s), [s, 2s), ... each share one perturbation, which is mSAM with m = world / s micro-batches (each
the union of a group's batches); the final gradient is averaged over all ranks. s = world size is the default
(exact SAM), s = 1 is `sync_ascent=false` (each rank its own perturbation: mSAM with m = world size). A per-group
perturbation is refused where every backward averages over the ranks (FSDP2: use mSAM) and with rule=vasso (its
average would differ per group). `interval`/`start`/`stop` (ScheduleOptions) make the other steps the base
optimizer's own one-pass step (VaSSO's average then follows the sharpness-aware steps only).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ScheduleOptions, SharpnessConfig, SharpnessConfigError, _bad, option
from ..registry import Example, register_method
from ..tensors import restore, zero_grads
from .base import SharpnessMethod, StepResult, run_batches
from .rules import RULES, AscentOptions


@dataclass
class SAMConfig(ScheduleOptions, AscentOptions, SharpnessConfig):
    sync_ascent: bool = option(True, "several processes: average the ascent gradient over the ranks (exact SAM on "
                               "the global batch); false perturbs each rank by its own (mSAM with m = ranks); "
                               "the same as ascent_group_size=1", example="false")
    ascent_group_size: int = option(0, "several processes: average the ascent gradient within groups of this many "
                                    "consecutive ranks, one perturbation per group (google-research/sam's "
                                    "inner_group_size: mSAM with m = ranks / size); 0: all ranks (exact SAM)",
                                    example=2)

    def validate(self) -> None:
        super().validate()
        if self.ascent_group_size < 0:
            raise _bad("ascent_group_size", self.ascent_group_size,
                       "use a number of ranks that divides the world size, or 0 for all ranks")
        if not self.sync_ascent and self.ascent_group_size not in (0, 1):
            raise SharpnessConfigError(
                f"optim_args: sync_ascent=false (one perturbation per rank) and ascent_group_size="
                f"{self.ascent_group_size} (one per group of {self.ascent_group_size} ranks) contradict each other: "
                "keep one (sync_ascent=false is ascent_group_size=1)")

    def group_size(self, world: int) -> int:
        """Ranks sharing one perturbation (world: all of them, exact SAM)."""
        if not self.sync_ascent:
            return 1
        return self.ascent_group_size or world


class SAM(SharpnessMethod):
    rules = RULES  # every ascent rule (rules.py)
    schedulable = True

    @classmethod
    def check(cls, config, layout, samples_per_rank=None) -> None:
        world = layout.data_parallel_size
        size = config.group_size(world)
        what = ("sync_ascent=false (each rank perturbs by its own gradient)" if not config.sync_ascent else
                f"ascent_group_size={config.ascent_group_size} (one perturbation per group of ranks)")
        if world % size:
            raise SharpnessConfigError(
                f"optim_args: ascent_group_size={config.ascent_group_size} does not divide the {world} "
                f"process{'es' if world > 1 else ''} into equal groups; use a divisor of {world} "
                f"(e.g. ascent_group_size={max(1, world // 2)}) or 0 (all ranks)")
        if size < world and layout.reduces_every_pass:
            raise SharpnessConfigError(
                f"optim_args: {what} does not run under {layout.describe()}: every backward pass averages the "
                f"gradients over the ranks, so ranks cannot sit at different perturbed points. Use optim=msam with "
                f"micro_batches={world // size}, its equivalent there, or drop "
                f"{'sync_ascent' if not config.sync_ascent else 'ascent_group_size'}")
        if size < world and config.rule == "vasso":
            raise SharpnessConfigError(
                f"optim_args: rule=vasso with {what}: VaSSO's moving average would differ from group to group (one "
                "per perturbation), which no paper defines; drop "
                f"{'sync_ascent' if not config.sync_ascent else 'ascent_group_size'}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        world = self.layout.data_parallel_size
        self.group_size = self.config.group_size(world)
        if 1 < self.group_size < world:  # every rank creates every group, in the same order
            self.layout.rank_groups(self.group_size)

    def step(self, batches, passes):
        params, rule, world = self.params, self.rule, self.layout.data_parallel_size
        scale = passes.loss_scale()
        zero_grads(params)
        loss = run_batches(passes, batches, clean=True, ascent=rule.ascent_loss)
        if self.group_size > 1:
            self.layout.average_within(params, self.group_size)
        rule.absorb([p.grad for p in params], scale)  # VaSSO's average; nothing for the other rules
        saved = rule.backup(params)
        _, applied, norm = self.perturb_([p.grad for p in params], scale)
        if applied:
            zero_grads(params)
            perturbed_loss = run_batches(passes, batches, clean=False)
            restore(params, saved)
        elif rule.ascent_loss is not None:  # .grad holds the lower bound's gradient: the step needs f's at x
            zero_grads(params)
            perturbed_loss = run_batches(passes, batches, clean=False)
        else:
            perturbed_loss = loss  # no perturbation: g~ = g, already in .grad
        if applied or rule.ascent_loss is not None or self.group_size < world:
            self.layout.all_reduce_grads(params)
        return StepResult(loss, metrics={
            "sam/perturbed_loss": perturbed_loss, "sam/ascent_grad_norm": norm, "sam/skipped_ascent": float(not applied),
        })


register_method("sam", SAM, SAMConfig, "SAM with any ascent rule (rule=asam, sam_on, vasso, bisam): ascend to "
                "x + e, descend with the gradient there", paper="Foret et al. 2021; Kwon et al. 2021 (ASAM)",
                examples=(Example("SAM", "rho=0.05"), Example("ASAM", "rho=0.5,adaptive=true"),
                          Example("SAM (interval=4)", "rho=0.05,interval=4"), Example("SAM (DDP)", "rho=0.05", 2),
                          # the SAMPa paper's Table 8 rules (settings: its Appendix B.4)
                          Example("SAM-ON", "rho=0.5,rule=sam_on", meter=False),
                          Example("VaSSO", "rho=0.05,rule=vasso,theta=0.4"),
                          Example("BiSAM (-log)", "rho=0.05,rule=bisam,mu=1")))
