"""The one list of methods: each `--optim` name with its method class and its options.

A method is one module that defines its config (a dataclass of options, `config.option` fields with help),
its method class (methods/base.py) and calls `register_method` once. Everything that lists methods (the
`--optim` names transformers accepts, optim_args parsing, the options reference, bench, demo, the test
matrix) reads this registry. `sam_hf.register_method` also makes a method registered after `import sam_hf`
an `--optim` name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A configuration of a method that the bench, the demo and the memory meter run (and the docs show)."""

    label: str
    optim_args: str
    processes: int = 1  # 2: on two processes (data parallel, or role mode for a two-role method)
    bench: bool = True  # a row of `sam-hf bench` (on the bench's AdamW base); else the memory meter's only
    meter: bool = True  # a row of the memory meter (benchmarks/param_copies.py: bias-free linear layers, no norms)


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the --optim name
    method: type  # a methods.base.SharpnessMethod subclass
    config: type  # a config.SharpnessConfig subclass: the options optim_args takes
    summary: str  # one line, for `sam-hf` help and the docs
    paper: str = ""  # the paper (and table or algorithm) the method follows
    examples: tuple[Example, ...] = ()


_methods: dict[str, MethodSpec] = {}


def register_method(name: str, method: type, config: type, summary: str, paper: str = "",
                    examples: tuple[Example, ...] = ()) -> MethodSpec:
    """Make `name` a sharpness-aware method. Registering a name again replaces it (a module reloaded)."""
    spec = MethodSpec(name, method, config, summary, paper, tuple(examples))
    method.name = name
    _methods[name] = spec
    return spec


def names() -> tuple[str, ...]:
    return tuple(_methods)


def specs() -> tuple[MethodSpec, ...]:
    return tuple(_methods.values())


def get(name) -> MethodSpec:
    """The spec of `name` (an `OptimizerNames` member or its string); KeyError naming the known methods."""
    key = str(getattr(name, "value", name))
    if key not in _methods:
        raise KeyError(f"optim={key!r} is not a sharpness-aware method; use one of {names()}")
    return _methods[key]


def is_method(name) -> bool:
    return str(getattr(name, "value", name)) in _methods
