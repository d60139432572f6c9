"""Interrupting a Trainer run at step N and resuming it from the checkpoint, against never stopping
(tests/trainer/test_resume.py and test_schedule.py)."""

import torch
from transformers import TrainerCallback

import sam_hf
from tests.helpers.tiny import args, weights

N = 3  # 32 samples / 8 = 4 steps per epoch: the checkpoint is mid-epoch and the resumed run crosses an epoch


class StopAt(TrainerCallback):
    """Stop training after step `n` (after Trainer saved its checkpoint), as an interrupted job would."""

    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.n:
            control.should_training_stop = True


def make_trainer(out, optim, optim_args, model, data, callbacks=(), **kw):
    a = args(out, optim, optim_args, max_steps=2 * N, lr_scheduler_type="linear", warmup_steps=1, **kw)
    return sam_hf.SharpnessTrainer(model=model, args=a, train_dataset=data, callbacks=list(callbacks))


def interrupted_and_resumed(tmp_path, optim, optim_args, build, data):
    first = make_trainer(tmp_path / "run", optim, optim_args, build(), data, callbacks=[StopAt(N)],
                         save_strategy="steps", save_steps=N)
    first.train()
    assert first.state.global_step == N
    ckpt = tmp_path / "run" / f"checkpoint-{N}"
    assert ckpt.is_dir()
    model = build(seed=1)  # different initial weights: everything must come from the checkpoint
    second = make_trainer(tmp_path / "run", optim, optim_args, model, data, save_strategy="no")
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.state.global_step == 2 * N
    return weights(model), ckpt, second


def uninterrupted(tmp_path, optim, optim_args, build, data):
    model = build()
    make_trainer(tmp_path / "straight", optim, optim_args, model, data).train()
    return weights(model)


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bitwise equal: {different}"
