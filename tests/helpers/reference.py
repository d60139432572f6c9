"""A plain-PyTorch restatement of the update rules in DESIGN.md, for the parity and conformance tests.

Nothing here comes from `sam_hf`: the point is an independent second reading of
the contract. Each method is a small loop over the same batches the Trainer
consumed, around the *same* base optimizer class Trainer builds
(`torch.optim.AdamW` / `torch.optim.SGD`) with Trainer's two parameter groups.

Conventions restated from DESIGN.md (the update rules and "Units") and issues 2 and 9:

* One Trainer step consumes one accumulation cycle B = (b_1, ..., b_n) of n
  micro-batches; a plain `dict` batch is a cycle of one micro-batch.
* Trainer's loss for a cycle is a weighted sum over its samples (or tokens),
  f(x, B) = sum_i w_i l_i(x); the weights depend on the loss kind (`LossKind`
  below, restated from transformers 5.24's `Trainer.training_step`,
  `compute_loss` and `_get_num_items_in_batch`). A slice S of the cycle (mSAM's
  B_j, Asynchronous SAM's A_t) has the loss f_S = sum_{i in S} w_i l_i: exactly
  its part of the cycle's sum, in the cycle's units. Every gradient below is the
  gradient of such a sum, so mSAM steps with sum_j h_j (the |B_j|/|B| of
  DESIGN.md's mean-loss statement is already inside the w_i).
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
* Learning-rate schedule: `lr_lambda(k)` is the factor of the k-th optimizer
  update (k = 0, 1, ...), counted in updates actually taken: SAMPa's first
  Trainer step takes none, so its k-th update uses the schedule's k-th value.
* Mixed precision (`autocast=torch.bfloat16`): every forward pass runs under
  `torch.autocast("cpu", dtype)` as accelerate wraps the model's forward, and
  the outputs are taken in fp32 (accelerate's `convert_outputs_to_fp32`); a loss
  computed outside the model (compute_loss_func, label smoothing) is computed
  outside autocast, as Trainer does. Weights, gradients and optimizer stay fp32.

Methods (one Trainer step each):

  SAM     e = rho g/||g||; step with grad f(x + e, B); x restored by copy.
  ASAM    e = rho T^2 g/||T g||, T = |x| + eta for weights and T = 1 for biases
          (the ASAM authors' code rescales parameters named `weight` only; issue 9, item 5).
  mSAM    B (the concatenated cycle) split into m consecutive ranges B_j (sizes differ by <= 1,
          the first ones larger; a range may cross Trainer's micro-batches):
          e_j = rho g_j/||g_j||, g_j = grad f_{B_j}(x); step with sum_j grad f_{B_j}(x + e_j).
  SAMPa   first step: g_0 = grad f(x_0, B_0), no optimizer step, state and schedule untouched.
          later:  g~ = grad f(x + rho g_t/||g_t||, B_t)
                  y  = ModelUpdate(x, clip(g_t))   (closed form, optimizer state untouched,
                                                    at the learning rate of the update being taken)
                  g_{t+1} = grad f(y, B_{t+1});  G = (1-lam) g~ + lam g_{t+1}
  AsyncSAM (tau = 1)  t = 0: step with grad f(x_0, B_0)
          t >= 1: step with grad f(x_t + rho a_{t-1}/||a_{t-1}||, B_t)
          a_t = grad f_{A_t}(x_t), A_t the first ceil(r |B_t|) samples of the concatenated cycle.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

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


def as_cycle(batch) -> list[dict]:
    """A Trainer step's batches: a list of micro-batches (a single dict is a cycle of one)."""
    return [batch] if isinstance(batch, dict) else list(batch)


def cycle_len(cycle: list[dict]) -> int:
    return sum(batch_len(b) for b in cycle)


def pieces(cycle: list[dict], start: int, stop: int):
    """Samples [start, stop) of the concatenated cycle as (micro-batch index, lo, hi) ranges."""
    out, offset = [], 0
    for j, b in enumerate(cycle):
        n = batch_len(b)
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((j, lo - offset, hi - offset))
        offset += n
    return out


# --------------------------------------------------------------------------- Trainer's loss units


class LossKind:
    """Trainer's loss for one accumulation cycle as sum_i w_i l_i, restated per kind of loss.

    `part(ref, cycle, j, lo, hi)` is sum_{i in [lo, hi) of micro-batch j} w_i l_i (a differentiable scalar, fp32);
    `count(cycle)` is the `num_items_in_batch` Trainer hands to `training_step` for the cycle (None: it hands none).
    """

    def count(self, cycle):
        return None

    def part(self, ref: "Reference", cycle, j, lo, hi):
        raise NotImplementedError


class ModelMean(LossKind):
    """The model returns the mean loss over its batch and its forward has no **kwargs (TinyNet): Trainer passes
    no count and divides each micro-batch's loss by the number n of micro-batches in the cycle. w_i = 1/(|b| n).

    `divide_by_steps=False`: the model's forward takes **kwargs but ignores `num_items_in_batch` (BERT
    classifiers): Trainer counts labels != -100 over the cycle, passes the count, takes the loss as already
    normalised for accumulation and does not divide by n. w_i = 1/|b| (transformers 5.x's behaviour)."""

    def __init__(self, divide_by_steps: bool = True):
        self.divide_by_steps = divide_by_steps

    def count(self, cycle):
        if self.divide_by_steps:
            return None
        return int(sum((b["labels"] != -100).sum() for b in cycle))

    def part(self, ref, cycle, j, lo, hi):
        b = cycle[j]
        n = len(cycle) if self.divide_by_steps else 1
        mean = ref.forward(batch_slice(b, lo, hi))["loss"].float()
        return mean * ((hi - lo) / (batch_len(b) * n))


class CountNormalised(LossKind):
    """A user `compute_loss_func` returning sum_i CE_i / num_items_in_batch, on a model without **kwargs: Trainer
    counts labels != -100 over the whole cycle (N), pops the labels before the forward, and does not divide by n.
    w_i = 1/N."""

    def count(self, cycle):
        return int(sum((b["labels"] != -100).sum() for b in cycle))

    def part(self, ref, cycle, j, lo, hi):
        inputs = batch_slice(cycle[j], lo, hi)
        labels = inputs.pop("labels")
        logits = ref.forward(inputs)["logits"].float()
        return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100) / self.count(cycle)


class TokenNormalised(LossKind):
    """A causal LM (forward takes **kwargs): the model predicts token t+1 from tokens <= t, returns the sum of the
    token cross-entropies over its micro-batch divided by the count it is given, and Trainer does not divide by n.
    w_token = 1/N. Trainer's count N: labels != -100 over the cycle, counted on the shifted labels (labels[:, 1:])
    when the model's loss type is ForCausalLM, which transformers derives from the class name (`LlamaForCausalLM`
    yes, `GPT2LMHeadModel` no: that one's count includes each row's first label, which no token predicts)."""

    def __init__(self, count_shifted: bool = True):
        self.count_shifted = count_shifted

    @staticmethod
    def counts_shifted_labels(model: nn.Module) -> bool:
        return "ForCausalLM" in type(model).__name__

    def count(self, cycle):
        return int(sum((b["labels"][:, 1:] if self.count_shifted else b["labels"]).ne(-100).sum() for b in cycle))

    def part(self, ref, cycle, j, lo, hi):
        inputs = batch_slice(cycle[j], lo, hi)
        labels = inputs.pop("labels")
        logits = ref.forward(inputs)["logits"].float()
        vocab = logits.shape[-1]
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="sum",
                             ignore_index=-100)
        return ce / self.count(cycle)


class LabelSmoothed(LossKind):
    """Trainer's label smoothing (`label_smoothing_factor=eps`) on a model without **kwargs: Trainer pops the labels,
    computes per sample (1 - eps)(-log p_y) + eps * mean_c(-log p_c), averages over the micro-batch's labels != -100
    (no count is passed) and divides by n. w_i = 1/(|b active| n)."""

    def __init__(self, eps: float):
        self.eps = eps

    def part(self, ref, cycle, j, lo, hi):
        b = cycle[j]
        inputs = batch_slice(b, lo, hi)
        labels = inputs.pop("labels")
        logits = ref.forward(inputs)["logits"].float()
        nll = -F.log_softmax(logits, dim=-1)
        keep = labels != -100
        safe = labels.clamp_min(0)
        per_sample = (1 - self.eps) * nll.gather(-1, safe.unsqueeze(-1)).squeeze(-1) + self.eps * nll.mean(-1)
        active = int((b["labels"] != -100).sum())
        return (per_sample * keep).sum() / (active * len(cycle))


# --------------------------------------------------------------------------- Trainer's optimizer and schedule


# Trainer's rule (`Trainer.get_decay_parameter_names`), restated: no weight decay for parameters inside an
# nn.LayerNorm or whose lower-cased name matches one of these (biases, LayerNorm / RMSNorm weights by name).
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and normalisation weights (Trainer's rule, restated)."""
    out = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, nn.LayerNorm) or any(re.search(pat, full.lower()) for pat in NO_DECAY_PATTERNS):
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


def constant_schedule(k: int) -> float:
    return 1.0


def linear_warmup_schedule(warmup: int, total: int):
    """transformers' `lr_scheduler_type="linear"`, restated: k/warmup during the warm-up, then linear decay to 0 at
    `total` (the factor of the k-th optimizer update)."""

    def factor(k: int) -> float:
        if k < warmup:
            return k / max(1, warmup)
        return max(0.0, (total - k) / max(1, total - warmup))

    return factor


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


def _add(a, b):
    return [x if y is None else (y if x is None else x + y) for x, y in zip(a, b)]


class Reference:
    """Runs the DESIGN.md rules on `model` with the base optimizer `base`, one Trainer step per `step_*` call.

    Each step takes one cycle (a list of micro-batches, or one dict). `loss` says how Trainer weighs the cycle's
    samples (default: the model's mean loss, divided by the number of micro-batches), `autocast` the dtype of
    mixed-precision forward passes (None: fp32), `lr_lambda(k)` the schedule factor of the k-th update.
    """

    def __init__(self, model: nn.Module, base: Base, max_grad_norm: float = 0.0,
                 rho: float = 0.05, adaptive: bool = False, eta: float = 0.01,
                 loss: LossKind | None = None, autocast: torch.dtype | None = None, lr_lambda=None):
        self.model = model.train()  # as Trainer trains (the test models have no dropout)
        self.base = base
        self.opt = base.build(model)
        self.params = [p for group in self.opt.param_groups for p in group["params"]]
        by_id = {id(p): n for n, p in model.named_parameters()}
        self.names = [by_id[id(p)] for p in self.params]
        # ASAM's T = |x| + eta applies to weights only (the authors' code: `if 'weight' in name`), T = 1 for biases
        self.rescaled = ["weight" in name for name in self.names]
        self.max_grad_norm = max_grad_norm
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.loss = loss or ModelMean()
        self.autocast = autocast
        self.lr_lambda = lr_lambda or constant_schedule
        self.updates = 0  # optimizer updates taken
        self.update_lrs = []  # the learning rate of each update taken
        self.skipped = 0  # steps whose ascent gradient was zero or non-finite
        self.g = None  # SAMPa's g_t
        self.held = None  # SAMPa's B_t
        self.a = None  # Asynchronous SAM's a_{t-1}
        self.lookahead_points = []  # SAMPa's y_{t+1}, for inspection
        self.clean_losses = []  # per Trainer step (SAM, mSAM, plain): f(x_t, B_t) in Trainer's units
        self.last_loss = None  # the value of the loss whose gradient `grad` returned last

    # ---- primitives -------------------------------------------------------
    def forward(self, inputs: dict):
        """The model's forward as Trainer runs it (under autocast for mixed precision); outputs in fp32."""
        ctx = (torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with ctx:
            return self.model(**inputs)

    def slice_loss(self, cycle, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """sum_{i in [start, stop) of the concatenated cycle} w_i l_i: the slice's part of Trainer's loss."""
        cycle = as_cycle(cycle)
        stop = cycle_len(cycle) if stop is None else stop
        return sum(self.loss.part(self, cycle, j, lo, hi) for j, lo, hi in pieces(cycle, start, stop))

    def grad(self, cycle, start: int = 0, stop: int | None = None) -> list:
        """fp32 copy of the gradient of `slice_loss` (the whole cycle by default) per trainable parameter
        (None where it gets no gradient)."""
        for p in self.params:
            p.grad = None
        loss = self.slice_loss(cycle, start, stop)
        loss.backward()
        self.last_loss = float(loss.detach())
        out = [None if p.grad is None else p.grad.detach().float().clone() for p in self.params]
        for p in self.params:
            p.grad = None
        return out

    @staticmethod
    def norm(vectors) -> torch.Tensor:
        return torch.sqrt(sum((v.double() ** 2).sum() for v in vectors if v is not None)).float()

    def ascent(self, g):
        """e = rho g/||g|| (ASAM: rho T^2 g/||T g||), or None for a zero or non-finite g."""
        if self.adaptive:
            T = [p.detach().float().abs() + self.eta if r else torch.ones_like(p, dtype=torch.float32)
                 for p, r in zip(self.params, self.rescaled)]
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

    def grad_at(self, e, cycle, start: int = 0, stop: int | None = None):
        """grad f(x + e, slice); e=None: grad f(x, slice)."""
        if e is None:
            return self.grad(cycle, start, stop)
        with self.moved([None if ei is None else p.detach() + ei for p, ei in zip(self.params, e)]):
            return self.grad(cycle, start, stop)

    def clip(self, g):
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return g
        coef = min(1.0, self.max_grad_norm / (float(self.norm(g)) + 1e-6))
        return [None if gi is None else gi * coef for gi in g]

    def set_lr(self) -> None:
        """The learning rate of the update about to be taken (the schedule's `updates`-th value)."""
        lr = self.base.lr * self.lr_lambda(self.updates)
        for group in self.opt.param_groups:
            group["lr"] = lr

    def optimizer_step(self, G) -> None:
        self.set_lr()
        G = self.clip(G)  # Trainer clips the final gradient
        for p, gi in zip(self.params, G):
            p.grad = None if gi is None else gi.to(p.dtype)
        self.opt.step()
        for p in self.params:
            p.grad = None
        self.update_lrs.append(self.opt.param_groups[0]["lr"])
        self.updates += 1

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
        g = self.grad(batch)
        self.clean_losses.append(self.last_loss)
        self.optimizer_step(g)

    def step_sam(self, batch):
        g = self.grad(batch)  # with accumulation: the gradient of the whole cycle
        self.clean_losses.append(self.last_loss)
        e = self.ascent(g)
        self.optimizer_step(g if e is None else self.grad_at(e, batch))

    def step_msam(self, batch, m: int):
        cycle = as_cycle(batch)
        G, clean, start = None, 0.0, 0
        for size in split_sizes(cycle_len(cycle), m):
            stop = start + size
            g_j = self.grad(cycle, start, stop)  # the slice's part of the cycle's loss: its weights are inside
            clean += self.last_loss
            e_j = self.ascent(g_j)
            h_j = g_j if e_j is None else self.grad_at(e_j, cycle, start, stop)
            G = h_j if G is None else _add(G, h_j)
            start = stop
        self.clean_losses.append(clean)
        self.optimizer_step(G)

    def step_sampa(self, batch, lam: float):
        if self.g is None:  # first Trainer step: g_0 only; x, the optimizer state and the schedule unchanged
            self.g, self.held = self.grad(batch), batch
            return
        self.set_lr()  # the lookahead runs at the learning rate of the update it anticipates
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
        n = cycle_len(as_cycle(batch))
        self.a = self.grad(batch, 0, math.ceil(ratio * n))  # at x_t, before the step
        self.optimizer_step(descent)

    def run(self, method: str, batches, **kw):
        step = {"plain": self.step_plain, "sam": self.step_sam, "msam": self.step_msam,
                "sampa": self.step_sampa, "asyncsam": self.step_async}[method]
        for batch in batches:
            step(batch, **kw)
        return self
