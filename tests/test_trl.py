"""SharpnessMixin composes with TRL's SFTTrainer, both as `class SharpnessSFT(SharpnessMixin, SFTTrainer)`
and through the Trainer patch (`SFTTrainer(args=SFTConfig(optim="sam"))`). Skipped where trl is missing."""

import math
import random

import pytest
import torch

trl = pytest.importorskip("trl")
tokenizers = pytest.importorskip("tokenizers")

from datasets import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import sam_hf  # noqa: E402
from sam_hf import SharpnessMixin  # noqa: E402
from tiny import weights  # noqa: E402

WORDS = "the a cat dog bird sat ran flew on under over mat rug tree and quickly slowly".split()
STEPS = 3


class SharpnessSFT(SharpnessMixin, SFTTrainer):
    pass


def tiny_tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=3 + len(WORDS), n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                     eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def text_dataset(n=32, seed=0):
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]
    return Dataset.from_dict({"text": texts})


def sft_config(out, optim, optim_args=None, steps=STEPS):
    return SFTConfig(str(out), optim=optim, optim_args=optim_args, max_steps=steps, per_device_train_batch_size=8,
                     learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                     use_cpu=True, bf16=False, logging_steps=1, max_length=16, disable_tqdm=True, seed=0)


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
