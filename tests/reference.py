"""A plain-PyTorch restatement of the update rules in DESIGN.md, for the parity tests.

Nothing here comes from `sam_hf`: the point is an independent second reading of
the contract. Each method is a small loop over the same batches the Trainer
consumed, around the *same* base optimizer class Trainer builds
(`torch.optim.AdamW` / `torch.optim.SGD`) with Trainer's two parameter groups.

Conventions restated from DESIGN.md and issue 2:

* f(x, B) is the model's mean loss on B (gradient accumulation is 1 here).
* ||.|| is the global L2 norm over all trainable parameters; directions are fp32.
* Only parameters with `requires_grad` are perturbed (and stepped).
* A zero or non-finite ascent gradient means no perturbation for that step: the
  step then uses the clean gradient where the method has one at hand (SAM,
  mSAM's h_j), or the gradient at the unperturbed point (SAMPa's g~_t,
  Asynchronous SAM's descent).  Such steps are counted in `skipped`.
* Trainer clips the final gradient (coef = min(1, c / (||G|| + 1e-6))) before
  `optimizer.step()` when `max_grad_norm > 0`.
* Trainer's parameter groups: weight decay on every trainable parameter except
  biases and LayerNorm weights (group 0: decay, group 1: wd = 0).

Methods (one Trainer step each):

  SAM     e = rho g/||g||, ASAM e = rho T^2 g/||T g||, T = |x| + eta (T = 1 for biases);
          step with grad f(x + e, B); x restored by copy.
  mSAM    B split into m consecutive micro-batches (sizes differ by <= 1, the
          first ones larger); step with sum_j |B_j|/|B| grad f(x + e_j, B_j).
  SAMPa   first step: g_0 = grad f(x_0, B_0), no optimizer step, state untouched.
          later:  g~ = grad f(x + rho g_t/||g_t||, B_t)
                  y  = ModelUpdate(x, clip(g_t))   (closed form, optimizer state untouched)
                  g_{t+1} = grad f(y, B_{t+1});  G = (1-lam) g~ + lam g_{t+1}
  AsyncSAM (tau = 1)  t = 0: step with grad f(x_0, B_0)
          t >= 1: step with grad f(x_t + rho a_{t-1}/||a_{t-1}||, B_t)
          a_t = grad f(x_t, A_t), A_t the first ceil(r |B_t|) samples of B_t.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

# --------------------------------------------------------------------------- batches


def batch_len(batch: dict) -> int:
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def batch_slice(batch: dict, start: int, stop: int) -> dict:
    n = batch_len(batch)
    return {k: (v[start:stop] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
            for k, v in batch.items()}


def split_sizes(n: int, m: int) -> list[int]:
    """m consecutive sizes summing to n, differing by at most one, the first ones larger."""
    q, r = divmod(n, m)
    return [q + 1 if j < r else q for j in range(m)]


# --------------------------------------------------------------------------- Trainer's optimizer


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and LayerNorm weights (Trainer's rule, restated)."""
    out = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, nn.LayerNorm) or "bias" in p_name:
                out.add(full)
    return out


def trainer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n not in skip], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n in skip], "weight_decay": 0.0}]


@dataclass
class Base:
    """The base optimizer as Trainer builds `--optim adamw_torch` / `--optim sgd`."""

    kind: str  # "adamw" | "sgd"
    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    fused: bool = False  # `--optim adamw_torch_fused`

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        groups = trainer_groups(model, self.weight_decay)
        if self.kind == "adamw":
            extra = {"fused": True} if self.fused else {}
            return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, **extra)
        if self.kind == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                                   nesterov=self.nesterov)
        raise ValueError(self.kind)


# --------------------------------------------------------------------------- closed-form ModelUpdate


def _scalar(v) -> float:
    return float(v.item() if torch.is_tensor(v) else v)


def adamw_lookahead(x, g, group, state):
    """One torch.optim.AdamW step from `state`, written from the torch docs, without touching it:
    x <- x (1 - lr wd); m' = b1 m + (1-b1) g; v' = b2 v + (1-b2) g^2;
    x <- x - lr/(1-b1^k) * m' / (sqrt(v')/sqrt(1-b2^k) + eps), k = steps taken + 1."""
    lr, wd, eps = _scalar(group["lr"]), group["weight_decay"], group["eps"]
    b1, b2 = (_scalar(b) for b in group["betas"])
    k = _scalar(state["step"]) + 1 if "step" in state else 1
    m = state["exp_avg"] if "exp_avg" in state else torch.zeros_like(x)
    v = state["exp_avg_sq"] if "exp_avg_sq" in state else torch.zeros_like(x)
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g * g
    x1 = x * (1 - lr * wd)
    return x1 - lr / (1 - b1 ** k) * m1 / (v1.sqrt() / math.sqrt(1 - b2 ** k) + eps)


def sgd_lookahead(x, g, group, state):
    """One torch.optim.SGD step from `state`, written from the torch docs, without touching it:
    d = g + wd x; b = d (first step) else mu b + (1 - dampening) d; d = d + mu b (Nesterov) or b; x - lr d."""
    lr, wd = _scalar(group["lr"]), group["weight_decay"]
    mu, damp, nesterov = group["momentum"], group["dampening"], group["nesterov"]
    d = g + wd * x
    if mu != 0:
        buf = state.get("momentum_buffer")
        b = d.clone() if buf is None else mu * buf + (1 - damp) * d
        d = d + mu * b if nesterov else b
    return x - lr * d


# --------------------------------------------------------------------------- the reference trainer


class Reference:
    """Runs the DESIGN.md rules on `model` with the base optimizer `base`, one step per `step_*` call."""

    def __init__(self, model: nn.Module, base: Base, max_grad_norm: float = 0.0,
                 rho: float = 0.05, adaptive: bool = False, eta: float = 0.01):
        self.model = model.train()  # as Trainer trains (the test models have no dropout)
        self.base = base
        self.opt = base.build(model)
        self.params = [p for group in self.opt.param_groups for p in group["params"]]
        by_id = {id(p): n for n, p in model.named_parameters()}
        self.names = [by_id[id(p)] for p in self.params]
        self.max_grad_norm = max_grad_norm
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.skipped = 0  # steps whose ascent gradient was zero or non-finite
        self.g = None  # SAMPa's g_t
        self.held = None  # SAMPa's B_t
        self.a = None  # Asynchronous SAM's a_{t-1}
        self.lookahead_points = []  # SAMPa's y_{t+1}, for inspection

    # ---- primitives -------------------------------------------------------
    def grad(self, batch: dict) -> list:
        """fp32 copy of grad f(x, batch) per trainable parameter (None where it gets no gradient)."""
        for p in self.params:
            p.grad = None
        self.model(**batch)["loss"].backward()
        out = [None if p.grad is None else p.grad.detach().float().clone() for p in self.params]
        for p in self.params:
            p.grad = None
        return out

    @staticmethod
    def norm(vectors) -> torch.Tensor:
        return torch.sqrt(sum((v.double() ** 2).sum() for v in vectors if v is not None)).float()

    def ascent(self, g):
        """e = rho g/||g|| (ASAM: rho T^2 g/||T g||), or None for a zero or non-finite g."""
        if self.adaptive:  # T = |w| + eta for weights, 1 for biases (the ASAM authors' code)
            T = [torch.ones_like(p, dtype=torch.float32) if name.endswith("bias") else p.detach().float().abs() + self.eta
                 for name, p in zip(self.names, self.params)]
            tg = [None if gi is None else t * gi for t, gi in zip(T, g)]
            n = self.norm(tg)
            e = [None if gi is None else self.rho * t * t * gi / n for t, gi in zip(T, g)]
        else:
            n = self.norm(g)
            e = [None if gi is None else self.rho * gi / n for gi in g]
        if not torch.isfinite(n) or n == 0:
            self.skipped += 1
            return None
        return e

    @contextlib.contextmanager
    def moved(self, new_values):
        """Temporarily set x to `new_values` (None entries unchanged); restore by copy."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, new_values):
                if v is not None:
                    p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def grad_at(self, e, batch):
        """grad f(x + e, batch); e=None: grad f(x, batch)."""
        if e is None:
            return self.grad(batch)
        with self.moved([None if ei is None else p.detach() + ei for p, ei in zip(self.params, e)]):
            return self.grad(batch)

    def clip(self, g):
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return g
        coef = min(1.0, self.max_grad_norm / (float(self.norm(g)) + 1e-6))
        return [None if gi is None else gi * coef for gi in g]

    def optimizer_step(self, G) -> None:
        G = self.clip(G)  # Trainer clips the final gradient
        for p, gi in zip(self.params, G):
            p.grad = None if gi is None else gi.to(p.dtype)
        self.opt.step()
        for p in self.params:
            p.grad = None

    def model_update(self, g) -> list:
        """y = ModelUpdate(x, g): the base optimizer's step, per group, optimizer state untouched."""
        by_id = {id(p): gi for p, gi in zip(self.params, g)}
        y = {}
        with torch.no_grad():
            for group in self.opt.param_groups:
                for p in group["params"]:
                    gi = by_id[id(p)]
                    if gi is None:
                        continue
                    state = self.opt.state.get(p, {})
                    x = p.detach().float()
                    if isinstance(self.opt, torch.optim.AdamW):
                        y[id(p)] = adamw_lookahead(x, gi, group, state)
                    elif isinstance(self.opt, torch.optim.SGD):
                        y[id(p)] = sgd_lookahead(x, gi, group, state)
                    else:
                        raise TypeError(type(self.opt))
        return [y.get(id(p)) for p in self.params]

    # ---- one step of each method -----------------------------------------
    def step_plain(self, batch):
        self.optimizer_step(self.grad(batch))

    def step_sam(self, batch):
        g = self.grad(batch)
        e = self.ascent(g)
        self.optimizer_step(g if e is None else self.grad_at(e, batch))

    def step_msam(self, batch, m: int):
        n = batch_len(batch)
        G = None
        start = 0
        for size in split_sizes(n, m):
            part = batch_slice(batch, start, start + size)
            start += size
            g_j = self.grad(part)
            e_j = self.ascent(g_j)
            h_j = g_j if e_j is None else self.grad_at(e_j, part)
            w = size / n
            h_j = [None if h is None else w * h for h in h_j]
            G = h_j if G is None else [a if b is None else (b if a is None else a + b) for a, b in zip(G, h_j)]
        self.optimizer_step(G)

    def step_sampa(self, batch, lam: float):
        if self.g is None:  # first Trainer step: g_0 only, x and the optimizer state unchanged
            self.g, self.held = self.grad(batch), batch
            return
        g_tilde = self.grad_at(self.ascent(self.g), self.held)
        y = self.model_update(self.clip(self.g))
        self.lookahead_points.append([None if v is None else v.clone() for v in y])
        with self.moved(y):
            g_next = self.grad(batch)
        G = [None if (a is None and b is None) else
             (1 - lam) * (a if a is not None else 0) + lam * (b if b is not None else 0)
             for a, b in zip(g_tilde, g_next)]
        self.optimizer_step(G)
        self.g, self.held = g_next, batch

    def step_async(self, batch, ratio: float):
        if self.a is None:
            descent = self.grad(batch)
        else:
            descent = self.grad_at(self.ascent(self.a), batch)
        n = batch_len(batch)
        self.a = self.grad(batch_slice(batch, 0, math.ceil(ratio * n)))  # at x_t, before the step
        self.optimizer_step(descent)

    def run(self, method: str, batches, **kw):
        step = {"plain": self.step_plain, "sam": self.step_sam, "msam": self.step_msam,
                "sampa": self.step_sampa, "asyncsam": self.step_async}[method]
        for batch in batches:
            step(batch, **kw)
        return self
