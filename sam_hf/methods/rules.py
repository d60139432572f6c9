"""Ascent rules: how the perturbation e is formed from an ascent direction d.

A method (a schedule: sequential SAM, mSAM's micro-batches, SAMPa's parallel lookahead, Asynchronous SAM's
stale ascent) decides which gradient d is and when the perturbed pass runs; the rule decides what e is:

    SAM  (Foret et al. 2021):  e = rho d / ||d||
    ASAM (Kwon et al. 2021):   e = rho T^2 d / ||T d||,  T = |x| + eta elementwise on the weights, T = 1 on
                               biases (as the ASAM authors' code decides it: here, every parameter whose
                               name does not end in "bias"; every parameter when names are unknown)

||.|| is the global L2 norm over all trainable parameters, reduced by the layout (over the shards under FSDP2).
A zero or non-finite norm applies no perturbation for the step (counted in the logs), never NaN weights. The
rule applies e in place and can write x's backup into each direction's own buffer once its part of e is
computed (`keep_x`): a direction the method no longer needs then holds the backup at no extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import _bad, option


@dataclass
class AscentOptions:
    """Options of the ascent rule, taken by every method."""

    adaptive: bool = option(False, "ASAM (Kwon et al. 2021): scale the perturbation elementwise, "
                            "e = rho T^2 g / ||T g|| with T = |x| + eta on the weights (T = 1 on biases)",
                            example="true")
    eta: float = option(0.01, "ASAM's eta in T = |x| + eta (used with adaptive=true)", example=0.01)

    def validate(self) -> None:
        super().validate()
        if not self.eta >= 0:
            raise _bad("eta", self.eta, "eta (ASAM's T = |x| + eta) must be >= 0 (e.g. eta=0.01)")


def is_bias(name: str) -> bool:
    """A bias by its name's last component (`bias`, `lora_bias`, ...)."""
    return name.rsplit(".", 1)[-1].endswith("bias")


def _direction(p: torch.Tensor, d: torch.Tensor, scale: float, eta: float | None) -> torch.Tensor:
    """fp32 T*d with T = |x| + eta (ASAM), or d where eta is None (T = 1), unscaled."""
    d32 = d.detach().float()
    if scale != 1.0:
        d32 = d32 / scale
    if eta is not None:
        d32 = d32 * (p.detach().float().abs() + eta)
    return d32


class AscentRule:
    """SAM's rule, or ASAM's with `adaptive=true` (see the module docstring)."""

    def __init__(self, config, layout, names: list[str] | None = None):
        self.rho = config.rho
        self.layout = layout
        self.adaptive, self.eta = config.adaptive, config.eta
        self.names = names

    def etas(self, n: int) -> list[float | None]:
        """ASAM's eta per parameter, None where T = 1 (every parameter under SAM, biases under ASAM)."""
        if not self.adaptive:
            return [None] * n
        if self.names is None:
            return [self.eta] * n
        return [None if is_bias(name) else self.eta for name in self.names]

    @torch.no_grad()
    def norm(self, params, directions, scale: float = 1.0) -> torch.Tensor:
        """||d|| (ASAM: ||T d||) in fp32 over all trainable parameters; `directions` scaled by `scale`."""
        etas = self.etas(len(params))
        norm = self.layout.norm(_direction(p, d, scale, eta) for p, d, eta in zip(params, directions, etas)
                                if d is not None)
        return torch.zeros((), device=params[0].device if params else "cpu") if norm is None else norm

    @torch.no_grad()
    def perturb_(self, params, directions, scale: float = 1.0, keep_x: bool = False):
        """x <- x + e in place, e from `directions` (scaled by `scale`, e.g. a GradScaler's `.grad`).

        Returns (backup, applied, norm). With `keep_x` the backup of x is written into each direction's own
        buffer once its part of e is computed (the directions are consumed); otherwise backup is None and the
        caller made its own. Nothing is applied when the norm is zero or not finite."""
        norm = self.norm(params, directions, scale)
        applied = bool(torch.isfinite(norm)) and float(norm) != 0.0
        if not applied and not keep_x:
            return None, False, norm
        coeff = self.rho / norm if applied else None
        saved = [] if keep_x else None
        for p, d, eta in zip(params, directions, self.etas(len(params))):
            x = p.detach()
            step = None
            if applied and d is not None:
                e = _direction(p, d, scale, eta)
                if eta is not None:
                    e = e * (x.float().abs() + eta)  # T^2 d = T (T d)
                step = (e * coeff.to(e.device)).to(p.dtype)
                del e
            if keep_x:
                reuse = (d is not None and d.dtype == x.dtype and d.shape == x.shape and d.is_contiguous()
                         and x.is_contiguous())
                saved.append(d.copy_(x) if reuse else x.clone())
            if step is not None:
                p.add_(step)
        return saved, applied, norm
