"""Ascent rules: how the perturbation e is formed from an ascent direction d.

A method (a schedule: sequential SAM, mSAM's micro-batches, SAMPa's parallel lookahead, Asynchronous SAM's
stale ascent) decides which gradient d is and when the perturbed pass runs; the rule (`rule=` in optim_args)
decides what e is:

    sam     (Foret et al. 2021)          e = rho d / ||d||
    asam    (Kwon et al. 2021)           e = rho T^2 d / ||T d||,  T = diag(t) elementwise (see `asam_params`);
                                         `adaptive=true` is the same rule (kept as its historical spelling)
    sam_on  (Mueller et al. 2023)        e = rho d_N / ||d_N|| on the normalization layers' affine parameters N,
                                         e = 0 elsewhere (the norm is over N only); with adaptive=true ASAM-ON:
                                         e_N = rho T_N^2 d_N / ||T_N d_N||
    vasso   (Li and Giannakis 2023)      m_t = (1 - theta) m_{t-1} + theta d_t,  e = rho m_t / ||m_t||,
                                         m_0 = d_0 (the authors' code); m is state, one parameter-sized buffer
    bisam   (Xie et al. 2024)            e = rho q / ||q||, q the gradient of a lower bound Q of the 0-1 loss
                                         (methods/bisam.py) instead of the training loss: the schedule's ascent
                                         passes compute Q (`ascent_loss`), its descent passes the training loss

ASAM's t (`asam_params`): `authors` (default; SamsungLabs/ASAM's `ASAM.ascent_step`): t = |x| + eta on every
parameter whose name contains "weight", t = 1 on the others (biases, ViT's cls_token and position_embeddings);
`davda54` (davda54/sam, adaptive=True): t = |x| on every parameter, no eta; `not_bias` (sam_hf before these
choices existed): t = |x| + eta on every parameter whose name does not end in "bias". On BERT, GPT-2 and Llama
the three pick the same parameters as long as eta is the same (every non-bias name contains "weight"); they
differ on ViT's cls_token / position_embeddings (authors: t = 1; the others: |x| + eta) and on biases (davda54).

SAM-ON's N (`sam_on_params`): `module` (default): the parameters of normalization layers recognised by type:
torch's BatchNorm / InstanceNorm / LayerNorm / GroupNorm / RMSNorm, and any module whose class name ends in
"Norm" or contains LayerNorm, RMSNorm, BatchNorm, GroupNorm or InstanceNorm (Hugging Face's LlamaRMSNorm,
T5LayerNorm, ...); `name`: the authors' rule, "norm" or "bn" in the parameter's name (case-sensitive), which
selects nothing on BERT (`LayerNorm`) or GPT-2 (`ln_1`, `ln_f`).

||.|| is the global L2 norm over the trainable parameters (SAM-ON: over N), reduced by the layout (over the
shards under FSDP2), computed in fp32, or in float64 for float64 parameters. A zero or non-finite norm (VaSSO:
a non-finite ascent gradient, which is then not averaged into m) applies no perturbation for the step
(counted in the logs), never NaN weights. The rule applies e in place and can write x's backup into each
direction's own buffer once its part of e is computed (`keep_x`): a direction the method no longer needs then
holds the backup at no extra memory. Only the parameters the rule moves are backed up (SAM-ON: N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import SharpnessConfigError, _bad, option
from ..tensors import norm_parameters, to_device, work_dtype
from . import bisam as bisam_math

RULES = ("sam", "asam", "sam_on", "vasso", "bisam")
ASAM_PARAMS = ("authors", "davda54", "not_bias")


@dataclass
class AscentOptions:
    """Options of the ascent rule, taken by every method (each refused where the chosen rule does not use it)."""

    rule: str = option("sam", "the ascent rule: sam (rho g/||g||), asam (ASAM's elementwise T), sam_on (only the "
                       "normalization layers' parameters perturbed), vasso (a moving average of the ascent "
                       "gradients), bisam (the gradient of a lower bound of the 0-1 loss); see docs/methods",
                       choices=RULES)
    adaptive: bool = option(False, "ASAM (Kwon et al. 2021): the same as rule=asam; with rule=sam_on, ASAM-ON "
                            "(T over the normalization parameters)", example="true")
    eta: float = option(0.01, "ASAM's eta in t = |x| + eta (rule=asam, or rule=sam_on with adaptive=true)",
                        example=0.01)
    asam_params: str = option("authors", "ASAM's T: authors (t = |x| + eta on parameters whose name contains "
                              "'weight', t = 1 on the others, as the ASAM authors' code), davda54 (t = |x| on every "
                              "parameter, no eta, as davda54/sam) or not_bias (t = |x| + eta on every name not "
                              "ending in 'bias')", choices=ASAM_PARAMS)
    sam_on_params: str = option("module", "SAM-ON's normalization parameters: module (of normalization layers by "
                                "type: BatchNorm, LayerNorm, GroupNorm, RMSNorm, *Norm classes) or name (the "
                                "authors' rule: 'norm' or 'bn' in the parameter name)", choices=("module", "name"),
                                rules=("sam_on",))
    theta: float = option(0.4, "VaSSO's theta in m_t = (1 - theta) m_(t-1) + theta g_t, in (0, 1] (0.4: SAMPa "
                          "paper, Appendix B.4)", example=0.4, rules=("vasso",))
    bisam_bound: str = option("log", "BiSAM's lower bound of the 0-1 loss: log (phi(z) = 1 - log(1 + e^(gamma - z)),"
                              " the SAMPa paper's choice) or tanh (phi(z) = tanh(tanh_alpha z))",
                              choices=("log", "tanh"), rules=("bisam",))
    mu: float = option(1.0, "BiSAM's mu in Q = (1/mu) log sum_j exp(mu phi(z_j)) (1: SAMPa paper, Appendix B.4)",
                       example=1.0, rules=("bisam",))
    tanh_alpha: float = option(0.1, "BiSAM's alpha in phi(z) = tanh(alpha z) (bisam_bound=tanh; 0.1: the authors' "
                               "train.py)", example=0.1, rules=("bisam",))

    def validate(self) -> None:
        super().validate()
        if not self.eta >= 0:
            raise _bad("eta", self.eta, "eta (ASAM's t = |x| + eta) must be >= 0 (e.g. eta=0.01)")
        if not 0.0 < self.theta <= 1.0:
            raise _bad("theta", self.theta, "VaSSO's theta must be in (0, 1] (theta=1 is SAM; e.g. theta=0.4)")
        if not self.mu > 0:
            raise _bad("mu", self.mu, "BiSAM's mu must be > 0 (e.g. mu=1)")
        if not self.tanh_alpha > 0:
            raise _bad("tanh_alpha", self.tanh_alpha, "BiSAM's tanh_alpha must be > 0 (e.g. tanh_alpha=0.1)")
        self._resolve_adaptive()
        for key, (uses, what) in _RULE_OPTIONS.items():
            if self.was_given(key) and not uses(self):
                raise SharpnessConfigError(
                    f"optim_args: {key}={getattr(self, key)} is used by {what}; this run has "
                    f"rule={self.rule}{' with adaptive=true' if self.adaptive else ''}, so it would be ignored: "
                    f"drop {key}")

    def _resolve_adaptive(self) -> None:
        """`adaptive=true` is rule=asam (its historical spelling); with rule=sam_on it is ASAM-ON."""
        if self.adaptive:
            if self.rule == "sam" and not self.was_given("rule"):
                self.rule = "asam"
            elif self.rule == "sam":
                raise SharpnessConfigError("optim_args: adaptive=true is ASAM (rule=asam), but rule=sam asks for "
                                           "plain SAM: drop one of them")
            elif self.rule in ("vasso", "bisam"):
                raise SharpnessConfigError(
                    f"optim_args: adaptive=true (ASAM's elementwise T) with rule={self.rule}: no paper or authors' "
                    f"code defines that combination; drop adaptive, or use rule=asam / rule=sam_on,adaptive=true")
        elif self.rule == "asam" and self.was_given("adaptive"):
            raise SharpnessConfigError("optim_args: rule=asam is ASAM, but adaptive=false says it is not: drop "
                                       "adaptive (rule=asam alone is ASAM)")

    @property
    def scaled(self) -> bool:
        """Whether the rule scales the perturbation by ASAM's T (rule=asam, or ASAM-ON)."""
        return self.rule == "asam" or (self.rule == "sam_on" and self.adaptive)


# option -> (whether the configured rule uses it, what uses it)
_RULE_OPTIONS = {
    "eta": (lambda c: c.scaled and c.asam_params != "davda54",
            "ASAM's t = |x| + eta (rule=asam, or rule=sam_on with adaptive=true; davda54's rule has no eta)"),
    "asam_params": (lambda c: c.scaled, "ASAM's T (rule=asam, or rule=sam_on with adaptive=true)"),
    "sam_on_params": (lambda c: c.rule == "sam_on", "rule=sam_on"),
    "theta": (lambda c: c.rule == "vasso", "rule=vasso"),
    "bisam_bound": (lambda c: c.rule == "bisam", "rule=bisam"),
    "mu": (lambda c: c.rule == "bisam", "rule=bisam"),
    "tanh_alpha": (lambda c: c.rule == "bisam" and c.bisam_bound == "tanh", "rule=bisam with bisam_bound=tanh"),
}


# ---- which parameters the rule treats how ------------------------------------------------------------------------
@dataclass
class ParamInfo:
    """What the host tells a method about its trainable parameters, aligned with them: their names, and whether
    each belongs to a normalization layer (by module type). None where the host does not know (no model)."""

    names: list[str] | None = None
    in_norm_layer: list[bool] | None = None

    @classmethod
    def of(cls, params, model: nn.Module | None = None, param_names: dict[int, str] | None = None) -> "ParamInfo":
        if param_names is None and model is not None:
            param_names = {id(p): n for n, p in model.named_parameters()}
        names = None if param_names is None else [param_names.get(id(p), "") for p in params]
        norms = None
        if model is not None:
            ids = norm_parameters(model)
            norms = [id(p) in ids for p in params]
        return cls(names, norms)


def is_bias(name: str) -> bool:
    """A bias by its name's last component (`bias`, `lora_bias`, ...)."""
    return name.rsplit(".", 1)[-1].endswith("bias")


def _need(what: str, key: str) -> SharpnessConfigError:
    return SharpnessConfigError(
        f"optim_args: {what} reads the model's {key}, which this optimizer was not given: pass model= to "
        "sam_hf.SharpnessOptimizer (SharpnessTrainer passes it)")


# ---- the rule ---------------------------------------------------------------------------------------------------
class AscentRule:
    """The configured rule (see the module docstring), over a method's trainable parameters.

    `absorb(grads)` gives a stateful rule (VaSSO) the step's ascent gradient once, on every rank, where the
    schedule has it; `perturb_` then applies e. `ascent_loss` is the loss the schedule's ascent passes
    backpropagate (BiSAM's lower bound), None for the training loss."""

    def __init__(self, config, layout, names: list[str] | None = None, in_norm_layer: list[bool] | None = None):
        self.rho = config.rho
        self.layout = layout
        self.kind = getattr(config, "rule", "asam" if getattr(config, "adaptive", False) else "sam")
        self.theta = getattr(config, "theta", 0.4)
        self.eta = 0.0 if getattr(config, "asam_params", "authors") == "davda54" else getattr(config, "eta", 0.01)
        self.names = names
        self.scaled = bool(getattr(config, "scaled", self.kind == "asam"))
        self.asam_params = getattr(config, "asam_params", "authors")
        self.ascent_loss = (bisam_math.LowerBound(config.bisam_bound, config.mu, config.tanh_alpha)
                            if self.kind == "bisam" else None)
        self._t = self._scaled_params(names)
        self.mask = self._perturbed(config, names, in_norm_layer)
        self.d: list[torch.Tensor | None] | None = None  # VaSSO's moving average m_t
        self._skip = False  # VaSSO: the last ascent gradient was not finite: no perturbation this step

    # ---- set-up ------------------------------------------------------------------
    def _scaled_params(self, names):
        """Which parameters get t = |x| (+ eta) under ASAM (None: all, e.g. before the count is known)."""
        if not self.scaled or self.asam_params == "davda54":
            return None
        if names is None:
            raise _need(f"asam_params={self.asam_params} (ASAM's T chosen by parameter name)",
                        "parameter names (or use asam_params=davda54: t = |x| on every parameter)")
        if self.asam_params == "authors":
            return ["weight" in name for name in names]
        return [not is_bias(name) for name in names]

    def _perturbed(self, config, names, in_norm_layer):
        """SAM-ON: which parameters are perturbed (None: all)."""
        if self.kind != "sam_on":
            return None
        how = getattr(config, "sam_on_params", "module")
        if how == "name":
            if names is None:
                raise _need("rule=sam_on,sam_on_params=name", "parameter names")
            mask = ["norm" in n or "bn" in n for n in names]
        else:
            if in_norm_layer is None:
                raise _need("rule=sam_on", "modules (to find its normalization layers)")
            mask = list(in_norm_layer)
        if not any(mask):
            raise SharpnessConfigError(
                f"optim_args: rule=sam_on perturbs only the normalization layers' parameters, and none of the "
                f"{len(mask)} trainable parameters is one (sam_on_params={how}"
                f"{': no name contains norm or bn' if how == 'name' else ''}). With PEFT/LoRA only the adapters "
                "train: add the normalization layers to the trainable modules (LoraConfig modules_to_save), or use "
                "another rule")
        return mask

    @property
    def stateful(self) -> bool:
        return self.kind == "vasso"

    def perturbs(self, i: int) -> bool:
        return self.mask is None or self.mask[i]

    # ---- the perturbation ----------------------------------------------------------
    def _t_of(self, i: int) -> bool:
        return self.scaled and (self._t is None or self._t[i])

    def _direction(self, i, p, d, scale):
        """T d (or d), unscaled, in the work dtype (fp32; float64 for float64 parameters)."""
        dtype = work_dtype(p)
        out = d.detach().to(dtype)
        if scale != 1.0:
            out = out / scale
        if self._t_of(i):
            out = out * (p.detach().to(dtype).abs() + self.eta)
        return out

    def _sources(self, directions, scale):
        if self.stateful:
            return (self.d if self.d is not None else [None] * len(directions)), 1.0
        return directions, scale

    @torch.no_grad()
    def norm(self, params, directions, scale: float = 1.0) -> torch.Tensor:
        """||d|| (ASAM: ||T d||; SAM-ON: over N; VaSSO: ||m||) over all trainable parameters."""
        sources, scale = self._sources(directions, scale)
        norm = self.layout.norm(self._direction(i, p, d, scale) for i, (p, d) in enumerate(zip(params, sources))
                                if d is not None and self.perturbs(i))
        return torch.zeros((), device=params[0].device if params else "cpu") if norm is None else norm

    @torch.no_grad()
    def absorb(self, grads, scale: float = 1.0) -> None:
        """VaSSO: m <- (1 - theta) m + theta g (m_0 = g_0), once per optimizer step, with the ascent gradient the
        schedule perturbs with; a non-finite g is left out of m and makes this step's perturbation none."""
        if not self.stateful:
            return
        present = [g for g in grads if g is not None]
        if not self.layout.all_finite(present):
            self._skip = True
            return
        self._skip = False
        local = self.layout.local
        if self.d is None:
            self.d = [None] * len(grads)
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.d[i] is None:  # the first gradient this parameter gets (the authors' code: m_0 = g_0)
                d = g.detach().clone() if g.dtype == work_dtype(g) else g.detach().to(work_dtype(g))
                if scale != 1.0:
                    local(d).div_(scale)
                self.d[i] = d
            else:
                local(self.d[i]).mul_(1.0 - self.theta).add_(local(g.detach()), alpha=self.theta / scale)

    @torch.no_grad()
    def backup(self, params) -> list[torch.Tensor | None]:
        """x of each parameter the rule moves (None for the others: SAM-ON leaves all but N alone)."""
        return [p.detach().clone() if self.perturbs(i) else None for i, p in enumerate(params)]

    @torch.no_grad()
    def perturb_(self, params, directions, scale: float = 1.0, keep_x: bool = False):
        """x <- x + e in place, e from `directions` (scaled by `scale`, e.g. a GradScaler's `.grad`; VaSSO: from
        its average m, which `absorb` has updated).

        Returns (backup, applied, norm). With `keep_x` the backup of x is written into each direction's own
        buffer once its part of e is computed (the directions are consumed; None for a parameter the rule does
        not move); otherwise backup is None and the caller made its own. Nothing is applied when the norm is zero
        or not finite."""
        sources, src_scale = self._sources(directions, scale)
        norm = self.norm(params, directions, scale)
        applied = bool(torch.isfinite(norm)) and float(norm) != 0.0 and not (self.stateful and self._skip)
        if not applied and not keep_x:
            return None, False, norm
        coeff = self.rho / norm if applied else None
        saved = [] if keep_x else None
        for i, (p, d, src) in enumerate(zip(params, directions, sources)):
            x = p.detach()
            step = None
            moves = applied and src is not None and self.perturbs(i)
            if moves:
                e = self._direction(i, p, src, src_scale)
                if self._t_of(i):
                    e = e * (x.to(e.dtype).abs() + self.eta)  # T^2 d = T (T d)
                step = (e * coeff.to(device=e.device, dtype=e.dtype)).to(p.dtype)
                del e
            if keep_x:
                if not moves:
                    saved.append(None)
                else:
                    reuse = (d is not None and d.dtype == x.dtype and d.shape == x.shape and d.is_contiguous()
                             and x.is_contiguous())
                    saved.append(d.copy_(x) if reuse else x.clone())
            if step is not None:
                p.add_(step)
        return saved, applied, norm

    # ---- state (VaSSO's m) ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {"d": self.d, "skip": self._skip} if self.stateful else {}

    def load_state_dict(self, state: dict, device) -> None:
        if self.stateful and state:
            self.d = to_device(state.get("d"), device)
            self._skip = bool(state.get("skip", False))
