"""BatchNorm: running statistics change once per step, from the unperturbed pass (`bn_stats=clean`, the
default); `bn_stats=all` lets the perturbed pass update them too."""

import copy

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

import sam_hf
from tests.helpers.tiny import MeanLossModel, args, image_data, vector_data

STEPS = 3



class ConvBN(nn.Module):
    """A tiny convolutional classifier with BatchNorm2d, for tiny.image_data (1 x 8 x 8 images, 3 classes)."""

    def __init__(self, seed: int = 0, classes: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, classes)

    def forward(self, pixel_values, labels=None):
        h = torch.relu(self.bn(self.conv(pixel_values))).mean(dim=(2, 3))
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


MODELS = {
    "mlp": (lambda: MeanLossModel(batchnorm=True), vector_data),
    "conv": (ConvBN, image_data),
}


def bn_buffers(model):
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def train(tmp_path, kind, optim, optim_args=None, steps=1, callbacks=(), cls=sam_hf.SharpnessTrainer):
    build, data = MODELS[kind]
    model = build()
    cls(model=model, args=args(tmp_path, optim, optim_args, max_steps=steps), train_dataset=data(),
        callbacks=list(callbacks)).train()
    return model


@pytest.mark.parametrize("kind", list(MODELS))
def test_first_step_stats_equal_plain_training(tmp_path, kind):
    """Step 1 starts from the same weights for AdamW and SAM: its one clean pass gives bitwise the same stats."""
    plain = bn_buffers(train(tmp_path, kind, "adamw_torch", cls=Trainer))
    for optim, optim_args in [("sam", "rho=0.1"), ("sam", "rho=0.5,adaptive=true")]:
        ours = bn_buffers(train(tmp_path, kind, optim, optim_args))
        assert ours.keys() == plain.keys() and any("running_mean" in k for k in ours)
        for k in plain:
            assert torch.equal(ours[k], plain[k]), f"{optim} {optim_args}: {k}"


@pytest.mark.parametrize("kind", list(MODELS))
def test_bn_stats_all_updates_twice(tmp_path, kind):
    plain = bn_buffers(train(tmp_path, kind, "adamw_torch", cls=Trainer))
    ours = bn_buffers(train(tmp_path, kind, "sam", "rho=0.1,bn_stats=all"))
    tracked = [k for k in ours if k.endswith("num_batches_tracked")]
    assert tracked and all(int(ours[k]) == 2 for k in tracked)  # the clean and the perturbed pass
    assert any(not torch.equal(ours[k], plain[k]) for k in ours if "running_mean" in k)


class OneCleanForward(TrainerCallback):
    """At each step end: the model's BN buffers equal those of the step's starting model after ONE train-mode
    forward on the step's batch (the first pass the step made), i.e. momentum applied once, at x_t."""

    def __init__(self, model):
        self.model = model
        self.mismatches, self.checked = [], 0
        self.start = self.batch = None
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, a, kw):
        if module.training and self.batch is None:
            self.batch = {k: v.detach().clone() for k, v in kw.items()}

    def on_step_begin(self, args, state, control, **kw):
        self.start, self.batch = copy.deepcopy(self.model), None

    def on_step_end(self, args, state, control, **kw):
        ref = self.start.train()
        with torch.no_grad():
            ref(**self.batch)
        got, want = bn_buffers(self.model), bn_buffers(ref)
        self.mismatches += [(state.global_step, k) for k in want if not torch.equal(got[k], want[k])]
        self.checked += 1


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("optim_args", ["rho=0.1", "rho=0.5,adaptive=true"])
def test_sam_every_step_updates_stats_once_from_the_clean_pass(tmp_path, kind, optim_args):
    build, data = MODELS[kind]
    model = build()
    check = OneCleanForward(model)
    sam_hf.SharpnessTrainer(model=model, args=args(tmp_path, "sam", optim_args, max_steps=STEPS),
                            train_dataset=data(), callbacks=[check]).train()
    assert check.checked == STEPS
    assert not check.mismatches


@pytest.mark.parametrize("optim,optim_args,expected", [
    ("sam", "rho=0.1", STEPS),
    ("sam", "rho=0.1,bn_stats=all", 2 * STEPS),
    # one clean pass per micro-batch: each sample is seen once unperturbed, as with gradient accumulation
    ("msam", "rho=0.1,micro_batches=4", 4 * STEPS),
    # x_0 on the first step, then the lookahead pass at y_{t+1} (the perturbed pass on B_t keeps the stats)
    ("sampa", "rho=0.1", STEPS),
    # A_0 = B_0, then the ascent pass on A_t each step
    ("asyncsam", "rho=0.1,ascent_batch_ratio=1.0", STEPS),
    # step 1 runs B_0 and A_0 separately
    ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", STEPS + 1),
])
def test_running_stat_updates_per_method(tmp_path, optim, optim_args, expected):
    """Only clean passes count (num_batches_tracked goes up once per BatchNorm update)."""
    model = train(tmp_path, "mlp", optim, optim_args, steps=STEPS)
    assert int(model.net[1].num_batches_tracked) == expected
