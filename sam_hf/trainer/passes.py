"""Forward + backward exactly as `Trainer.training_step` does them: the passes a method runs inside Trainer.

Units (DESIGN.md): a whole micro-batch is normalised as Trainer normalises it; a slice of one (mSAM's B_j,
Asynchronous SAM's A_t) contributes exactly its part of that micro-batch's loss. A pass at perturbed weights
leaves BatchNorm running statistics alone (`bn_stats=clean`), and a pass over samples already counted leaves
the per-pass metrics some Trainer subclasses keep (TRL's) alone, so each sample counts once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import torch
from torch import nn

from ..batching import TrainerBatch
from ..methods import bisam
from ..tensors import frozen_running_stats

logger = logging.getLogger(__name__)


# Per-pass bookkeeping some Trainer subclasses keep in compute_loss (TRL: token count, entropy, accuracy).
_PASS_METRIC_ATTRS = ("_metrics", "_total_train_tokens")


@contextlib.contextmanager
def _kept_pass_metrics(trainer):
    """A pass that does not count leaves the subclass's per-pass metrics as they were: each sample counts once."""
    saved = {k: copy.deepcopy(getattr(trainer, k)) for k in _PASS_METRIC_ATTRS if hasattr(trainer, k)}
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)


class TrainerPasses:
    """Forward + backward exactly as `Trainer.training_step` does them (see methods/base.py).

    Units (DESIGN.md): a whole micro-batch is normalised as Trainer normalises it; a slice of one (mSAM's B_j,
    Asynchronous SAM's A_t) contributes exactly its part of that micro-batch's loss. It is given the cycle's
    `num_items_in_batch`, so a loss that divides by the count (causal LMs, a `compute_loss_func` that uses it)
    is its part as it stands; a loss that is a mean over the micro-batch (the model ignores the count, or gets
    none) is weighted by the slice's share of the micro-batch's items (labels != -100, as Trainer counts them).
    Which of the two a loss is, Trainer cannot know: it is measured once (`_loss_uses_count`).
    """

    def __init__(self, trainer: "SharpnessMixin", model: nn.Module, num_items_in_batch, hidden: tuple[str, ...] = ()):
        self.trainer = trainer
        # The passes run on the bare module (sam_hf does not wrap it in DDP, see `_wrap_model`; a wrapper from
        # elsewhere would average the two roles' gradients): reductions happen where the method asks for them.
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.num_items_in_batch = num_items_in_batch
        self.batchnorms = trainer._sharpness_batchnorms
        self.hidden = hidden  # batch columns the method reads itself (an example id): the model never sees them

    def backward(self, batch, fraction: float = 1.0, clean: bool = True, part_of=None, weight: float = 1.0,
                 loss_term=None, ascent=None, last: bool = True) -> torch.Tensor:
        """See methods.base.GradientPasses. With `ascent` (BiSAM's lower bound) the pass backpropagates it, from the
        outputs' `logits` and the batch's `labels` (a causal LM's shifted), in mean-loss units: the sum over the
        piece's scored examples / the micro-batch's scored examples / the accumulation steps."""
        t = self.trainer
        layout = t._sharpness_layout
        layout.before_forward()
        source = batch if part_of is None else part_of  # a slice is normalised as its micro-batch
        num_items = getattr(source, "num_items_in_batch", self.num_items_in_batch)
        # A held batch (SAMPa's B_t) is normalised by the accumulation steps of the cycle it came from.
        steps = getattr(source, "accumulation_steps", None) or t.current_gradient_accumulation_steps
        num_items, world_factor = t._sharpness_role_units(num_items)
        freeze = not clean and t.sharpness_config.bn_stats == "clean" and self.batchnorms
        # Both contexts end after the backward: BatchNorm saves its running statistics for it, so restoring them
        # in place before would fail autograd's version check.
        with (frozen_running_stats(self.batchnorms) if freeze else contextlib.nullcontext(),
              contextlib.nullcontext() if self._counts(batch, part_of) else _kept_pass_metrics(t)):
            if ascent is not None:  # the rule's ascent loss is backpropagated; the model's own loss is reported
                own, outputs = self._loss(batch, num_items, return_outputs=True)
                loss = None
            elif loss_term is None:
                loss, own = self._loss(batch, num_items), None
            else:  # the model's own loss is reported; the method's term joins it for the backward
                own, outputs = self._loss(batch, num_items, return_outputs=True)
                values = loss_term(outputs, batch)
                loss = own if values is None else own + self._in_loss_units(values, batch, num_items)
            if t.loss_is_scaled_for_ga is not None:
                scaled_for_ga = t.loss_is_scaled_for_ga
            else:  # Trainer's rule: the loss was normalised by num_items_in_batch already
                scaled_for_ga = (t.model_accepts_loss_kwargs and num_items is not None) or t.compute_loss_func is not None
            share = (self._item_share(batch, part_of, fraction)
                     if part_of is not None and not self._loss_uses_count(batch, num_items) else None)
            if ascent is not None:
                layout.backward(self._ascent_loss(ascent, outputs, batch, part_of, steps), last, t.accelerator.backward)
            else:
                loss = self._normalised(loss, world_factor, share, None if scaled_for_ga else steps, weight)
                layout.backward(loss, last, t.accelerator.backward)
            if own is not None:
                loss = self._normalised(own, world_factor, share, None if scaled_for_ga else steps, weight)
        return loss.detach()

    def _ascent_loss(self, ascent, outputs, batch, part_of, steps):
        shift = self._shifts()
        total, _ = ascent(*bisam.aligned(outputs, batch, shift))
        return total / max(bisam.scored(part_of if part_of is not None else batch, shift), 1) / steps

    def _shifts(self) -> bool:
        """Whether the model is a causal LM (BiSAM's margins then pair position t with label t + 1)."""
        t = self.trainer
        if getattr(t, "_sharpness_shifts_labels", None) is None:
            t._sharpness_shifts_labels = bisam.shifts_labels(t.model)
        return t._sharpness_shifts_labels

    def _normalised(self, loss, world_factor, share, steps, weight):
        """Trainer's normalisation of a micro-batch's loss, in its order: the role-mode world factor, the mean over
        DataParallel's GPUs, a slice's share of its micro-batch, the accumulation steps; then a method's weight."""
        if world_factor != 1.0:
            loss = loss * world_factor
        if self.trainer.args.n_gpu > 1:
            loss = loss.mean()
        if share is not None:
            loss = loss * share
        if steps is not None:
            loss = loss / steps
        if weight != 1.0:
            loss = loss * weight
        return loss

    def forward(self, batch, clean: bool = True):
        """The model's outputs on `batch` without gradients (compute_loss with return_outputs=True); the per-pass
        metrics are kept, and so are BatchNorm statistics for a pass at perturbed weights (`clean=False`)."""
        t = self.trainer
        t._sharpness_layout.before_forward(backward=False)
        num_items, _ = t._sharpness_role_units(getattr(batch, "num_items_in_batch", self.num_items_in_batch))
        freeze = not clean and t.sharpness_config.bn_stats == "clean" and self.batchnorms
        with (torch.no_grad(), frozen_running_stats(self.batchnorms) if freeze else contextlib.nullcontext(),
              _kept_pass_metrics(t)):
            return self._loss(batch, num_items, return_outputs=True)[1]

    def _in_loss_units(self, values: torch.Tensor, batch, num_items) -> torch.Tensor:
        """Per-item values added as compute_loss's own loss counts its items: summed over the cycle's count where
        the loss divides by it, else averaged over this batch; times the world factor compute_loss applies under
        transformers' rule (`average_tokens_across_devices` with a count)."""
        t = self.trainer
        values = values.reshape(-1)
        if num_items is not None and self._loss_uses_count(batch, num_items):
            term = values.sum() / num_items
        else:
            term = values.mean()
        if (t.args.average_tokens_across_devices and (t.model_accepts_loss_kwargs or t.compute_loss_func)
                and num_items is not None):
            term = term * t.accelerator.num_processes
        return term

    def _counts(self, batch, part_of) -> bool:
        """Whether this pass's per-pass metrics count: the first pass over a sample in a step does (SAM's clean
        pass, mSAM's clean slices, SAMPa's lookahead pass, Asynchronous SAM's descent), a pass over a batch already
        counted, or over a slice of one, does not (SAM's second pass, SAMPa's held B_t, the ascent batch A_t).
        In role mode only the role whose pass counts in one process counts (the method's `metrics_role`)."""
        if not self.trainer._sharpness_layout.counts_pass_metrics(self.trainer._sharpness_optimizer.method):
            return False
        if getattr(batch, "metrics_counted", False) or getattr(part_of, "metrics_counted", False):
            return False
        if isinstance(batch, TrainerBatch):
            batch.metrics_counted = True
        return True

    def _loss(self, batch, num_items, return_outputs: bool = False):
        t = self.trainer
        with t.compute_loss_context_manager(), t._sharpness_layout.pass_gathers(t.accelerator):
            # a shallow copy: Trainer's compute_loss pops "labels" (label smoothing, compute_loss_func), and the
            # same batch runs again (SAM's second pass, SAMPa's held batch)
            inputs = {k: v for k, v in batch.items() if k not in self.hidden}
            return t.compute_loss(self.model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items)

    def _loss_uses_count(self, batch, num_items) -> bool:
        """Whether the loss divides by `num_items_in_batch`: measured once per trainer, from two forward passes
        of one slice with the count and twice the count (same RNG, BatchNorm statistics and metrics kept)."""
        t = self.trainer
        if num_items is None:
            return False
        if t._sharpness_loss_uses_count is not None:
            return t._sharpness_loss_uses_count
        device = t.args.device
        devices = [device.index or 0] if device.type == "cuda" else []
        losses = []
        with torch.no_grad(), frozen_running_stats(self.batchnorms), _kept_pass_metrics(t):
            for count in (num_items, num_items * 2):
                with torch.random.fork_rng(devices=devices):
                    losses.append(float(self._loss(batch, count).float().mean()))
        one, two = losses
        if not (math.isfinite(one) and one != 0.0):
            return True  # nothing to tell from this slice (no items): its part is 0 either way; ask again later
        uses = abs(2 * two - one) <= 1e-3 * abs(one)
        if not uses and abs(two - one) > 1e-3 * abs(one):
            logger.warning("sam_hf: the loss neither divides by num_items_in_batch nor ignores it (%.6g with the "
                           "count, %.6g with twice the count); slices of a micro-batch are given the cycle's count "
                           "and taken as they are", one, two)
            uses = True
        t._sharpness_loss_uses_count = uses
        logger.info("sam_hf: the loss %s num_items_in_batch: a slice of a micro-batch counts %s",
                    "divides by" if uses else "ignores",
                    "as the loss gives it" if uses else "its share of the micro-batch's items")
        return uses

    def _item_share(self, batch, whole, fraction: float):
        """The slice's share of its micro-batch's items, as Trainer counts items (labels != -100, shifted for a
        causal LM); the sample share where the batch has no labels."""
        t = self.trainer

        def items(b):
            if "shift_labels" in b:
                labels = b["shift_labels"]
            else:
                labels = b.get("labels")
                if torch.is_tensor(labels) and getattr(t, "_loss_shifts_labels", False):
                    labels = labels[..., 1:]
            return labels.ne(-100).sum() if torch.is_tensor(labels) else None

        part, total = items(batch), items(whole)
        if part is None or total is None:
            return fraction
        return part / total.clamp_min(1)

    def loss_scale(self) -> float:
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        host = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return self.trainer._sharpness_layout.loss_scale(host)
