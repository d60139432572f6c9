"""What a batch holds: its loss (the model's own, by default) and its number of examples."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

LossFn = Callable[[nn.Module, object], torch.Tensor]


def loss_of(outputs) -> torch.Tensor:
    """The loss in a model's outputs, as Trainer reads it: `outputs["loss"]` for dict-like outputs
    (ModelOutput), the first element of a tuple, or the tensor itself."""
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)):
        loss = outputs[0] if outputs else None
    elif torch.is_tensor(outputs):
        loss = outputs
    else:
        loss = getattr(outputs, "loss", None)
    if loss is None or not torch.is_tensor(loss) or loss.numel() != 1:
        raise ValueError("measure_sharpness: the model returned no scalar loss for a batch; give the batches their "
                         "labels, or pass loss_fn(model, batch) -> scalar")
    return loss.reshape(())


def model_loss(model: nn.Module, batch) -> torch.Tensor:
    """The default loss: the model's own mean loss on the batch (`model(**batch)`)."""
    if isinstance(batch, Mapping):
        return loss_of(model(**batch))
    if isinstance(batch, (tuple, list)):
        return loss_of(model(*batch))
    return loss_of(model(batch))


def count_examples(batch) -> int:
    """Examples in a batch: the length of `labels` if present, else of the first tensor found. Unlike the
    training batches' `batching.batch_size` (dicts from a collator), a measured batch may be a tuple or a tensor."""
    if isinstance(batch, Mapping):
        values = [batch["labels"]] if torch.is_tensor(batch.get("labels")) else list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        values = [batch]
    for value in values:
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, (Mapping, tuple, list)) and value:
            return count_examples(value)
    raise ValueError("measure_sharpness: cannot tell how many examples a batch holds (no tensor with a batch "
                     "dimension in it); batches must be dicts, tuples or tensors of batched tensors")


def by_length(examples: list) -> list:
    """Examples sorted by their number of tokens (`input_ids`, stable), so that batches cut from them in order
    pad little; unchanged unless every example is a mapping with a sized `input_ids`. The mean loss over a
    sample does not depend on how it is batched, and masked padding changes no example's loss, so this changes
    the measured Hessian by round-off only, for a fraction of the padded tokens (on SST-2, 64 sentences in
    batches of 32: 1,632 tokens instead of 2,368)."""
    if not examples or not all(isinstance(e, Mapping) and hasattr(e.get("input_ids"), "__len__") for e in examples):
        return list(examples)
    return sorted(examples, key=lambda e: len(e["input_ids"]))
