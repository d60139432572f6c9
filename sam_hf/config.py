"""Options: what every method shares, how a method declares its own, and `--optim_args` parsing.

`optim_args` is the comma-separated `key=value` string transformers already carries
(`--optim sampa --optim_args "rho=0.05,lam=0.2"`). Each method's options are a dataclass (registered with
the method, registry.py) built from option groups: `SharpnessConfig` (every method), the ascent rule's
options (methods/rules.py), `ScheduleOptions` (methods that may skip steps), `RoleOptions` (methods whose two
passes may run on two process groups), and the method's own fields. Each field is an `option(...)` with a
help text, which the options reference (docs/options.md) is generated from.

Everything is checked before training: a bad value, a key another method takes (naming that method), and a
key that is not the base optimizer's either (keys that are not ours pass to the base optimizer, e.g.
`momentum=0.9` for `base=sgd`, but only keys that its Trainer handler reads) fail with what would work.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from . import registry

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

# Optimizers whose step is not "take .grad and update": they cannot sit under SAM.
UNSUPPORTED_BASES = ("lomo", "adalomo", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
                     "galore_adafactor_layerwise", "apollo_adamw_layerwise")

# How the base optimizer's own keys are read (as transformers' handlers read them), with an example for messages.
BASE_KEY_TYPES = {"momentum": ("float", 0.9), "dampening": ("float", 0.0), "weight_decay": ("float", 0.01),
                  "lr_decay": ("float", 0.0), "eps": ("float", 1e-8), "alpha": ("float", 0.99),
                  "nesterov": ("bool", True), "centered": ("bool", False)}


class SharpnessConfigError(ValueError):
    """A bad `optim_args` value or an impossible combination, found before training starts."""


def option(default, help: str, *, choices: tuple[str, ...] | None = None, example=None, parse=None,
           why_not: str | None = None, rules: tuple[str, ...] | None = None):
    """A method option: its default, its help text (the options reference), the values a string option may take,
    an example value for messages, a parser for values that are not plain bool/int/float/str, the reason it
    does not apply to methods that lack it (said when one of those is given it), and the ascent rules that read it
    (the options reference lists it only for methods that run one of them)."""
    return field(default=default, metadata={"help": help, "choices": choices, "example": example, "parse": parse,
                                            "why_not": why_not, "rules": rules})


def option_fields(cls) -> list[dataclasses.Field]:
    """The options of a config class, in declaration order (the internal `method` and base keys left out)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


# ---- reading one value ----------------------------------------------------------------------------------------
def _example(key: str, fallback) -> Any:
    for spec in registry.specs():
        for f in option_fields(spec.config):
            if f.name == key:
                return f.metadata.get("example") or f.default
    return BASE_KEY_TYPES.get(key, (None, fallback))[1]


def parse_bool(key: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise SharpnessConfigError(f"optim_args: {key}={value!r} is not a boolean; use {key}=true or {key}=false")


def parse_float(key: str, value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise SharpnessConfigError(f"optim_args: {key}={value!r} is not a number; give a decimal, "
                                   f"e.g. {key}={_example(key, 0.1)}") from None
    if not math.isfinite(out):
        raise SharpnessConfigError(f"optim_args: {key}={value!r} must be finite")
    return out


def parse_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SharpnessConfigError(f"optim_args: {key}={value!r} is not an integer; give a whole number, "
                                   f"e.g. {key}={_example(key, 1)}") from None


def _convert(f: dataclasses.Field, key: str, value):
    """A value for option `f`: a string from optim_args is parsed; a Python value (the plain-PyTorch API) is
    checked against the option's type."""
    parse = f.metadata.get("parse")
    kind = type(f.default)
    if isinstance(value, str):
        if parse is not None:
            return parse(key, value)
        if kind is bool:
            return parse_bool(key, value)
        if kind is int:
            return parse_int(key, value)
        if kind is float:
            return parse_float(key, value)
        return value.strip().lower() if f.metadata.get("choices") else value.strip()
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if parse is None and not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise SharpnessConfigError(f"{key}={value!r} is not a {kind.__name__}; e.g. {key}={_example(key, f.default)}")
    return value


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


def _bad(key: str, value: Any, allowed: str) -> SharpnessConfigError:
    return SharpnessConfigError(f"optim_args: {key}={value!r} is not allowed; {allowed}")


# ---- the options every method takes ---------------------------------------------------------------------------
@dataclass
class SharpnessConfig:
    """Options every method takes (see docs/options.md); `from_optim_args` builds the method's own config."""

    method: str = "sam"
    rho: float = option(0.05, "radius of the perturbation (rho > 0)")
    base: str = option("adamw_torch", "the base optimizer, by its Trainer name (adamw_torch, sgd, adafactor, ...); "
                       "its own keys (momentum=0.9 for sgd) go in the same optim_args")
    bn_stats: str = option("clean", "which passes update BatchNorm running statistics: clean (the unperturbed pass "
                           "only) or all", choices=("clean", "all"))
    check_every: int = option(50, "steps between replica checksums on several processes (0: never)")
    base_optim_args: dict[str, str] = field(default_factory=dict)
    # the option keys the user gave (optim_args or keywords): an option a rule does not use is refused only if given
    given: frozenset = field(default_factory=frozenset, repr=False, compare=False)

    # ---- building ----------------------------------------------------------
    @classmethod
    def from_optim_args(cls, method, optim_args: str | None) -> "SharpnessConfig":
        """The config of `method` (an --optim name) from an optim_args string, validated."""
        return cls.create(method, **parse_optim_args(optim_args))

    @classmethod
    def create(cls, method, **options) -> "SharpnessConfig":
        """The config of `method` from keyword options (strings are parsed as in optim_args), validated."""
        try:
            spec = registry.get(method)
        except KeyError as err:
            raise SharpnessConfigError(err.args[0]) from None
        own = {f.name: f for f in option_fields(spec.config)}
        values, base_args = {}, {}
        for key, value in options.items():
            if key in own:
                values[key] = _convert(own[key], key, value)
            else:
                _refuse_other_methods_key(spec.name, own, key, value)
                base_args[key] = value if isinstance(value, str) else str(value).lower()
        cfg = spec.config(method=spec.name, base_optim_args=base_args, given=frozenset(values), **values)
        cfg.validate()
        rules = getattr(spec.method, "rules", None)
        if getattr(cfg, "rule", None) is not None and rules is not None and cfg.rule not in rules:
            takes = sorted(s.name for s in registry.specs() if cfg.rule in getattr(s.method, "rules", ())
                           and any(f.name == "rule" for f in option_fields(s.config)))
            raise SharpnessConfigError(
                f"optim_args: --optim {spec.name} runs rule in {list(rules)}, not rule={cfg.rule} (see "
                f"docs/methods/combinations.md); rule={cfg.rule} runs with --optim {', '.join(takes)}")
        return cfg

    def was_given(self, key: str) -> bool:
        """Whether option `key` was set by the user (for a config built directly: whether it differs from its
        default)."""
        if self.given:
            return key in self.given
        default = next((f.default for f in option_fields(type(self)) if f.name == key), None)
        return getattr(self, key, default) != default

    def validate(self) -> None:
        for f in option_fields(type(self)):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                listed = ", ".join(choices[:-1]) + " or " + choices[-1]
                raise _bad(f.name, value, f"use {listed} ({f.metadata['help']})")
        if not self.rho > 0:
            raise _bad("rho", self.rho, "rho must be > 0 (e.g. rho=0.05)")
        if self.check_every < 0:
            raise _bad("check_every", self.check_every, "use a number of steps >= 0 (0 disables the check)")
        self._validate_base()

    def _validate_base(self) -> None:
        from transformers.training_args import OptimizerNames

        known = {m.value for m in OptimizerNames} - set(registry.names())
        if registry.is_method(self.base):
            raise SharpnessConfigError(f"optim_args: base={self.base!r} is a sharpness method itself; "
                                       "use a plain optimizer such as adamw_torch or sgd")
        if self.base not in known:
            raise SharpnessConfigError(f"optim_args: base={self.base!r} is not a Trainer optimizer; "
                                       f"use one of {sorted(known)}")
        if self.base in UNSUPPORTED_BASES:
            raise SharpnessConfigError(f"optim_args: base={self.base!r} fuses the backward pass with the update, "
                                       "so there is no gradient to perturb; use adamw_torch or sgd")
        allowed = BASE_OPTIM_KEYS.get(self.base, ())
        ours = sorted(f.name for f in option_fields(type(self)))
        for key, value in self.base_optim_args.items():
            if key in OVERRIDDEN_BASE_KEYS:
                raise SharpnessConfigError(
                    f"optim_args: {key}={value!r} would be ignored: Trainer's parameter groups set the base "
                    f"optimizer's {key} themselves; use {OVERRIDDEN_BASE_KEYS[key]} instead")
            if key not in allowed:
                base_keys = f"; {self.base} takes {list(allowed)}" if allowed else ""
                raise SharpnessConfigError(f"optim_args: unknown key {key}={value!r}; --optim {self.method} takes "
                                           f"{ours}{base_keys}")
            # checked here, before training: transformers would fail later (or read a typo as false)
            kind = BASE_KEY_TYPES.get(key, ("str",))[0]
            if kind == "bool":
                parse_bool(key, value)
            elif kind == "float" and parse_float(key, value) < 0:
                raise SharpnessConfigError(f"optim_args: {key}={value!r} must be >= 0 for base={self.base}")

    # ---- what the run asks of the layout ----------------------------------------
    @property
    def scheduled(self) -> bool:
        """Whether some optimizer steps are the base optimizer's own (ScheduleOptions)."""
        return False

    def active(self, step: int, total: int) -> bool:
        """Whether optimizer step `step` (0-based) of `total` is sharpness-aware (always, without a schedule)."""
        return True

    @property
    def cpu_rank(self) -> bool:
        """Whether rank 1 computes on the CPU beside a GPU rank 0 (Asynchronous SAM's ascent_device=cpu)."""
        return False

    def base_optim_args_string(self) -> str | None:
        """The part of optim_args meant for the base optimizer, in transformers' own format."""
        return ",".join(f"{k}={v}" for k, v in self.base_optim_args.items()) or None


def _refuse_other_methods_key(method: str, own: dict, key: str, value) -> None:
    """A key another method takes would be silently ignored here: refuse it, naming the methods it belongs to."""
    owners = [s.name for s in registry.specs() if key in {f.name for f in option_fields(s.config)}]
    if not owners:
        return
    why = next((f.metadata.get("why_not") for s in registry.specs() for f in option_fields(s.config)
                if f.name == key and f.metadata.get("why_not")), None)
    raise SharpnessConfigError(
        f"optim_args: {key}={value} applies to {' and '.join(owners)} only, not to --optim {method}"
        f"{f' ({why})' if why else ''}: drop {key}, or use --optim {owners[0]}")


# ---- option groups some methods take ------------------------------------------------------------------------
_SCHEDULE_WHY = ("a schedule makes some steps the base optimizer's own; a method that carries a gradient from one "
                 "step to the next (SAMPa's g_t, Asynchronous SAM's a_(t-1)) has no clean definition of such a step")


@dataclass
class ScheduleOptions:
    """SAM on a schedule: sharpness-aware every `interval`-th optimizer step within [start, stop) of the run's
    optimizer steps (fractions); every other step is the base optimizer's own one-pass step."""

    interval: int = option(1, "sharpness-aware every interval-th optimizer step; the others are the base "
                           "optimizer's own (interval=4: a quarter of the steps)", example=4, why_not=_SCHEDULE_WHY)
    start: float = option(0.0, "first fraction of the run's optimizer steps that is sharpness-aware",
                          example=0.5, why_not=_SCHEDULE_WHY)
    stop: float = option(1.0, "fraction of the run's optimizer steps where the sharpness-aware steps end",
                         example=0.5, why_not=_SCHEDULE_WHY)

    def validate(self) -> None:
        super().validate()
        if self.interval < 1:
            raise _bad("interval", self.interval, "use a whole number >= 1 (interval=4: sharpness-aware every 4th step)")
        for key in ("start", "stop"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise _bad(key, getattr(self, key), f"{key} is a fraction of the run's optimizer steps in [0, 1] "
                                                    f"(e.g. {key}=0.5)")
        if self.start > self.stop:
            raise _bad("start", self.start, f"start must be <= stop={self.stop} (the method is active within "
                                            "[start, stop) of the run)")

    @property
    def scheduled(self) -> bool:
        return (self.interval, self.start, self.stop) != (1, 0.0, 1.0)

    def active(self, step: int, total: int) -> bool:
        """Whether optimizer step `step` (0-based) of `total` is sharpness-aware: within [start, stop) of the
        run, and every `interval`-th step counted from the first one there."""
        first = math.ceil(self.start * total - 1e-9)
        return first <= step < self.stop * total - 1e-9 and (step - first) % self.interval == 0


@dataclass
class RoleOptions:
    """Methods whose two gradient passes are independent, so they may run on two halves of the processes."""

    parallel: str = option("auto", "auto: the two passes on two halves of the processes where the method's "
                           "layout allows; on: always (2k processes); off: both passes on every rank",
                           choices=("auto", "on", "off"))
    exchange_dtype: str = option("fp32", "role mode: what the gradients cross the link as (fp32 exact; bf16 half "
                                 "the bytes, rounded)", choices=("fp32", "bf16"))


# ---- the options reference --------------------------------------------------------------------------------------
def _default_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def options_reference(methods=None) -> str:
    """The options of each registered method as markdown (docs/options.md is this, for every method)."""
    lines = ["# Options", "",
             "Every option goes in `--optim_args` as `key=value`, comma-separated (`--optim sampa --optim_args "
             "\"rho=0.1,lam=0.2\"`), or as a keyword of `sam_hf.SharpnessOptimizer`. A key the method does not "
             "take is refused before training, naming the methods that take it. Keys that are not sam_hf's go to "
             "the base optimizer (`base=sgd,momentum=0.9`): " + ", ".join(
                 f"{base} takes {', '.join(keys)}" for base, keys in BASE_OPTIM_KEYS.items()) + ".",
             "", "Generated from the option definitions by `sam-hf options`; `tests` check it is current.", ""]
    for spec in registry.specs():
        if methods and spec.name not in methods:
            continue
        lines += [f"## `--optim {spec.name}`", "", spec.summary + (f" ({spec.paper})." if spec.paper else "."), "",
                  "| key | default | what it does |", "|---|---|---|"]
        for f in option_fields(spec.config):
            rules = f.metadata.get("rules")
            if rules and not set(rules) & set(getattr(spec.method, "rules", rules)):
                continue  # an option of ascent rules this method does not run
            choices = f.metadata.get("choices") or ()
            meaning = f.metadata["help"]
            if not all(c in meaning for c in choices):
                meaning += f" (one of: {', '.join(choices)})"
            lines.append(f"| `{f.name}` | `{_default_text(f.default)}` | {meaning.replace('|', chr(92) + '|')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`sam-hf options [METHOD ...]`: the options reference, for every method or the ones named."""
    import sam_hf  # noqa: F401  (registers the methods)

    names = list(argv or [])
    unknown = [n for n in names if not registry.is_method(n)]
    if unknown:
        print(f"sam-hf options: unknown method(s) {unknown}; the methods are {list(registry.names())}")
        return 2
    print(options_reference(names or None))
    return 0
