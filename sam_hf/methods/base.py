"""What every method shares: the gradient-pass interface, the ascent step, backups.

A method turns one step's batches into the gradient left in `.grad`, the one
the base optimizer then steps with. It knows nothing of Trainer: the host hands
it a `GradientPasses` object that runs forward + backward on a batch exactly as
Trainer's own `training_step` would (loss normalisation, mixed-precision loss
scaling), so `.grad` always holds *scaled* gradients in Trainer's units, and
methods divide by `loss_scale()` before any norm or lookahead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .. import sharding
from ..batching import Batch, Piece
from ..config import SharpnessConfig


class GradientPasses(Protocol):
    def backward(self, batch: Batch, fraction: float = 1.0, clean: bool = True, part_of: Batch | None = None
                 ) -> torch.Tensor:
        """Forward + backward on `batch`, adding to `.grad`; returns the detached loss as Trainer reports it.

        For a slice of a Trainer micro-batch, `part_of` is that micro-batch and `fraction` the slice's share of
        its samples: the slice then contributes exactly its part of the micro-batch's loss (DESIGN.md, "Units").
        `clean=False` marks a pass at perturbed weights (BatchNorm statistics are kept).
        """

    def loss_scale(self) -> float:
        """The mixed-precision loss scale `.grad` is multiplied by (1.0 without a GradScaler)."""

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average `.grad` over the data-parallel ranks (a no-op in one process)."""


@dataclass
class StepResult:
    loss: torch.Tensor  # the clean loss, as Trainer's `loss` log reports it
    skip_update: bool = False  # SAMPa's first step computes g_0 only
    metrics: dict[str, Any] = field(default_factory=dict)


class SharpnessMethod:
    """Base class: subclasses implement `step` and, if stateful, `state_dict`/`load_state_dict`."""

    name = ""
    role_parallel = False  # set by the host when the two passes run on two process groups

    def __init__(self, config: SharpnessConfig, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0,
                 param_names: dict[int, str] | None = None):
        self.config = config
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.params = trainable_params(optimizer)
        # ASAM rescales weights, not biases (T = 1 there), as its authors' code does; names come from the model
        self.rescaled = None if param_names is None else [
            not is_bias(param_names.get(id(p), "")) for p in self.params]

    def perturb_(self, directions, scale: float) -> tuple[bool, torch.Tensor]:
        """`perturb_` over this method's parameters (see the function)."""
        return perturb_(self.params, directions, scale, self.config, self.rescaled)

    @property
    def device(self) -> torch.device:
        """Where the trainable weights (and so the method's state) live."""
        return self.params[0].device if self.params else torch.device("cpu")

    def step(self, batches: list[Batch], passes: GradientPasses) -> StepResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def as_tensor(value, device) -> torch.Tensor:
    """A metric or loss as a detached tensor on `device` (floats from the role exchange included)."""
    return value.detach().to(device) if torch.is_tensor(value) else torch.tensor(float(value), device=device)


def to_device(obj, device):
    """Tensors inside nested lists and dicts (checkpointed method state) moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj


def is_bias(name: str) -> bool:
    """A bias by its name's last component (`bias`, `lora_bias`, ...)."""
    return name.rsplit(".", 1)[-1].endswith("bias")


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters the base optimizer updates (with PEFT: only the adapters)."""
    seen, out = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def zero_grads(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def run_pieces(passes: GradientPasses, pieces: list[Piece], clean: bool = True) -> torch.Tensor:
    return sum(passes.backward(p.batch, clean=clean) if p.parent is None else
               passes.backward(p.batch, p.fraction, clean=clean, part_of=p.parent) for p in pieces)


def run_batches(passes: GradientPasses, batches: list[Batch], clean: bool = True) -> torch.Tensor:
    return sum(passes.backward(batch, clean=clean) for batch in batches)


@torch.no_grad()
def backup(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    """Copy the saved weights back (never subtract e: x + e - e is not x in floating point)."""
    for p, s in zip(params, saved):
        p.copy_(s)


def _direction(p: torch.Tensor, d: torch.Tensor, scale: float, eta: float | None) -> torch.Tensor:
    """fp32 T*d with T = |x| + eta (ASAM), or d where eta is None (T = 1), unscaled."""
    d32 = d.detach().float()
    if scale != 1.0:
        d32 = d32 / scale
    if eta is not None:
        d32 = d32 * (p.detach().float().abs() + eta)
    return d32


def _etas(params, cfg: SharpnessConfig, rescaled: list[bool] | None) -> list[float | None]:
    """ASAM's eta per parameter, None where T = 1: every parameter under SAM, and under ASAM the ones `rescaled`
    marks False (biases: the ASAM authors' code rescales weights only)."""
    if not cfg.adaptive:
        return [None] * len(params)
    return [cfg.eta if rescaled is None or r else None for r in (rescaled or [True] * len(params))]


@torch.no_grad()
def global_norm(tensors) -> torch.Tensor | None:
    """The 2-norm of all `tensors` together (they may sit on several devices); None when there are none.

    FSDP2 shards (DTensors) count their local part, summed over the shards in one all-reduce (sharding.py)."""
    return sharding.global_norm(tensors)


@torch.no_grad()
def ascent_norm(params, directions, scale: float, cfg: SharpnessConfig, rescaled=None) -> torch.Tensor:
    """||d|| (or ||T d|| for ASAM) in fp32 over all trainable parameters."""
    etas = _etas(params, cfg, rescaled)
    norm = global_norm(_direction(p, d, scale, eta) for p, d, eta in zip(params, directions, etas) if d is not None)
    return torch.zeros((), device=params[0].device if params else "cpu") if norm is None else norm


@torch.no_grad()
def perturb_(params, directions, scale: float, cfg: SharpnessConfig, rescaled=None) -> tuple[bool, torch.Tensor]:
    """x <- x + rho d/||d|| (ASAM: x + rho T^2 d/||T d||) in place.

    `rescaled` (ASAM): per parameter, whether T = |x| + eta applies (False: T = 1); None: every parameter.
    Returns (applied, norm). A zero or non-finite norm applies nothing, so a bad
    ascent gradient costs the step its perturbation, never the weights.
    """
    norm = ascent_norm(params, directions, scale, cfg, rescaled)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return False, norm
    coeff = cfg.rho / norm
    for p, d, eta in zip(params, directions, _etas(params, cfg, rescaled)):
        if d is None:
            continue
        e = _direction(p, d, scale, eta)
        if eta is not None:
            e = e * (p.detach().float().abs() + eta)  # T^2 d = T (T d)
        p.add_((e * coeff.to(e.device)).to(p.dtype))
    return True, norm
