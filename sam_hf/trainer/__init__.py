"""Trainer glue: the mixin, Trainer-exact gradient passes, callbacks, and the `--optim` name registration."""

from .callbacks import loss_factor_note
from .mixin import SharpnessMixin, SharpnessTrainer

__all__ = ["SharpnessMixin", "SharpnessTrainer", "loss_factor_note"]
