"""mSAM (Behdin et al., 2023): one SAM perturbation per micro-batch.

The step's batch B is split into m micro-batches B_j of sizes differing by at most one (ranges may cross
Trainer's gradient-accumulation micro-batches):

    e_j = rho grad f(x, B_j) / ||grad f(x, B_j)||        (the ascent rule: ASAM's T, SAM-ON's norm layers; BiSAM:
                                                          the gradient of its lower bound Q(x, B_j))
    h_j = grad f(x + e_j, B_j)
    the base optimizer steps with sum_j (|B_j| / |B|) h_j

A slice is weighted by its part of the loss Trainer computes for the step (its tokens over the cycle's
`num_items_in_batch` for a token-normalised loss, its share of the micro-batch's items for a mean loss), so with
rho -> 0 mSAM is exactly the base optimizer for any m (DESIGN.md, "Units").

m = 1 is SAM. A batch with fewer than m samples (an epoch's short last batch) uses one micro-batch per sample.
Cost: two passes over B, in 2m smaller pieces. Memory: the weight backup and one gradient accumulator.
rule=vasso is refused: VaSSO averages one ascent gradient per step, and mSAM has m of them (one average per
micro-batch, or one fed m times a step, would both be inventions).

Several processes: where the layout averages gradients only when asked (data parallel), each rank takes m / N of
the micro-batches and only the final gradient is all-reduced. Where every backward averages over the ranks
(FSDP2), every rank splits its own share into m slices and pass j runs slice j on every rank at once: micro-batch
j of the global batch is the union of the ranks' j-th slices, with one shared perturbation e_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import batch_size, split_samples
from ..config import ScheduleOptions, SharpnessConfig, SharpnessConfigError, _bad, option
from ..registry import Example, register_method
from ..tensors import restore, zero_grads
from .base import SharpnessMethod, StepResult, run_pieces
from .rules import RULES, AscentOptions


@dataclass
class MSAMConfig(ScheduleOptions, AscentOptions, SharpnessConfig):
    micro_batches: int = option(8, "mSAM's m: micro-batches per step, each with its own perturbation (m = 1 is "
                                "SAM)", example=8)

    def validate(self) -> None:
        super().validate()
        if self.micro_batches < 1:
            raise _bad("micro_batches", self.micro_batches, "micro_batches must be >= 1 (e.g. micro_batches=8)")


def _ranks_sharing(layout) -> int:
    """Ranks the m micro-batches are spread over: all data-parallel ranks, or 1 where every backward averages
    over them (each rank then runs all m slices)."""
    return 1 if layout.reduces_every_pass else layout.data_parallel_size


class MSAM(SharpnessMethod):
    rules = RULES  # every ascent rule (rules.py)
    schedulable = True
    slices_batches = True
    extra_copies = 2  # the weight backup and the gradient accumulator

    @classmethod
    def check(cls, config, layout, samples_per_rank=None) -> None:
        refuse_vasso_per_micro_batch(config, "msam")
        m, world = config.micro_batches, _ranks_sharing(layout)
        if m % world:
            raise SharpnessConfigError(
                f"optim_args: micro_batches={m} cannot be spread evenly over {world} processes; "
                f"use a multiple of {world} (e.g. micro_batches={world * max(1, m // world)})")
        if samples_per_rank is not None and m // world > samples_per_rank:
            where = (f"{world} process(es) x {samples_per_rank} samples per rank" if world > 1
                     else f"{samples_per_rank} samples per rank")
            raise SharpnessConfigError(
                f"optim_args: micro_batches={m} is larger than the {samples_per_rank * world} samples of a step "
                f"({where}, per_device_train_batch_size x gradient_accumulation_steps); use micro_batches <= "
                f"{samples_per_rank * world}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local_micro_batches = self.config.micro_batches // _ranks_sharing(self.layout)

    def step(self, batches, passes):
        params = self.params
        scale = passes.loss_scale()
        acc = [None] * len(params)
        saved = None
        loss = perturbed_loss = 0.0
        norms, skipped = [], 0.0
        # An epoch's short last batch may hold fewer samples than m: then each sample is its own micro-batch.
        parts = min(self.local_micro_batches, sum(batch_size(b) for b in batches))
        ascent = self.rule.ascent_loss
        for pieces in split_samples(batches, parts):
            zero_grads(params)
            piece_loss = run_pieces(passes, pieces, clean=True, ascent=ascent)
            if saved is None:
                saved = self.rule.backup(params)
            self.rule.absorb([p.grad for p in params], scale)  # VaSSO (m = 1 only)
            _, applied, norm = self.perturb_([p.grad for p in params], scale)
            norms.append(norm)
            if applied:
                zero_grads(params)
                perturbed_loss = perturbed_loss + run_pieces(passes, pieces, clean=False)
                restore(params, saved)
            else:
                if ascent is not None:  # .grad holds the lower bound's gradient: h_j is f's at x
                    zero_grads(params)
                    run_pieces(passes, pieces, clean=False)
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
        self.layout.all_reduce_grads(params)
        return StepResult(loss, metrics={
            "sam/perturbed_loss": perturbed_loss,
            "sam/ascent_grad_norm": torch.stack(norms).mean(),
            "sam/skipped_ascent": skipped,
        })


def refuse_vasso_per_micro_batch(config, where: str) -> None:
    if config.rule == "vasso" and config.micro_batches > 1:
        raise SharpnessConfigError(
            f"optim_args: rule=vasso with micro_batches={config.micro_batches} ({where}): VaSSO keeps one moving "
            "average of the step's ascent gradient, and m micro-batches have m ascent gradients; one average per "
            "micro-batch, or one fed m times a step, is defined by no paper. Use micro_batches=1, or another rule")


register_method("msam", MSAM, MSAMConfig, "mSAM: one perturbation per micro-batch of the step",
                paper="Behdin et al. 2023",
                examples=(Example("mSAM (m=4)", "rho=0.05,micro_batches=4"),
                          Example("mSAM (m=4) + ASAM", "rho=0.5,micro_batches=4,rule=asam"),
                          Example("mSAM (m=4) + BiSAM", "rho=0.05,micro_batches=4,rule=bisam", bench=False)))
