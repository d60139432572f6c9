"""SharpnessConfig: every option of every method, parsed from `--optim_args`.

`optim_args` is the comma-separated `key=value` string that transformers
already carries (`--optim sampa --optim_args "rho=0.05,lam=0.2"`). Keys that
are not ours are passed to the base optimizer (e.g. `momentum=0.9` for
`base=sgd`), but only keys that base optimizer's Trainer handler reads: a typo
fails here, before training, with the list of keys that would work.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

METHODS = ("sam", "msam", "sampa", "asyncsam")
SCHEDULED_METHODS = ("sam", "msam")  # interval/start/stop: the others carry a gradient from step to step

# Base-optimizer keys that transformers' own handlers read from optim_args, less those Trainer then overrides:
# its two parameter groups set `weight_decay` (args.weight_decay, and 0 for biases and LayerNorm weights), so
# `weight_decay` in optim_args would be read and silently dropped (OVERRIDDEN_BASE_KEYS names the flag to use).
BASE_OPTIM_KEYS = {
    "sgd": ("momentum", "dampening", "nesterov"),
    "adagrad": ("lr_decay", "eps"),
    "rmsprop": ("alpha", "eps", "momentum", "centered"),
}
OVERRIDDEN_BASE_KEYS = {"weight_decay": "--weight_decay (TrainingArguments.weight_decay)",
                        "lr": "--learning_rate (TrainingArguments.learning_rate)"}

# Base optimizers the methods are tested with; others run with lookahead=sgd only.
LOOKAHEAD_BASES = ("adamw_torch", "adamw_torch_fused", "sgd")

# Optimizers whose step is not "take .grad and update": they cannot sit under SAM.
UNSUPPORTED_BASES = ("lomo", "adalomo", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
                     "galore_adafactor_layerwise", "apollo_adamw_layerwise")


DEFAULTS_FOR_MESSAGES = {"rho": 0.05, "eta": 0.01, "lam": 0.2, "micro_batches": 8, "check_every": 50, "interval": 4,
                         "start": 0.5, "stop": 0.5,
                         "ascent_batch_ratio": 0.5, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.01}

# How the base optimizer's own keys are read (as transformers' handlers read them).
BASE_KEY_TYPES = {"momentum": "float", "dampening": "float", "weight_decay": "float", "lr_decay": "float",
                  "eps": "float", "alpha": "float", "nesterov": "bool", "centered": "bool"}


class SharpnessConfigError(ValueError):
    """A bad `optim_args` value or an impossible combination, found before training starts."""


def _bool(key: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise SharpnessConfigError(f"optim_args: {key}={value!r} is not a boolean; use {key}=true or {key}=false")


def _float(key: str, value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise SharpnessConfigError(f"optim_args: {key}={value!r} is not a number; give a decimal, "
                                   f"e.g. {key}={DEFAULTS_FOR_MESSAGES.get(key, 0.1)}") from None
    if not math.isfinite(out):
        raise SharpnessConfigError(f"optim_args: {key}={value!r} must be finite")
    return out


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SharpnessConfigError(f"optim_args: {key}={value!r} is not an integer; give a whole number, "
                                   f"e.g. {key}={DEFAULTS_FOR_MESSAGES.get(key, 1)}") from None


@dataclass
class SharpnessConfig:
    """Options of the sharpness-aware methods (see README "Methods and options")."""

    method: str = "sam"
    rho: float = 0.05
    adaptive: bool = False  # ASAM: e = rho T^2 g / ||T g||, T = |x| + eta
    eta: float = 0.01
    lam: float = 0.2  # SAMPa's lambda
    micro_batches: int = 8  # mSAM's m
    ascent_batch_ratio: float | str = 1.0  # Asynchronous SAM's r, or "auto"
    base: str = "adamw_torch"
    lookahead: str = "optimizer"  # SAMPa's ModelUpdate: the base optimizer's own step, or plain SGD
    parallel: str = "auto"  # auto | on | off
    sync_ascent: bool = True  # SAM with DDP: average the ascent gradient over ranks
    ascent_device: str = "auto"  # Asynchronous SAM's ascent rank: auto (Trainer's device) or cpu
    ascent_threads: int = 0  # with ascent_device=cpu: the CPU rank's threads (0: every core but one)
    bn_stats: str = "clean"  # which pass updates BatchNorm running statistics: clean | all
    check_every: int = 50  # steps between replica checksums in role-parallel mode
    exchange_dtype: str = "fp32"  # role mode: what the gradients cross the link as (bf16: half the bytes, rounded)
    # SAM on a schedule (sam, msam): sharpness-aware every `interval`-th optimizer step within [start, stop) of the
    # run's optimizer steps (fractions); every other step is the base optimizer's own one-pass step
    interval: int = 1
    start: float = 0.0
    stop: float = 1.0
    base_optim_args: dict[str, str] = field(default_factory=dict)

    # ---- parsing -------------------------------------------------------
    @classmethod
    def from_optim_args(cls, method: str, optim_args: str | None) -> "SharpnessConfig":
        method = str(getattr(method, "value", method))
        if method not in METHODS:
            raise SharpnessConfigError(f"optim={method!r} is not a sharpness-aware method; use one of {METHODS}")
        raw = parse_optim_args(optim_args)
        cfg = cls(method=method)
        converters = {
            "rho": _float, "adaptive": _bool, "eta": _float, "lam": _float, "micro_batches": _int,
            "base": lambda k, v: v, "lookahead": lambda k, v: v.lower(), "parallel": lambda k, v: v.lower(),
            "sync_ascent": _bool, "ascent_device": lambda k, v: v.lower(), "bn_stats": lambda k, v: v.lower(),
            "check_every": _int, "ascent_threads": _int, "interval": _int, "start": _float, "stop": _float,
            "exchange_dtype": lambda k, v: v.lower(),
            "ascent_batch_ratio": lambda k, v: "auto" if v.lower() == "auto" else _float(k, v),
        }
        base_args: dict[str, str] = {}
        for key, value in raw.items():
            if key in converters:
                setattr(cfg, key, converters[key](key, value))
            else:
                base_args[key] = value
        cfg.base_optim_args = base_args
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(key: str, value: Any, allowed: str) -> SharpnessConfigError:
            return SharpnessConfigError(f"optim_args: {key}={value!r} is not allowed; {allowed}")

        if not self.rho > 0:
            raise bad("rho", self.rho, "rho must be > 0 (e.g. rho=0.05)")
        if not self.eta >= 0:
            raise bad("eta", self.eta, "eta (ASAM's T = |x| + eta) must be >= 0 (e.g. eta=0.01)")
        if not 0.0 <= self.lam <= 1.0:
            raise bad("lam", self.lam, "lam must be in [0, 1] (e.g. lam=0.2)")
        if self.micro_batches < 1:
            raise bad("micro_batches", self.micro_batches, "micro_batches must be >= 1 (e.g. micro_batches=8)")
        r = self.ascent_batch_ratio
        if r != "auto" and not (isinstance(r, float) and 0.0 < r <= 1.0):
            raise bad("ascent_batch_ratio", r, "use a number in (0, 1] or auto")
        if self.lookahead not in ("optimizer", "sgd"):
            raise bad("lookahead", self.lookahead, "use lookahead=optimizer (the base optimizer's own step) or sgd")
        if self.parallel not in ("auto", "on", "off"):
            raise bad("parallel", self.parallel, "use auto, on or off")
        if self.ascent_device not in ("auto", "cpu"):
            raise bad("ascent_device", self.ascent_device,
                      "use auto (the ascent rank uses Trainer's device) or cpu (rank 1 computes the ascent on the CPU)")
        if self.ascent_device == "cpu" and self.method != "asyncsam":
            raise bad("ascent_device", self.ascent_device, f"it applies to asyncsam only, not {self.method}; drop it")
        if self.ascent_device == "cpu" and self.parallel == "off":
            raise bad("ascent_device", self.ascent_device,
                      "a CPU ascent rank needs the role-parallel layout; drop parallel=off")
        if self.ascent_threads < 0 or (self.ascent_threads and self.ascent_device != "cpu"):
            raise bad("ascent_threads", self.ascent_threads,
                      "it sets the CPU ascent rank's threads: use a number >= 0 (0: every core but one) together "
                      "with ascent_device=cpu")
        if self.interval < 1:
            raise bad("interval", self.interval, "use a whole number >= 1 (interval=4: sharpness-aware every 4th step)")
        for key in ("start", "stop"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, getattr(self, key), f"{key} is a fraction of the run's optimizer steps in [0, 1] "
                                                   f"(e.g. {key}={DEFAULTS_FOR_MESSAGES[key]})")
        if self.start > self.stop:
            raise bad("start", self.start, f"start must be <= stop={self.stop} (the method is active within "
                                           "[start, stop) of the run)")
        if self.scheduled and self.method not in SCHEDULED_METHODS:
            key = next(k for k, d in (("interval", 1), ("start", 0.0), ("stop", 1.0)) if getattr(self, k) != d)
            raise bad(key, getattr(self, key),
                      f"a schedule applies to sam and msam; {self.method} carries a gradient from one step to the next "
                      "(SAMPa's g_t, Asynchronous SAM's a_(t-1)), so a base-optimizer step in between has no clean "
                      f"definition: drop {key}, or use --optim sam/msam with it")
        if self.bn_stats not in ("clean", "all"):
            raise bad("bn_stats", self.bn_stats, "use clean (running stats from the unperturbed pass only) or all")
        if self.check_every < 0:
            raise bad("check_every", self.check_every, "use a number of steps >= 0 (0 disables the check)")
        if self.exchange_dtype not in ("fp32", "bf16"):
            raise bad("exchange_dtype", self.exchange_dtype, "use fp32 (exact, the default) or bf16 (half the bytes)")
        self._validate_base()

    def _validate_base(self) -> None:
        from transformers.training_args import OptimizerNames

        known = {m.value for m in OptimizerNames} - set(METHODS)
        if self.base in METHODS:
            raise SharpnessConfigError(f"optim_args: base={self.base!r} is a sharpness method itself; "
                                       "use a plain optimizer such as adamw_torch or sgd")
        if self.base not in known:
            raise SharpnessConfigError(f"optim_args: base={self.base!r} is not a Trainer optimizer; "
                                       f"use one of {sorted(known)}")
        if self.base in UNSUPPORTED_BASES:
            raise SharpnessConfigError(f"optim_args: base={self.base!r} fuses the backward pass with the update, "
                                       "so there is no gradient to perturb; use adamw_torch or sgd")
        allowed = BASE_OPTIM_KEYS.get(self.base, ())
        ours = sorted(f.name for f in dataclasses.fields(self) if f.name not in ("method", "base_optim_args"))
        for key, value in self.base_optim_args.items():
            if key in OVERRIDDEN_BASE_KEYS:
                raise SharpnessConfigError(
                    f"optim_args: {key}={value!r} would be ignored: Trainer's parameter groups set the base "
                    f"optimizer's {key} themselves; use {OVERRIDDEN_BASE_KEYS[key]} instead")
            if key not in allowed:
                base_keys = f"; {self.base} takes {list(allowed)}" if allowed else ""
                raise SharpnessConfigError(f"optim_args: unknown key {key}={value!r}; sam_hf takes {ours}{base_keys}")
            # checked here, before training: transformers would fail later (or read a typo as false)
            if BASE_KEY_TYPES.get(key) == "bool":
                _bool(key, value)
            elif BASE_KEY_TYPES.get(key) == "float" and _float(key, value) < 0:
                raise SharpnessConfigError(f"optim_args: {key}={value!r} must be >= 0 for base={self.base}")
        if self.method == "sampa" and self.lookahead == "optimizer" and self.base not in LOOKAHEAD_BASES:
            raise SharpnessConfigError(
                f"optim_args: lookahead=optimizer has a closed form for base in {list(LOOKAHEAD_BASES)}, "
                f"not base={self.base!r}; use lookahead=sgd (y = x - lr * g) or one of those bases")

    @property
    def scheduled(self) -> bool:
        """Whether some optimizer steps are the base optimizer's own (interval, start or stop set)."""
        return (self.interval, self.start, self.stop) != (1, 0.0, 1.0)

    def active(self, step: int, total: int) -> bool:
        """Whether optimizer step `step` (0-based) of `total` is sharpness-aware: within [start, stop) of the
        run, and every `interval`-th step counted from the first one there."""
        first = math.ceil(self.start * total - 1e-9)
        return first <= step < self.stop * total - 1e-9 and (step - first) % self.interval == 0

    def base_optim_args_string(self) -> str | None:
        """The part of optim_args meant for the base optimizer, in transformers' own format."""
        return ",".join(f"{k}={v}" for k, v in self.base_optim_args.items()) or None


def parse_optim_args(optim_args: str | None) -> dict[str, str]:
    """`"rho=0.05, lam=0.2"` -> `{"rho": "0.05", "lam": "0.2"}`, with errors that show the bad piece.

    Spaces around keys and values are dropped, as transformers drops them; a space inside one (`"rho=0.05 lam=0.2"`,
    which transformers would read as rho = "0.05lam=0.2") is refused: pairs are separated by commas."""
    out: dict[str, str] = {}
    if not optim_args:
        return out
    for piece in optim_args.split(","):
        piece = piece.strip()
        if not piece:
            continue
        key, sep, value = (part.strip() for part in piece.partition("="))
        if not sep or not key or not value:
            raise SharpnessConfigError(f"optim_args: {piece!r} is not key=value (e.g. --optim_args \"rho=0.05,lam=0.2\")")
        spaced = any(ch.isspace() for ch in key + value)
        if "=" in value and spaced:  # "rho=0.05 lam=0.2"
            pairs = ",".join("=".join(w.strip() for w in p.split("=")) for p in re.split(r"\s+(?=[^=\s]+\s*=)", piece))
            raise SharpnessConfigError(f"optim_args: {piece!r} holds several key=value pairs: separate them with "
                                       f"commas, not spaces: --optim_args \"{pairs}\"")
        if "=" in value or spaced:
            raise SharpnessConfigError(f"optim_args: {piece!r} is not one key=value: a key or value holds "
                                       f"{'a space' if spaced else 'an ='}; give comma-separated key=value pairs "
                                       "(e.g. --optim_args \"rho=0.05,lam=0.2\")")
        if key in out:
            raise SharpnessConfigError(f"optim_args: key {key!r} is given twice")
        out[key] = value
    return out
