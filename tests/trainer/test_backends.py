"""Other back ends: torch_compile works with every method; FSDP1, and DeepSpeed without a ZeRO stage, fail at
construction, before training, with a message that names them and says what to use instead (FSDP2 runs:
tests/distributed/test_fsdp.py; DeepSpeed ZeRO 1-3:
tests/distributed/test_deepspeed.py).

FSDP and DeepSpeed cannot be switched on in one CPU process (Trainer refuses `fsdp` outside distributed
training, accelerate ignores the FSDP plugin on CPU, and deepspeed is not installed), so those tests set the
flags Trainer derives from its Accelerator (`is_fsdp_enabled`, `is_deepspeed_enabled`) at the point Trainer
sets them, and construct the trainer as a user would.
"""

import time

import pytest
import torch
from transformers import Trainer

import sam_hf
from sam_hf import SharpnessConfigError
from tests.helpers.tiny import MeanLossModel, args, vector_data, weights

CASES = {
    "sam": ("sam", "rho=0.1"),
    "msam": ("msam", "rho=0.1,micro_batches=4"),
    "sampa": ("sampa", "rho=0.1,lam=0.2"),
    "asyncsam": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5"),
}


def run(tmp_path, optim, optim_args, steps=3, **kw):
    model = MeanLossModel()
    trainer = sam_hf.SharpnessTrainer(model=model, args=args(tmp_path, optim, optim_args, max_steps=steps, **kw),
                                      train_dataset=vector_data())
    trainer.train()
    return weights(model), trainer


@pytest.mark.parametrize("case,backend", [(c, "aot_eager") for c in CASES] + [("sam", "eager")])
def test_torch_compile(tmp_path, case, backend):
    """Dynamo traces the model (the passes run through the compiled module; aot_eager also traces the backward)
    and the steps equal eager mode's. The `inductor` backend is tested below only on request: its first CPU
    compile took ~35 s here."""
    torch._dynamo.reset()
    optim, optim_args = CASES[case]
    compiled, trainer = run(tmp_path, optim, optim_args, torch_compile=True, torch_compile_backend=backend)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was actually compiled
    plain, _ = run(tmp_path, optim, optim_args)
    for k in plain:
        torch.testing.assert_close(compiled[k], plain[k], atol=1e-6, rtol=0)


@pytest.mark.slow  # inductor's first CPU compile takes ~35 s on 2 cores
@pytest.mark.parametrize("case", ["sampa"])  # SAM's compiled passes: the aot_eager cases above
def test_torch_compile_inductor(tmp_path, case):
    torch._dynamo.reset()
    optim, optim_args = CASES[case]
    start = time.perf_counter()
    compiled, _ = run(tmp_path, optim, optim_args, torch_compile=True)
    plain, _ = run(tmp_path, optim, optim_args)
    for k in plain:
        torch.testing.assert_close(compiled[k], plain[k], atol=1e-5, rtol=1e-5)
    print(f"inductor run took {time.perf_counter() - start:.1f} s")


def _force_flag(monkeypatch, flag):
    original = Trainer.create_accelerator_and_postprocess

    def create_accelerator_and_postprocess(self):
        original(self)
        setattr(self, flag, True)

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create_accelerator_and_postprocess)


def _force_fsdp1(monkeypatch):
    """accelerate's FSDP plugin in version 1, as a `--fsdp` run on GPUs has it."""
    from sam_hf.distributed import fsdp2

    monkeypatch.setattr(fsdp2, "fsdp_version", lambda trainer: 1)


@pytest.mark.parametrize("flag,names,alternative", [
    ("fsdp1", ["FSDP1", "FlatParameter"], ["FSDP2", "fsdp_version: 2"]),
    ("is_deepspeed_enabled", ["DeepSpeed", "zero_optimization.stage=0"], ["1, 2 or 3", "torchrun"]),
])
@pytest.mark.parametrize("how", ["SharpnessTrainer", "patched Trainer"])
def test_unsupported_back_end_fails_at_construction(tmp_path, monkeypatch, flag, names, alternative, how):
    """FSDP1 and DeepSpeed without ZeRO are refused before training, saying what to use (FSDP2 runs:
    tests/distributed/test_fsdp.py)."""
    _force_fsdp1(monkeypatch) if flag == "fsdp1" else _force_flag(monkeypatch, flag)
    cls = sam_hf.SharpnessTrainer if how == "SharpnessTrainer" else Trainer
    for optim in sam_hf.METHODS:
        with pytest.raises(SharpnessConfigError) as err:
            cls(model=MeanLossModel(), args=args(tmp_path, optim), train_dataset=vector_data())
        message = str(err.value)
        assert f"optim={optim}" in message
        for word in names + alternative:
            assert word in message, f"{word!r} not in {message!r}"


def test_back_end_flags_do_not_touch_plain_optimizers(tmp_path, monkeypatch):
    """The check is ours only: with adamw_torch a (flagged) trainer constructs as Trainer would."""
    _force_flag(monkeypatch, "is_fsdp_enabled")
    trainer = sam_hf.SharpnessTrainer(model=MeanLossModel(), args=args(tmp_path, "adamw_torch"),
                                      train_dataset=vector_data())
    assert trainer.sharpness_config is None


def test_trainer_sharding_directly(tmp_path, monkeypatch):
    """The same messages from `layouts.trainer_sharding` on a constructed trainer (what the mixin asks before it
    picks a layout)."""
    from sam_hf.distributed.layouts import trainer_sharding

    trainer = sam_hf.SharpnessTrainer(model=MeanLossModel(), args=args(tmp_path, "sampa"), train_dataset=vector_data())
    assert trainer_sharding(trainer, "sampa", roles_asked=False) is None
    _force_fsdp1(monkeypatch)
    with pytest.raises(SharpnessConfigError, match="FSDP1"):
        trainer_sharding(trainer, "sampa", roles_asked=False)
    monkeypatch.undo()
    trainer.is_deepspeed_enabled = True
    assert trainer_sharding(trainer, "sampa", roles_asked=False) == "deepspeed"
    with pytest.raises(SharpnessConfigError, match="DeepSpeed"):
        trainer_sharding(trainer, "sampa", roles_asked=True)
