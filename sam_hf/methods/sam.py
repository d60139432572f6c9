"""SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021).

One step on batch B (all micro-batches of a gradient-accumulation cycle):

    g  = grad f(x, B)
    e  = rho g / ||g||                 ASAM: e = rho T^2 g / ||T g||, T = |x| + eta
                                       (T = 1 for biases, as in the ASAM authors' code)
    g~ = grad f(x + e, B)
    x is restored by copy; the base optimizer steps with g~.

Cost: two sequential forward+backward passes. Memory: one copy of the trainable
weights (the backup x); e is applied parameter by parameter from `.grad`.
With several ranks the ascent gradient is averaged first (exact SAM on the
global batch); `sync_ascent=false` perturbs each rank by its own gradient,
which is mSAM with m = world size.
"""

from __future__ import annotations

from .base import SharpnessMethod, StepResult, backup, restore, run_batches, zero_grads


class SAM(SharpnessMethod):
    name = "sam"

    def step(self, batches, passes):
        params, cfg = self.params, self.config
        zero_grads(params)
        loss = run_batches(passes, batches, clean=True)
        if cfg.sync_ascent:
            passes.all_reduce_grads(params)
        saved = backup(params)
        applied, norm = self.perturb_([p.grad for p in params], passes.loss_scale())
        if applied:
            zero_grads(params)
            perturbed_loss = run_batches(passes, batches, clean=False)
            restore(params, saved)
        else:
            perturbed_loss = loss  # no perturbation: g~ = g, already in .grad
        if applied or not cfg.sync_ascent:
            passes.all_reduce_grads(params)
        return StepResult(loss, metrics={
            "sam/perturbed_loss": perturbed_loss, "sam/ascent_grad_norm": norm, "sam/skipped_ascent": float(not applied),
        })
