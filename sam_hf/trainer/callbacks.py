"""Trainer's logging and schedule, followed: sam_hf's log lines, its sam/ metrics, and skipped updates."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from transformers import TrainerCallback

from ..optim import SharpnessOptimizer


# Reported as a count per logging interval; every other sam/ metric is averaged over it.
COUNTED_METRICS = ("sam/skipped_ascent", "sam/skipped_update")


_mirrored_handlers: list[logging.Handler] = []


def follow_transformers_logging() -> None:
    """sam_hf's info lines appear where Trainer's own do: the `sam_hf` logger takes the level Trainer set for
    transformers on this process (`--log_level`, `--log_level_replica`) and writes through transformers' handlers
    (or propagates where transformers does). Handlers a user added to `sam_hf` are left alone."""
    from transformers.utils import logging as hf_logging

    theirs, ours = hf_logging.get_logger(), logging.getLogger("sam_hf")
    ours.setLevel(theirs.getEffectiveLevel())
    for handler in _mirrored_handlers:
        ours.removeHandler(handler)
    _mirrored_handlers[:] = theirs.handlers
    for handler in _mirrored_handlers:
        ours.addHandler(handler)
    ours.propagate = theirs.propagate


def loss_factor_note(args, plan, loss_takes_count: bool) -> str | None:
    """One line for multi-process runs: the factor transformers puts on the logged loss (None where it puts none).

    With `average_tokens_across_devices` and a loss that takes `num_items_in_batch` (a model whose forward takes
    **kwargs, or a compute_loss_func), Trainer divides by all ranks' items and multiplies each rank's loss by the
    number of data-parallel replicas (sam_hf counts k of them in role mode, not 2k): right for a loss divided by
    the count, a factor on one that is a mean."""
    if not plan.distributed or not args.average_tokens_across_devices or not loss_takes_count:
        return None
    factor = plan.dp_size if plan.mode == "roles" else plan.world_size
    if factor == 1:  # role mode on 2 processes: one replica, nothing to say
        return None
    return (f"sam_hf: {plan.world_size} processes: transformers multiplies each rank's training loss by {factor} "
            f"(average_tokens_across_devices=True and a loss that takes num_items_in_batch): a loss divided by "
            f"the count logs the global batch's mean, but one that is a plain mean (e.g. "
            f"BertForSequenceClassification's) logs loss, and eval_loss, {factor} times too large; see "
            f"docs/exactness.md, 'Where transformers itself surprises'")


class MetricMeter:
    """The sam/ metrics of the steps since the last log: averaged, except the counts in COUNTED_METRICS."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] += 1

    def pop(self) -> dict[str, float]:
        out = {k: float(v) if k in COUNTED_METRICS else float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums.clear()
        self.counts.clear()
        return out


class SkippedUpdateCallback(TrainerCallback):
    """A step the method made no update in (SAMPa's first step) leaves the learning-rate schedule where it was, so
    the k-th update uses the schedule's k-th value. Trainer steps the scheduler unless accelerate reports the
    optimizer step as skipped (its rule for an fp16 overflow); this sets that report for such a step."""

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "_sam_hf_marked_skipped", False):  # without a GradScaler nothing else resets it
            optimizer._is_overflow = optimizer._sam_hf_marked_skipped = False

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, SharpnessOptimizer) and inner.skipped_last_step and hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = optimizer._sam_hf_marked_skipped = True
