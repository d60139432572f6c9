"""SAM-ON (Mueller, Vlaar, Rolnick, Hein, NeurIPS 2023): perturb only the normalization layers.

    N = the normalization layers' affine parameters;  g_N = g restricted to N
    e_N = rho g_N / ||g_N||,  e = 0 elsewhere;  step the base optimizer with grad f(x + e) of *every* parameter
    ASAM-ON: e_N = rho T_N^2 g_N / ||T_N g_N||  (T as in ASAM, over N only)

Authors' code (mueller-mp/SAM-ON, sam_on.py): `SAM_ON.ascent_step` (lines 82-103) and `ASAM_ON.ascent_step`
(lines 21-67) select N **by parameter name**: `'norm' in name or 'bn' in name` (case-sensitive substring,
`only_norm=True`); the norm ||.|| is over the selected parameters only; + 1e-16 on the norm. ASAM-ON rescales a
selected parameter when its name contains "weight" or `normalize_bias=True` (then biases too), with
t = |x| + eta (`elementwise=True`; train.py's default eta is 0.0).

``select="name"`` reproduces that rule. ``select="module"`` (the default here) picks the parameters of
normalization *modules*: torch's BatchNorm/InstanceNorm (`_NormBase`), LayerNorm, GroupNorm, RMSNorm, and any
module whose class name ends in "Norm" (Hugging Face's LlamaRMSNorm, T5LayerNorm, ...). The two differ on
Hugging Face models: BERT's `LayerNorm.weight` has no lowercase "norm" and GPT-2's `ln_1`/`ln_f` neither, so
the name rule perturbs nothing there; it also catches non-norm parameters that sit under a module named
`norm*` (the authors' SE blocks live inside `norm2`/`norm3` Sequentials in their models.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .common import Vector, base_step, direction, gradient, gradient_at, named_trainable

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)


def norm_parameter_names(model: nn.Module, select: str = "module") -> set[str]:
    """Names (as in model.named_parameters()) of the parameters SAM-ON perturbs."""
    if select == "name":
        return {n for n, _ in model.named_parameters() if "norm" in n or "bn" in n}
    if select == "module":
        names = set()
        for mname, m in model.named_modules():
            if isinstance(m, _NORM_TYPES) or type(m).__name__.endswith("Norm"):
                names |= {f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False)}
        return names
    raise ValueError(f"SAM-ON select={select!r}: use 'module' or 'name'")


def samon_perturbation(named_params: Sequence[tuple[str, Tensor]], g: Sequence[Tensor], rho: float,
                       selected: set[str], adaptive: bool = False, eta: float = 0.0,
                       normalize_bias: bool = False, eps: float = 0.0) -> Vector:
    """e on the selected parameters (SAM-ON, or ASAM-ON with adaptive=True), zeros elsewhere."""
    on = [n in selected for n, _ in named_params]
    if adaptive:
        t = [p.detach().abs() + eta if ("weight" in n or normalize_bias) else torch.ones_like(p)
             for n, p in named_params]
    else:
        t = [torch.ones_like(p) for _, p in named_params]
    tg = [ti * u for ti, u, s in zip(t, g, on) if s]
    unit = iter(direction(tg, rho, eps))
    return [ti * next(unit) if s else torch.zeros_like(u) for ti, u, s in zip(t, g, on)]


def samon_step(model, loss_fn, batch, optimizer, rho: float = 0.5, select: str = "module",
               adaptive: bool = False, eta: float = 0.0, normalize_bias: bool = False, eps: float = 0.0,
               freeze_bn: bool = True) -> None:
    """One SAM-ON step. Only g_N is needed from the clean pass (the authors time it with requires_grad off
    elsewhere); the descent uses the full gradient at x + e."""
    named = named_trainable(model)
    params = [p for _, p in named]
    selected = norm_parameter_names(model, select)
    if not any(n in selected for n, _ in named):
        raise ValueError("SAM-ON: the model has no normalization parameters to perturb")
    g = gradient(model, loss_fn, batch, params)
    e = samon_perturbation(named, g, rho, selected, adaptive, eta, normalize_bias, eps)
    base_step(optimizer, params, gradient_at(model, loss_fn, batch, params, e, freeze_bn))
