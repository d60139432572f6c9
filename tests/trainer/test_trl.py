"""SharpnessMixin composes with TRL's SFTTrainer, both as `class SharpnessSFT(SharpnessMixin, SFTTrainer)`
and through the Trainer patch (`SFTTrainer(args=SFTConfig(optim="sam"))`). Skipped where trl is missing."""

import math

import pytest
import torch

trl = pytest.importorskip("trl")
tokenizers = pytest.importorskip("tokenizers")

from trl import SFTConfig, SFTTrainer  # noqa: E402

import sam_hf  # noqa: E402
from sam_hf import SharpnessMixin  # noqa: E402
from tests.helpers.tiny import weights  # noqa: E402
from tests.helpers.trl_sft import sft_config, text_dataset, tiny_gpt2, tiny_tokenizer  # noqa: E402  (the TRL script's)

STEPS = 3


class SharpnessSFT(SharpnessMixin, SFTTrainer):
    pass


def run(tmp_path, cls, optim, optim_args=None, steps=STEPS):
    model = tiny_gpt2()
    trainer = cls(model=model, args=sft_config(tmp_path, optim, optim_args, steps), train_dataset=text_dataset(),
                  processing_class=tiny_tokenizer())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return weights(model), logged, trainer


@pytest.mark.parametrize("optim,optim_args", [("sam", "rho=0.1"), ("sampa", "rho=0.1,lam=0.2")])
def test_sharpness_sft_trains(tmp_path, optim, optim_args):
    start = weights(tiny_gpt2())
    after, logged, trainer = run(tmp_path, SharpnessSFT, optim, optim_args)
    assert isinstance(trainer.optimizer.optimizer, sam_hf.SharpnessOptimizer)
    assert trainer.optimizer.optimizer.method.name == optim
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(start[k], after[k]) for k in start)
    assert len(logged) == STEPS
    for h in logged:  # TRL's own metrics and ours, in the same log
        assert math.isfinite(h["loss"]) and "sam/perturbed_loss" in h
        assert "mean_token_accuracy" in h and "num_tokens" in h


def test_first_loss_is_sfts_clean_loss(tmp_path):
    """Same weights and data at step 1: SAM reports SFTTrainer's own loss (the clean pass)."""
    _, plain, _ = run(tmp_path, SFTTrainer, "adamw_torch", steps=1)
    _, ours, _ = run(tmp_path, SharpnessSFT, "sam", "rho=0.1", steps=1)
    assert ours[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)


def test_plain_optimizer_is_sfttrainer(tmp_path):
    a, la, _ = run(tmp_path, SFTTrainer, "adamw_torch")
    b, lb, _ = run(tmp_path, SharpnessSFT, "adamw_torch")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in la] == [h["loss"] for h in lb]


def test_patch_turns_sfttrainer_into_a_sharpness_trainer(tmp_path):
    """A script that builds a plain SFTTrainer with SFTConfig(optim="sam") gets the method (what launch relies on)."""
    after, logged, trainer = run(tmp_path, SFTTrainer, "sam", "rho=0.1", steps=2)
    assert isinstance(trainer, SharpnessMixin) and isinstance(trainer, SFTTrainer)
    assert type(trainer).__name__ == "SharpnessSFTTrainer"
    assert isinstance(trainer.args, SFTConfig)
    assert all("sam/perturbed_loss" in h for h in logged)


def test_num_tokens_counts_each_batch_once(tmp_path):
    """SFT's `num_tokens` log is the number of training tokens seen: the same with SAM as with AdamW."""
    _, plain, _ = run(tmp_path, SFTTrainer, "adamw_torch")
    _, ours, _ = run(tmp_path, SharpnessSFT, "sam", "rho=0.1")
    assert [h["num_tokens"] for h in ours] == [h["num_tokens"] for h in plain]
