"""The trajectory loss SAF and MESA add to the training loss (Du, Zhou, Feng, Tan and Zhou, NeurIPS 2022,
"Sharpness-aware training for free"), and what the two share.

    L = f(x, B) + lambda * mean_i tau^2 KL( softmax(r_i / tau) || softmax(f_x(x_i) / tau) )

f_x(x_i) are the logits of example i, r_i a constant reference (SAF: the logits recorded E epochs earlier; MESA:
the logits of an exponential moving average of the weights). The term is active for epochs after `start_epoch`
(start_epoch < epoch, strict, as the authors' code). It changes the loss, not the passes: one forward + backward
per step (MESA: one no-grad forward more). The term joins the loss inside the host's own pass (a `LossTerm`,
methods/base.py), in the units of the host's loss, so gradient accumulation, loss scaling and several processes
treat it as they treat the loss itself. The logged `loss` is the model's own; `sam/trajectory_kl` is the mean of
tau^2 KL over the scored items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..config import SharpnessConfig, _bad, option


@dataclass
class TrajectoryOptions(SharpnessConfig):
    """Options of the trajectory loss; the ascent options every SAM method takes are not theirs."""

    # no ascent step: not options here (without help text they are refused in optim_args, naming the methods
    # that take them)
    rho: float = field(default=0.05)
    bn_stats: str = field(default="clean")
    kl_weight: float = option(0.8, "weight lambda of the trajectory loss (MESA: 0.8, SAMPa paper, Appendix B.4)", example=0.8)
    temperature: float = option(5.0, "temperature tau of the trajectory loss's softmax (the authors' --temperature default)",
                        example=5.0)
    start_epoch: int = option(5, "the trajectory loss is active in the epochs after start_epoch (epoch > "
                              "start_epoch, epochs counted from 0; Appendix B.4: 5; MESA: -1 from the first; SAF: at least "
                              "epochs_back - 1, the first epoch with logits from E epochs earlier)", example=5)

    def validate(self) -> None:
        super().validate()
        if not self.kl_weight >= 0:
            raise _bad("kl_weight", self.kl_weight, "kl_weight (the trajectory loss's lambda) must be >= 0 (e.g. kl_weight=0.8)")
        if not self.temperature > 0:
            raise _bad("temperature", self.temperature, "temperature (tau) must be > 0 (e.g. temperature=5)")
        if self.start_epoch < -1:
            raise _bad("start_epoch", self.start_epoch, "use an epoch >= 0, or -1 for the first epoch on")


def trajectory_kl(logits: torch.Tensor, reference: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 KL(softmax(reference/tau) || softmax(logits/tau)) over the last dimension, in fp32 at least."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits, reference = logits.to(dtype), reference.to(dtype)
    p = F.softmax(reference / tau, dim=-1)
    return tau ** 2 * (p * (F.log_softmax(reference / tau, dim=-1) - F.log_softmax(logits / tau, dim=-1))).sum(-1)


def is_causal_lm(model) -> bool:
    """Whether the model predicts the next token (its logits at t score the label at t + 1), as Trainer's
    compute_loss decides it for label smoothing."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    inner = getattr(model, "get_base_model", None)
    model = inner() if callable(inner) else model
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def scored(logits: torch.Tensor, reference: torch.Tensor, batch, causal: bool):
    """The logit rows that are scored: every row of [n, K] logits; of token logits [n, T, V], the positions whose
    label is not -100 (after the shift of a causal LM), all positions where the batch has no labels."""
    if logits.dim() == 2:
        return logits, reference
    labels = batch.get("labels") if hasattr(batch, "get") else None
    if causal:
        logits, reference = logits[:, :-1], reference[:, :-1]
        labels = labels[:, 1:] if torch.is_tensor(labels) else None
    if torch.is_tensor(labels) and labels.shape == logits.shape[:-1]:
        keep = labels.to(logits.device) != -100
        return logits[keep], reference[keep]
    return logits.reshape(-1, logits.shape[-1]), reference.reshape(-1, reference.shape[-1])


class KLMeter:
    """The mean tau^2 KL of the items a step scored (for `sam/trajectory_kl`)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, values: torch.Tensor) -> None:
        self.total += float(values.detach().sum())
        self.count += values.numel()

    def metrics(self, active: bool) -> dict:
        out = {"sam/active": float(active)}
        if self.count:
            out["sam/trajectory_kl"] = self.total / self.count
        return out
