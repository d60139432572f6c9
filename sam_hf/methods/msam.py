"""mSAM (Behdin et al., 2023): one SAM perturbation per micro-batch.

The step's batch B is split into m micro-batches B_j of sizes differing by at
most one (ranges may cross Trainer's gradient-accumulation micro-batches):

    e_j = rho grad f(x, B_j) / ||grad f(x, B_j)||
    h_j = grad f(x + e_j, B_j)
    the base optimizer steps with sum_j (|B_j| / |B|) h_j

A slice is weighted by its part of the loss Trainer computes for the step
(its tokens over the cycle's `num_items_in_batch` for a token-normalised
loss, its share of the micro-batch's items for a mean loss), so with rho -> 0
mSAM is exactly the base optimizer for any m (DESIGN.md, "Units").

m = 1 is SAM. A batch with fewer than m samples (an epoch's short last batch) uses one micro-batch per
sample. Cost: two passes over B, in 2m smaller pieces. Memory: the
weight backup and one gradient accumulator. Only the final gradient is
all-reduced across ranks; each rank takes its share of the m micro-batches.
"""

from __future__ import annotations

import torch

from ..batching import batch_size, split_samples
from .base import SharpnessMethod, StepResult, backup, restore, run_pieces, zero_grads


class MSAM(SharpnessMethod):
    name = "msam"

    def __init__(self, *args, micro_batches: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # With data parallelism each rank owns m / world_size of the micro-batches.
        self.local_micro_batches = micro_batches or self.config.micro_batches

    def step(self, batches, passes):
        params = self.params
        scale = passes.loss_scale()
        acc = [None] * len(params)
        saved = None
        loss = perturbed_loss = 0.0
        norms, skipped = [], 0.0
        # An epoch's short last batch may hold fewer samples than m: then each sample is its own micro-batch.
        parts = min(self.local_micro_batches, sum(batch_size(b) for b in batches))
        for pieces in split_samples(batches, parts):
            zero_grads(params)
            piece_loss = run_pieces(passes, pieces, clean=True)
            if saved is None:
                saved = backup(params)
            applied, norm = self.perturb_([p.grad for p in params], scale)
            norms.append(norm)
            if applied:
                zero_grads(params)
                perturbed_loss = perturbed_loss + run_pieces(passes, pieces, clean=False)
                restore(params, saved)
            else:
                perturbed_loss = perturbed_loss + piece_loss
                skipped += 1
            loss = loss + piece_loss
            with torch.no_grad():  # each piece's loss is its part of the step's loss: the h_j simply add up
                for i, p in enumerate(params):
                    if p.grad is not None:
                        # the first h_j is kept as it is: the next pass allocates a fresh .grad
                        acc[i] = p.grad if acc[i] is None else acc[i].add_(p.grad)
        for p, a in zip(params, acc):
            p.grad = a
        passes.all_reduce_grads(params)
        return StepResult(loss, metrics={
            "sam/perturbed_loss": perturbed_loss,
            "sam/ascent_grad_norm": torch.stack(norms).mean(),
            "sam/skipped_ascent": skipped,
        })
