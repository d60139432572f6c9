"""MESA, Memory-Efficient Sharpness-Aware training (Du, Zhou, Feng, Tan and Zhou, NeurIPS 2022): the trajectory
loss (methods/trajectory.py) against the logits of an exponential moving average of the weights.

    r_i = f_v(x_i),   v <- beta v + (1 - beta) x after every optimizer step (v = x_0 at the start)

One forward + backward per step plus one no-grad forward of the averaged model. As in the authors' code
(AngusDujw/SAF, MESA_train.py lines 715-752, with timm's ModelEmaV2) the averaged model runs in eval mode
(dropout off, BatchNorm with the average of the running statistics) and every floating-point entry of the state
is averaged from the first step on, buffers included. sam_hf keeps no second model: the average of the trainable
parameters and of the model's persistent floating-point buffers is swapped into the model (copies, exact) for its
forward and swapped back. So with PEFT only the adapters are averaged (the frozen weights are constants: the
code's average of them equals them up to round-off), and the extra memory is one copy of the trainable
parameters. Where the code differs, sam_hf follows the paper: it skips the teacher's forward before start_epoch
(the code runs it every step; it changes nothing), and BatchNorm's integer counter is not averaged (the code's
truncated average leaves it nearly frozen; eval mode never reads it). The average is updated lazily at the start
of the next step (the same values: nothing changes the weights in between), so a checkpoint holds v and a flag.

Token-level outputs work too: the KL is per scored token (labels != -100, after the shift of a causal LM), in the
units of the model's loss. Several processes: the weights are replicas, so is their average; each rank's forward
is on its own examples and the term is averaged with the gradients: 1 and N processes agree.
Defaults: start_epoch 5, lambda 0.8, beta 0.9995 (SAMPa paper, Appendix B.4); tau 5 (the code's --temperature).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..config import _bad, option
from ..registry import Example, register_method
from ..tensors import to_device, zero_grads
from .base import SharpnessMethod, StepResult
from .outputs import logits_of
from .trajectory import KLMeter, TrajectoryOptions, is_causal_lm, scored, trajectory_kl


@dataclass
class MESAConfig(TrajectoryOptions):
    decay: float = option(0.9995, "MESA's beta: the weight average's decay, v <- beta v + (1 - beta) x after every "
                          "optimizer step (SAMPa paper, Appendix B.4: 0.9995)", example=0.9995)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.decay < 1.0:
            raise _bad("decay", self.decay, "decay (MESA's beta) must be in [0, 1) (e.g. decay=0.9995)")


def _averaged_buffers(model) -> list[tuple[str, torch.Tensor]]:
    """The model's persistent floating-point buffers (BatchNorm's running statistics), by name."""
    out = []
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                out.append((f"{module_name}.{name}" if module_name else name, buffer))
    return out


class MESA(SharpnessMethod):
    perturbs = False
    extra_copies = 1  # the weight average v
    needs_outputs = True
    needs_epoch = True
    needs_model = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.average: list[torch.Tensor] | None = None  # v of the trainable parameters, indexed like self.params
        self.average_buffers: dict[str, torch.Tensor] = {}
        self.pending = False  # an optimizer step was taken since v was last updated
        self.causal = is_causal_lm(self.model)

    @torch.no_grad()
    def update_average(self) -> None:
        """v <- x at the first step; v <- beta v + (1 - beta) x once per optimizer step after it."""
        buffers = _averaged_buffers(self.model)
        if self.average is None:
            self.average = [p.detach().clone() for p in self.params]
            self.average_buffers = {n: b.detach().clone() for n, b in buffers}
        elif self.pending:
            beta = self.config.decay
            for v, p in zip(self.average, self.params):
                v.mul_(beta).add_(p.detach(), alpha=1.0 - beta)
            for name, b in buffers:
                v = self.average_buffers.get(name)
                if v is None:
                    self.average_buffers[name] = b.detach().clone()
                else:
                    v.mul_(beta).add_(b.detach(), alpha=1.0 - beta)
        self.pending = False

    @contextlib.contextmanager
    def averaged_model(self):
        """The model with v in place of x (and the averaged buffers), in eval mode; x and the modes restored."""
        model = self.model
        pairs = list(zip(self.params, self.average))
        pairs += [(b, self.average_buffers[n]) for n, b in _averaged_buffers(model) if n in self.average_buffers]
        modes = [(m, m.training) for m in model.modules()]
        _swap(pairs)
        try:
            model.eval()
            yield
        finally:
            _swap(pairs)
            for m, mode in modes:
                m.training = mode

    def step(self, batches, passes):
        cfg, epoch = self.config, self.progress.epoch
        active = cfg.start_epoch < epoch
        self.update_average()
        meter = KLMeter()
        zero_grads(self.params)
        loss = 0.0
        for batch in batches:
            term = None
            if active:
                with self.averaged_model():
                    reference = logits_of(passes.forward(batch), self.name).detach()

                def term(outputs, batch, reference=reference):
                    logits, ref = scored(logits_of(outputs, self.name), reference, batch, self.causal)
                    values = trajectory_kl(logits, ref.to(logits.device), cfg.temperature)
                    meter.add(values)
                    return cfg.kl_weight * values

            loss = loss + passes.backward(batch, clean=True, loss_term=term)
        self.layout.all_reduce_grads(self.params)
        self.pending = True
        return StepResult(loss, metrics=meter.metrics(active))

    def state_dict(self):
        return {"average": self.average, "average_buffers": self.average_buffers, "pending": self.pending}

    def load_state_dict(self, state):
        self.average = to_device(state.get("average"), self.device)
        self.average_buffers = to_device(state.get("average_buffers") or {}, self.device)
        self.pending = bool(state.get("pending", self.average is not None))


@torch.no_grad()
def _swap(pairs) -> None:
    """Exchange the values of each (tensor, tensor) pair in place, one tensor's worth of scratch at a time."""
    for a, b in pairs:
        scratch = a.detach().clone()
        a.copy_(b)
        b.copy_(scratch)
        del scratch


register_method("mesa", MESA, MESAConfig, "MESA: the training loss plus a KL term towards the logits of an exponential "
                "moving average of the weights (one extra forward, one copy)", paper="Du et al. 2022b",
                examples=(Example("MESA", "kl_weight=0.8,decay=0.9995,start_epoch=-1"),
                          Example("MESA (DDP)", "kl_weight=0.8,decay=0.9995,start_epoch=-1", 2)))
