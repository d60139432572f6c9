"""SAF and MESA (Du, Zhou, Feng, Tan, Zhou, NeurIPS 2022, "Sharpness-aware training for free").

Both add a trajectory loss to the training loss and take one ordinary gradient step (no ascent pass):

    L = mean_i CE(f_x(x_i), y_i) + lambda * mean_i tau^2 KL( softmax(r_i / tau) || softmax(f_x(x_i) / tau) )

    SAF : r_i = the logits the model produced for example i  E~ epochs earlier (a per-example memory)
    MESA: r_i = f_v(x_i), v an exponential moving average of the weights, v <- beta v + (1 - beta) x after
          every optimizer step (one extra forward of the EMA model per step, no backward through it)

The KL term is active for start_epoch < epoch < end_epoch (strict, as in the code). r is a constant (no
gradient). Authors' code (AngusDujw/SAF): SAF_train.py lines 717-737: logits are recorded into
`train_logits[idx, epoch % (E~+1)]` *before* the loss, and the reference is slot `(epoch - E~) % (E~+1)`;
`F.kl_div(F.softmax(out/T).log(), F.softmax(ref/T), reduction="none").sum(-1).mean() * T**2`, times
`--reinforce` (lambda). MESA_train.py lines 715-752: the teacher is timm's `ModelEmaV2` (timm/utils/
model_ema.py): a deepcopy made at the start of training, kept in **eval mode** (BatchNorm uses the EMA's
running statistics), averaging *every* state_dict entry (parameters and buffers) after each optimizer step,
from step 0 on (not only after start_epoch); its forward runs every step.
Defaults: SAMPa B.4 for MESA: start_epoch 5, lambda 0.8, beta 0.9995; tau = 5 (both scripts' --temperature).
SAF (not in B.4): run.sh uses lambda 0.3 (--reinforce), E~ = 2 (--minus_epoch; argparse default 3),
start_epoch 5, tau 5.
Memory: SAF keeps (E~ + 1) x N x K floats (N training examples, K classes) and needs a stable example id per
example; MESA keeps one extra copy of the weights and buffers.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .common import base_step, trainable


def trajectory_kl(logits: Tensor, ref_logits: Tensor, tau: float) -> Tensor:
    """Per-example tau^2 KL(softmax(ref/tau) || softmax(logits/tau))."""
    p = F.softmax(ref_logits / tau, dim=-1)
    return tau ** 2 * (p * (F.log_softmax(ref_logits / tau, dim=-1) - F.log_softmax(logits / tau, dim=-1))).sum(-1)


class LogitMemory:
    """SAF's per-example record: slot epoch % (E~+1) holds the logits of that epoch."""

    def __init__(self, num_examples: int, num_classes: int, epochs_back: int, dtype=torch.float32):
        self.epochs_back = epochs_back
        self.slots = torch.zeros(epochs_back + 1, num_examples, num_classes, dtype=dtype)

    def record(self, idx: Tensor, epoch: int, logits: Tensor) -> None:
        self.slots[epoch % (self.epochs_back + 1), idx] = logits.detach().to(self.slots.dtype)

    def reference(self, idx: Tensor, epoch: int) -> Tensor:
        return self.slots[(epoch - self.epochs_back) % (self.epochs_back + 1), idx]


def _ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def _grads(loss, params):
    return [torch.zeros_like(p) if g is None else g for p, g in
            zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def saf_step(model, logits_fn, batch, optimizer, memory: LogitMemory, epoch: int, lam: float = 0.3,
             tau: float = 5.0, start_epoch: int = 5, end_epoch: float = float("inf"), base_loss=_ce) -> Tensor:
    """One SAF step (one forward, one backward). Returns the loss."""
    params = trainable(model)
    logits = logits_fn(model, batch)
    memory.record(batch["idx"], epoch, logits)
    loss = base_loss(logits, batch["y"]).mean()
    if start_epoch < epoch < end_epoch:
        ref = memory.reference(batch["idx"], epoch).to(logits.dtype)
        loss = loss + lam * trajectory_kl(logits, ref, tau).mean()
    base_step(optimizer, params, _grads(loss, params))
    return loss.detach()


class WeightEMA:
    """MESA's teacher: v <- beta v + (1 - beta) x over every state_dict entry, in eval mode.

    Integer buffers (BatchNorm's num_batches_tracked) get the same formula truncated, as timm's copy_ does:
    the EMA's counter then stays where the copy started."""

    def __init__(self, model: nn.Module, beta: float = 0.9995):
        self.model = copy.deepcopy(model).eval()
        self.beta = beta
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for v, x in zip(self.model.state_dict().values(), model.state_dict().values()):
            v.copy_(self.beta * v + (1.0 - self.beta) * x)


def mesa_step(model, logits_fn, batch, optimizer, ema: WeightEMA, epoch: int, lam: float = 0.8,
              tau: float = 5.0, start_epoch: int = 5, end_epoch: float = float("inf"), base_loss=_ce) -> Tensor:
    """One MESA step: EMA forward (no grad), one forward/backward of the model, then the EMA update."""
    params = trainable(model)
    with torch.no_grad():
        ref = logits_fn(ema.model, batch)
    logits = logits_fn(model, batch)
    loss = base_loss(logits, batch["y"]).mean()
    if start_epoch < epoch < end_epoch:
        loss = loss + lam * trajectory_kl(logits, ref, tau).mean()
    base_step(optimizer, params, _grads(loss, params))
    ema.update(model)
    return loss.detach()
