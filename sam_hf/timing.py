"""The wall time of every optimizer step, as a Trainer callback (used by `sam-hf bench` and `sam-hf demo`)."""

from __future__ import annotations

import time


def step_timer(synchronize=None):
    """A Trainer callback holding the wall time of every optimizer step (logging and evaluation excluded);
    `synchronize` (e.g. torch.cuda.synchronize) runs at both ends so queued GPU work is counted."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if synchronize:
                synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if synchronize:
                synchronize()
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()
