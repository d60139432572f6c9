"""SharpnessOptimizer: the base optimizer, plus the method's state in its checkpoint.

Trainer (and accelerate's AcceleratedOptimizer, the GradScaler, the LR
scheduler) see an ordinary optimizer: parameter groups, state and `step()` are
the base optimizer's. Two things are added: `step()` is skipped when the method
says so (SAMPa's first step; the learning-rate schedule then waits as well, see
trainer.SkippedUpdateCallback), and `state_dict()` carries the method's state
(SAMPa's g_t and held batch, Asynchronous SAM's a_{t-1}) under one extra key,
so Trainer's own `optimizer.pt` checkpoints and resumes it.
"""

from __future__ import annotations

import time

import torch

from .methods import SharpnessMethod

STATE_KEY = "sam_hf"


class SharpnessOptimizer(torch.optim.Optimizer):
    # Like accelerate's AcceleratedOptimizer, a wrapper that does not call Optimizer.__init__:
    # everything an Optimizer holds is the base optimizer's.
    def __init__(self, base: torch.optim.Optimizer, method: SharpnessMethod):
        self.base = base
        self.method = method
        self.skip_next_step = False
        self.skipped_last_step = False  # read by trainer.SkippedUpdateCallback: the LR schedule waits too

    @property
    def param_groups(self):
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.base.param_groups = value

    @property
    def state(self):
        return self.base.state

    @state.setter
    def state(self, value):
        self.base.state = value

    @property
    def defaults(self):
        return self.base.defaults

    @defaults.setter
    def defaults(self, value):
        self.base.defaults = value

    def add_param_group(self, param_group):
        self.base.add_param_group(param_group)

    def step(self, closure=None):
        self.skipped_last_step = self.skip_next_step
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        if not getattr(self.method, "times_optimizer_step", False):
            return self.base.step(closure)
        # Asynchronous SAM's ascent_batch_ratio=auto: each rank's step costs time outside the passes too
        self.method.synchronize()
        start = time.perf_counter()
        out = self.base.step(closure)
        self.method.synchronize()
        self.method.last_step_seconds = time.perf_counter() - start
        return out

    def zero_grad(self, set_to_none: bool = True):
        self.base.zero_grad(set_to_none=set_to_none)

    def train(self):
        if hasattr(self.base, "train"):
            self.base.train()

    def eval(self):
        if hasattr(self.base, "eval"):
            self.base.eval()

    def state_dict(self):
        state = self.base.state_dict()
        state[STATE_KEY] = self.method.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        method_state = state_dict.pop(STATE_KEY, None)
        self.base.load_state_dict(state_dict)
        if method_state is not None:
            self.method.load_state_dict(method_state)

    def __repr__(self):
        return f"SharpnessOptimizer({self.method.name}, base={self.base!r})"
