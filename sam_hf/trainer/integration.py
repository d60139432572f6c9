"""How `import sam_hf` plugs into transformers.

1. The registered method names (`sam`, `msam`, `sampa`, `asyncsam`, ...) become `OptimizerNames` members,
   so `TrainingArguments(optim="sampa")` and HfArgumentParser's `--optim sampa`
   (its argparse choices are read from the enum) accept them.
2. `Trainer.__init__` is wrapped: when `args.optim` is one of those names and
   the trainer's class does not already include `SharpnessMixin`, the instance's
   class becomes `Sharpness<ItsClass>(SharpnessMixin, ItsClass)`. Any Trainer
   subclass a script builds (`Seq2SeqTrainer`, TRL's `SFTTrainer`, ...) thus
   gets the methods without being edited. Every other optimizer is untouched.
3. The same wrapper records each Trainer under its model (weakly, with
   `sharpness.remember_trainer`), so a `SharpnessCallback`, which gets the
   model but not the Trainer, can log through `Trainer.log`; and when
   `sam-hf launch --sharpness_every N` has set `sharpness_callback_options`,
   it adds a `SharpnessCallback` to every Trainer that has none, whatever its
   optimizer.
4. `TrainingArguments.__post_init__` is wrapped: a sharpness-aware `optim` with bad `optim_args` fails where
   the arguments are built, before the script loads data and a model.
All are idempotent.
"""

from __future__ import annotations

import functools

from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from .. import registry
from ..config import SharpnessConfig
from ..sharpness.callback import SharpnessCallback, remember_trainer
from .mixin import SharpnessMixin, SharpnessTrainer

_classes: dict[type, type] = {}

# SharpnessCallback keyword arguments for every Trainer built (set by `sam-hf launch --sharpness_every N`)
sharpness_callback_options: dict | None = None


def register_optimizer_names() -> None:
    for value in registry.names():
        if value in OptimizerNames._value2member_map_:
            continue
        name = value.upper()
        member = str.__new__(OptimizerNames, value)
        member._name_, member._value_ = name, value
        OptimizerNames._member_map_[name] = member
        OptimizerNames._value2member_map_[value] = member
        OptimizerNames._member_names_.append(name)
        type.__setattr__(OptimizerNames, name, member)


def sharpness_class(cls: type) -> type:
    """`cls` with SharpnessMixin in front, one class per `cls` (so type identity and isinstance stay stable).
    A plain `Trainer` becomes `SharpnessTrainer` itself."""
    if issubclass(cls, SharpnessMixin):
        return cls
    if cls is Trainer:
        return SharpnessTrainer
    if cls not in _classes:
        _classes[cls] = type(f"Sharpness{cls.__name__}", (SharpnessMixin, cls), {"__module__": __name__})
    return _classes[cls]


def patch_trainer() -> None:
    if getattr(Trainer.__init__, "_sam_hf_patched", False):
        return
    original = Trainer.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if registry.is_method(self.args.optim) and not isinstance(self, SharpnessMixin):
            self.__class__ = sharpness_class(type(self))
        if isinstance(self, SharpnessMixin):
            self._sharpness_setup()
        remember_trainer(self)
        if sharpness_callback_options is not None:
            if not any(isinstance(cb, SharpnessCallback) for cb in self.callback_handler.callbacks):
                self.add_callback(SharpnessCallback(**sharpness_callback_options))

    __init__._sam_hf_patched = True
    Trainer.__init__ = __init__


def patch_training_arguments() -> None:
    """`TrainingArguments(optim="sampa", optim_args="rho=-1")` fails where it is built, before a script loads its
    data and model, with the same message Trainer would give."""
    if getattr(TrainingArguments.__post_init__, "_sam_hf_patched", False):
        return
    original = TrainingArguments.__post_init__

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if registry.is_method(self.optim):
            SharpnessConfig.from_optim_args(self.optim, self.optim_args)

    __post_init__._sam_hf_patched = True
    TrainingArguments.__post_init__ = __post_init__


def install() -> None:
    register_optimizer_names()
    patch_trainer()
    patch_training_arguments()
