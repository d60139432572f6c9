"""Trainer glue: the mixin, Trainer-exact gradient passes, callbacks, and the `--optim` name registration."""

from .mixin import SharpnessMixin, SharpnessTrainer

__all__ = ["SharpnessMixin", "SharpnessTrainer"]
