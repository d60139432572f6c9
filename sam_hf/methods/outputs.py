"""Reading a pass's model outputs: the logits, and the items (examples or scored tokens) they score.

Methods that read outputs (SAF's and MESA's trajectory loss, ESAM's data selection) get what the host's pass
returned: Trainer's `compute_loss(..., return_outputs=True)` outputs, or what a plain loop's `loss_fn` returned (a
mapping with `logits`, as Hugging Face models return, or a tuple `(loss, logits, ...)`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import SharpnessConfigError


def logits_of(outputs, method: str) -> torch.Tensor:
    """The logits in a pass's outputs; a clear error where there are none."""
    logits = None
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    elif isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        logits = outputs[1]
    else:
        logits = getattr(outputs, "logits", None)
    if not torch.is_tensor(logits):
        raise SharpnessConfigError(
            f"--optim {method} reads the model's logits, but its outputs have none ({type(outputs).__name__}); it runs "
            "on models that return `logits` (classification, token classification, language models)")
    return logits


def labels_of(batch, method: str) -> torch.Tensor:
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not torch.is_tensor(labels):
        raise SharpnessConfigError(f"--optim {method} with these options needs the batch's `labels` (class indices), "
                                   f"and this batch has none (keys: {list(batch) if isinstance(batch, Mapping) else batch})")
    return labels
