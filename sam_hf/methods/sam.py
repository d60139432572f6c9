"""SAM (Foret et al., 2021), with any ascent rule (ASAM: `adaptive=true`), optionally on a schedule.

One step on batch B (all micro-batches of a gradient-accumulation cycle):

    g  = grad f(x, B)
    e  = rho g / ||g||                 (the ascent rule, methods/rules.py; ASAM: rho T^2 g / ||T g||)
    g~ = grad f(x + e, B)
    x is restored by copy; the base optimizer steps with g~.

Cost: two sequential forward+backward passes. Memory: one copy of the trainable weights (the backup x); e is
applied parameter by parameter from `.grad`. With several ranks the ascent gradient is averaged first (exact SAM
on the global batch); `sync_ascent=false` perturbs each rank by its own gradient, which is mSAM with m = world
size, at one all-reduce per step (refused where every backward averages over the ranks, FSDP2: use mSAM).
`interval`/`start`/`stop` (ScheduleOptions) make the other steps the base optimizer's own one-pass step.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ScheduleOptions, SharpnessConfig, SharpnessConfigError, option
from ..registry import Example, register_method
from ..tensors import backup, restore, zero_grads
from .base import SharpnessMethod, StepResult, run_batches
from .rules import AscentOptions


@dataclass
class SAMConfig(ScheduleOptions, AscentOptions, SharpnessConfig):
    sync_ascent: bool = option(True, "several processes: average the ascent gradient over the ranks (exact SAM on "
                               "the global batch); false perturbs each rank by its own (mSAM with m = ranks)",
                               example="false")


class SAM(SharpnessMethod):
    schedulable = True

    @classmethod
    def check(cls, config, layout, samples_per_rank=None) -> None:
        if not config.sync_ascent and layout.reduces_every_pass:
            raise SharpnessConfigError(
                f"optim_args: sync_ascent=false (each rank perturbs by its own gradient) does not run under "
                f"{layout.describe()}: every backward pass averages the gradients over the ranks, so ranks cannot "
                f"sit at different perturbed points. Use optim=msam with micro_batches={layout.world_size}, its "
                "equivalent there, or drop sync_ascent")

    def step(self, batches, passes):
        params, cfg = self.params, self.config
        zero_grads(params)
        loss = run_batches(passes, batches, clean=True)
        if cfg.sync_ascent:
            self.layout.all_reduce_grads(params)
        saved = backup(params)
        _, applied, norm = self.perturb_([p.grad for p in params], passes.loss_scale())
        if applied:
            zero_grads(params)
            perturbed_loss = run_batches(passes, batches, clean=False)
            restore(params, saved)
        else:
            perturbed_loss = loss  # no perturbation: g~ = g, already in .grad
        if applied or not cfg.sync_ascent:
            self.layout.all_reduce_grads(params)
        return StepResult(loss, metrics={
            "sam/perturbed_loss": perturbed_loss, "sam/ascent_grad_norm": norm, "sam/skipped_ascent": float(not applied),
        })


register_method("sam", SAM, SAMConfig, "SAM (ASAM with adaptive=true): ascend to x + rho g/||g||, descend with the "
                "gradient there", paper="Foret et al. 2021; Kwon et al. 2021 (ASAM)",
                examples=(Example("SAM", "rho=0.05"), Example("ASAM", "rho=0.5,adaptive=true"),
                          Example("SAM (interval=4)", "rho=0.05,interval=4"), Example("SAM (DDP)", "rho=0.05", 2)))
