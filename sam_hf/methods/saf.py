"""SAF, Sharpness-Aware training for Free (Du, Zhou, Feng, Tan and Zhou, NeurIPS 2022): the trajectory loss
(methods/trajectory.py) against the logits the model itself produced for the same example E epochs earlier.

    r_i = the logits of example i recorded in epoch (epoch - E);   the logits of this epoch are recorded too

One forward + backward per step, no ascent. The record is a per-example memory of E + 1 slots (slot e mod (E+1)
holds epoch e's logits): N x (E + 1) x K floats for N training examples and K classes (at least fp32, the
logits' dtype for fp64 models), kept in the method state and checkpointed with it. As in the authors' code
(AngusDujw/SAF, SAF_train.py lines 717-737) the logits are recorded before the loss and the reference is slot
(epoch - E) mod (E+1); the code keeps the memory in fp32 numpy (sam_hf: a tensor on the model's device).

What it needs of the host: the epoch (Trainer's state.epoch; a plain loop's steps_per_epoch or set_epoch), the
model's logits (one row per example: token-level models are refused, their memory would be tokens x vocabulary),
and a stable, unique id per training example in the batch (`id_column`, default `idx`: add it with
`dataset.map(lambda row, i: {"idx": i}, with_indices=True)`; Trainer keeps it through its column removal and the
passes take it out before the model's forward). With data augmentation the recorded logits are of another view of
the example, as in the code.

Several processes: every rank records every example of the step (the ids and logits are gathered over the ranks),
so the memory is the same everywhere and 1 and N processes agree. Defaults (the SAMPa paper's Table 4 ran SAF
without listing its values): lambda = 0.3, E = 2, start_epoch = 5, tau = 5 (the authors' run.sh: --reinforce 0.3,
--minus_epoch 2, --kl_start_epoch 5, --temperature 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SharpnessConfigError, _bad, option
from ..registry import Example, register_method
from ..tensors import to_device, zero_grads
from .base import SharpnessMethod, StepResult
from .outputs import logits_of
from .trajectory import KLMeter, TrajectoryOptions, trajectory_kl


@dataclass
class SAFConfig(TrajectoryOptions):
    kl_weight: float = option(0.3, "weight lambda of the trajectory loss (the authors' run.sh: --reinforce 0.3)", example=0.3)
    epochs_back: int = option(2, "SAF's E: the reference logits are those recorded E epochs earlier (the authors' "
                              "run.sh: --minus_epoch 2)", example=2)
    id_column: str = option("idx", "the batch column with a unique id (0, 1, ...) per training example, which SAF's "
                            "per-example memory is indexed by", example="idx")

    def validate(self) -> None:
        super().validate()
        if self.epochs_back < 1:
            raise _bad("epochs_back", self.epochs_back, "epochs_back (SAF's E) must be >= 1 (e.g. epochs_back=2)")
        if self.start_epoch < self.epochs_back - 1:
            raise _bad("start_epoch", self.start_epoch,
                       f"with epochs_back={self.epochs_back} the first epoch that has logits from {self.epochs_back} "
                       f"epochs earlier is {self.epochs_back}: use start_epoch >= {self.epochs_back - 1}")


class SAF(SharpnessMethod):
    perturbs = False
    extra_copies = 0  # no parameter-sized state; the logit memory is N x (E + 1) x K
    needs_outputs = True
    needs_epoch = True

    @classmethod
    def example_id_column(cls, config) -> str | None:
        return config.id_column

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory: torch.Tensor | None = None  # [(E + 1), N, K]

    def step(self, batches, passes):
        cfg, epoch = self.config, self.progress.epoch
        active = cfg.start_epoch < epoch
        meter = KLMeter()

        def term(outputs, batch):
            logits = logits_of(outputs, self.name)
            ids = self._ids(batch, logits)
            self.record(ids, logits, epoch)
            if not active:
                return None
            reference = self.memory[(epoch - cfg.epochs_back) % (cfg.epochs_back + 1)][ids.to(self.memory.device)]
            values = trajectory_kl(logits, reference.to(logits.device), cfg.temperature)
            meter.add(values)
            return cfg.kl_weight * values

        zero_grads(self.params)
        loss = sum(passes.backward(b, clean=True, loss_term=term) for b in batches)
        self.layout.all_reduce_grads(self.params)
        return StepResult(loss, metrics=meter.metrics(active))

    def _ids(self, batch, logits) -> torch.Tensor:
        column = self.config.id_column
        ids = batch.get(column)
        if ids is None:
            raise SharpnessConfigError(
                f"--optim saf reads each example's id from the batch column {column!r}, which this batch lacks (keys: "
                f"{list(batch)}); add it to the training data, e.g. dataset.map(lambda row, i: {{{column!r}: i}}, "
                "with_indices=True), and keep it in the batch")
        ids = torch.as_tensor(ids).reshape(-1).long()
        if logits.dim() != 2 or logits.shape[0] != ids.numel():
            raise SharpnessConfigError(
                f"--optim saf keeps one logit row per example ({ids.numel()} ids, logits {tuple(logits.shape)}): "
                "token-level outputs (language models, token classification) would need tokens x vocabulary floats "
                "per example; use --optim mesa (its reference is a weight average, no per-example memory)")
        return ids

    @torch.no_grad()
    def record(self, ids: torch.Tensor, logits: torch.Tensor, epoch: int) -> None:
        """Slot epoch mod (E+1) of every rank's examples <- their logits (before the loss, as the code)."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        ids = self.layout.gather_rows(ids.to(logits.device))
        rows = self.layout.gather_rows(logits.detach().to(dtype))
        self._reserve(int(ids.max()) + 1 if ids.numel() else 0, rows.shape[-1], dtype, rows.device)
        self.memory[epoch % (self.config.epochs_back + 1)][ids.to(self.memory.device)] = rows.to(self.memory.device)

    def _reserve(self, n: int, classes: int, dtype, device) -> None:
        """Room for ids < n: the training set's size where the host knows it, else grown as ids arrive."""
        slots = self.config.epochs_back + 1
        if self.memory is not None and self.memory.shape[2] != classes:
            raise SharpnessConfigError(f"--optim saf: the logits have {classes} classes, the memory "
                                       f"{self.memory.shape[2]}; SAF needs the same classes throughout")
        have = 0 if self.memory is None else self.memory.shape[1]
        if n <= have:
            return
        size = max(n, self.progress.num_examples or 0, 2 * have)
        grown = torch.zeros(slots, size, classes, dtype=dtype, device=device)
        if self.memory is not None:
            grown[:, :have] = self.memory
        self.memory = grown

    def state_dict(self):
        return {"memory": self.memory}

    def load_state_dict(self, state):
        self.memory = to_device(state.get("memory"), self.device)


register_method("saf", SAF, SAFConfig, "SAF: the training loss plus a KL term towards the logits the model gave the same "
                "example E epochs earlier (one pass, a per-example memory)",
                paper="Du et al. 2022b", examples=(Example("SAF", "kl_weight=0.3,epochs_back=2"),
                                                   Example("SAF (DDP)", "kl_weight=0.3,epochs_back=2", 2)))
