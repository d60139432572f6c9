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

from ..batching import Batch, Piece
from ..config import SharpnessConfig


class GradientPasses(Protocol):
    def backward(self, batch: Batch, fraction: float = 1.0, clean: bool = True) -> torch.Tensor:
        """Forward + backward on `batch`, adding to `.grad`; returns the detached loss as Trainer reports it.

        `fraction` is the batch's share of its Trainer micro-batch (for sample ranges);
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

    def __init__(self, config: SharpnessConfig, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0):
        self.config = config
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.params = trainable_params(optimizer)

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
    return sum(passes.backward(batch, fraction, clean=clean) for batch, fraction in pieces)


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


def grads_fp32(params: list[torch.nn.Parameter], scale: float) -> list[torch.Tensor | None]:
    """Unscaled fp32 copies of `.grad` (None where a parameter got no gradient)."""
    return [None if p.grad is None else p.grad.detach().to(torch.float32, copy=True).div_(scale) for p in params]


def _direction(p: torch.Tensor, d: torch.Tensor, scale: float, cfg: SharpnessConfig) -> torch.Tensor:
    """fp32 T*d (ASAM, T = |x| + eta) or d, unscaled."""
    d32 = d.detach().float()
    if scale != 1.0:
        d32 = d32 / scale
    if cfg.adaptive:
        d32 = d32 * (p.detach().float().abs() + cfg.eta)
    return d32


@torch.no_grad()
def global_norm(tensors) -> torch.Tensor | None:
    """The 2-norm of all `tensors` together (they may sit on several devices); None when there are none."""
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    if not norms:
        return None
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


@torch.no_grad()
def ascent_norm(params, directions, scale: float, cfg: SharpnessConfig) -> torch.Tensor:
    """||d|| (or ||T d|| for ASAM) in fp32 over all trainable parameters."""
    norm = global_norm(_direction(p, d, scale, cfg) for p, d in zip(params, directions) if d is not None)
    return torch.zeros((), device=params[0].device if params else "cpu") if norm is None else norm


@torch.no_grad()
def perturb_(params, directions, scale: float, cfg: SharpnessConfig) -> tuple[bool, torch.Tensor]:
    """x <- x + rho d/||d|| (ASAM: x + rho T^2 d/||T d||) in place.

    Returns (applied, norm). A zero or non-finite norm applies nothing, so a bad
    ascent gradient costs the step its perturbation, never the weights.
    """
    norm = ascent_norm(params, directions, scale, cfg)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return False, norm
    coeff = cfg.rho / norm
    for p, d in zip(params, directions):
        if d is None:
            continue
        e = _direction(p, d, scale, cfg)
        if cfg.adaptive:
            e = e * (p.detach().float().abs() + cfg.eta)  # T^2 d = T (T d)
        p.add_((e * coeff.to(e.device)).to(p.dtype))
    return True, norm
