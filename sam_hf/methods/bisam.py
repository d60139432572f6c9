"""BiSAM's ascent loss (Xie, Latorre, Antonakopoulos, Pethick, Cevher, ICML 2024): a lower bound of the 0-1 loss.

For an example i with logits f_i (K classes) and label y_i, the margins z_ij = f_ij - f_(i,y_i) (z_(i,y_i) = 0),
and

    Q = (1/n) sum_i (1/mu) log sum_(j=1..K) exp(mu phi(z_ij))
    phi(z) = 1 - log(1 + exp(gamma - z)),  gamma = log(e - 1)     (bisam_bound=log: phi(0) = 0, phi -> 1)
    phi(z) = tanh(alpha z)                                          (bisam_bound=tanh)

The sum over j includes the label (its term is exp(0) = 1). The authors' code (LIONS-EPFL/BiSAM, loss_fnc.py,
`perturbation_loss_log`) computes phi as `1 + softplus(z - gamma, beta=-1)`, the same function written with
the same softplus (so the values agree bit for bit), and omits the 1/mu, which does not change the direction
rho q/||q||. The ascent maximises Q; the descent uses the training loss (the authors' train.py: label-smoothed
cross-entropy).

Which outputs: the model's `logits` and the batch's integer `labels` (-100: not scored). Sequence and image
classification ([n, K] against [n]); token classification and masked LM ([n, L, K] against [n, L], every scored
position one example); causal LM after the shift (position t predicts label t + 1; `shift_labels` in the batch
is used as given). Regression and multi-label outputs have no 0-1 loss: refused.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..config import SharpnessConfigError

GAMMA = math.log(math.e - 1.0)
IGNORE = -100


class LowerBound:
    """Q's per-example terms: `(sum over the scored examples of q_i, their count)` from aligned logits and labels."""

    def __init__(self, bound: str = "log", mu: float = 1.0, alpha: float = 0.1):
        self.bound, self.mu, self.alpha = bound, mu, alpha

    def phi(self, z: torch.Tensor) -> torch.Tensor:
        if self.bound == "log":
            return 1.0 - F.softplus(GAMMA - z)
        return torch.tanh(self.alpha * z)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logits = logits.reshape(-1, logits.shape[-1]).to(dtype)
        labels = labels.reshape(-1)
        keep = labels != IGNORE
        logits, labels = logits[keep], labels[keep]
        if labels.numel() == 0:
            return logits.sum() * 0.0, 0
        z = logits - logits.gather(1, labels[:, None])
        q = torch.logsumexp(self.mu * self.phi(z), dim=1) / self.mu
        return q.sum(), int(labels.numel())


def logits_of(outputs):
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        logits = outputs.get("logits") if hasattr(outputs, "get") else None
    else:
        logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and len(outputs) > 1 and torch.is_tensor(outputs[1]):
        logits = outputs[1]  # (loss, logits, ...) as return_dict=False models give it
    return logits


def aligned(outputs, batch, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [..., K], labels [...]) paired position by position, from a model's outputs and its batch; a clear
    error where there is no 0-1 loss to bound."""
    logits = logits_of(outputs)
    if not torch.is_tensor(logits):
        raise SharpnessConfigError(
            "rule=bisam needs the model's logits (BiSAM bounds the 0-1 loss of a classifier), and its outputs have "
            f"no `logits` ({type(outputs).__name__}); use another rule for this model")
    labels = batch.get("shift_labels") if hasattr(batch, "get") else None
    if labels is not None:
        shift = False
    else:
        labels = batch.get("labels") if hasattr(batch, "get") else None
    if not torch.is_tensor(labels):
        raise SharpnessConfigError(
            "rule=bisam needs the batch's `labels` (the class of each example) to form the margins f_j - f_y; this "
            f"batch has keys {list(batch)}")
    if labels.is_floating_point():
        raise SharpnessConfigError(
            f"rule=bisam bounds the 0-1 loss of a classifier; these labels are {labels.dtype} (regression or "
            "multi-label), which has no 0-1 loss: use another rule")
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    if logits.shape[:-1] != labels.shape:
        raise SharpnessConfigError(
            f"rule=bisam pairs each label with a row of logits; logits {tuple(logits.shape)} and labels "
            f"{tuple(labels.shape)}{' (after the causal shift)' if shift else ''} do not pair (expected logits of "
            "shape labels.shape + (classes,))")
    return logits, labels


def scored(batch, shift: bool) -> int:
    """The number of scored examples (labels != -100; after the causal shift) in a batch."""
    labels = batch.get("shift_labels")
    if labels is None:
        labels = batch.get("labels")
        if shift and torch.is_tensor(labels):
            labels = labels[..., 1:]
    return int((labels != IGNORE).sum()) if torch.is_tensor(labels) else 0


def _bare(model):
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def shifts_labels(model) -> bool:
    """Whether the model is a causal LM (its loss predicts label t + 1 at position t)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = _bare(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    causal = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update(v if isinstance(v, (tuple, list)) else (v,))
    return type(model).__name__ in causal or LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss


def check_model(model) -> None:
    """Refuse, before training, models whose outputs have no 0-1 loss (regression, multi-label)."""
    config = getattr(_bare(model), "config", None)
    problem = getattr(config, "problem_type", None)
    if problem in ("regression", "multi_label_classification"):
        raise SharpnessConfigError(
            f"rule=bisam bounds the 0-1 loss of single-label classification; this model's problem_type is "
            f"{problem!r}, which has none: use another rule")
    name = type(_bare(model)).__name__
    if name.endswith("ForSequenceClassification") and getattr(config, "num_labels", 2) == 1:
        raise SharpnessConfigError(
            f"rule=bisam bounds the 0-1 loss of classification; {name} with num_labels=1 is a regression model: use "
            "another rule")
