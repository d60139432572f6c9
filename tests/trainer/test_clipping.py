"""`max_grad_norm` clips the final gradient of every method, as Trainer does; SAMPa's lookahead sees it too.

With plain SGD (no momentum, no weight decay) a step moves x by lr * clip(G), so
while clipping is active every step has ||dx|| = lr * max_grad_norm exactly,
in the direction of the unclipped final gradient.
"""

import pytest
import torch
from transformers import TrainerCallback

import sam_hf
from tests.helpers.tiny import METHOD_CASES, MeanLossModel, args, vector_data

CASES = {**{k: METHOD_CASES[k] for k in ('sam', 'asam', 'msam', 'asyncsam')}, "sampa": ("sampa", "rho=0.1,lam=0.5")}
LR = 1.0  # large steps, so ||dx|| is measured far above fp32 round-off of the weights
CLIP = 1e-2  # well below this model's gradient norms (~0.4-0.9): every step is clipped
STEPS = 3


class Snapshots(TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.seen = [self._flat()]

    def _flat(self):
        return torch.cat([p.detach().flatten().clone() for p in self.model.parameters()])

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(self._flat())


def run(tmp_path, case, max_grad_norm, steps=STEPS):
    optim, optim_args = CASES[case]
    model = MeanLossModel()
    snaps = Snapshots(model)
    trainer = sam_hf.SharpnessTrainer(
        model=model, args=args(tmp_path, optim, optim_args + ",base=sgd", learning_rate=LR,
                               max_grad_norm=max_grad_norm, max_steps=steps, weight_decay=0.0),
        train_dataset=vector_data(), callbacks=[snaps])
    trainer.train()
    return [b - a for a, b in zip(snaps.seen, snaps.seen[1:])], trainer


@pytest.mark.parametrize("case", list(CASES))
def test_every_step_is_clipped_to_max_grad_norm(tmp_path, case):
    deltas, trainer = run(tmp_path, case, CLIP)
    assert len(deltas) == STEPS
    grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    first = 0
    if case == "sampa":  # the first step only computes g_0: x does not move
        assert torch.count_nonzero(deltas[0]) == 0
        first = 1
    for d, gn in zip(deltas[first:], grad_norms[first:]):
        assert gn > 10 * CLIP  # Trainer's logged pre-clip norm: clipping was active
        assert d.norm().item() == pytest.approx(LR * CLIP, rel=1e-4)


@pytest.mark.parametrize("case", [c for c in CASES if c != "sampa"])
def test_clipping_keeps_the_direction(tmp_path, case):
    """The first step (same x_0, same batch) goes the way of the unclipped step, only shorter."""
    clipped, _ = run(tmp_path, case, CLIP, steps=1)
    free, trainer = run(tmp_path, case, 0.0, steps=1)
    a, b = clipped[0], free[0]
    assert b.norm() > 10 * a.norm()  # the unclipped step is much longer
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    assert cos.item() == pytest.approx(1.0, abs=1e-6)


class ForwardPoints(TrainerCallback):
    """Distance from the step's starting weights x_t of every training forward pass in the step."""

    def __init__(self, model):
        self.model, self.start, self.steps = model, None, []
        model.register_forward_pre_hook(self._pre)

    def _flat(self):
        return torch.cat([p.detach().flatten().clone() for p in self.model.parameters()])

    def _pre(self, module, inputs):
        if module.training:
            self.steps[-1].append((self._flat() - self.start).norm().item())

    def on_step_begin(self, args, state, control, **kw):
        self.start = self._flat()
        self.steps.append([])


def sampa_forward_points(tmp_path, max_grad_norm):
    model = MeanLossModel()
    points = ForwardPoints(model)
    sam_hf.SharpnessTrainer(
        model=model, args=args(tmp_path, "sampa", "rho=0.1,lam=0.5,base=sgd", learning_rate=LR,
                               max_grad_norm=max_grad_norm, max_steps=STEPS, weight_decay=0.0),
        train_dataset=vector_data(), callbacks=[points]).train()
    return points.steps


def test_sampa_lookahead_uses_clipped_g(tmp_path):
    """y_{t+1} = ModelUpdate(x_t, g_t) takes g_t clipped to max_grad_norm, as the final gradient is: with
    plain SGD, ||y_{t+1} - x_t|| = lr * max_grad_norm. (The other pass of the step is at distance rho.)"""
    steps = sampa_forward_points(tmp_path, CLIP)
    assert steps[0] == [0.0]  # the first step: g_0 at x_0 only
    for distances in steps[1:]:
        assert sorted(distances) == pytest.approx([LR * CLIP, 0.1], rel=1e-3)
    free = sampa_forward_points(tmp_path, 0.0)
    for distances in free[1:]:  # without max_grad_norm the lookahead moves by lr * ||g_t|| (~0.4-0.9 here)
        assert min(distances) > 10 * LR * CLIP


def test_no_clipping_without_max_grad_norm(tmp_path):
    deltas, _ = run(tmp_path, "sam", 0.0)
    assert all(d.norm().item() > 10 * LR * CLIP for d in deltas)
