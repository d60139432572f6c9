#!/usr/bin/env python
"""A TRL SFT script that never imports sam_hf: a tiny GPT-2 (from a config) on generated sentences.

Tests run it through `-m sam_hf.launch` under torchrun and accelerate launch, and call `train` in one process:

    torchrun --nproc_per_node 2 -m sam_hf.launch trl_sft.py --out_dir OUT --cases NAME:OPTIM:OPTIM_ARGS:BATCH:GA ...

Each case trains from the same initial weights on the same data; rank 0 saves OUT/NAME.pt (the weights) and
OUT/NAME.log (the log history, TRL's own metrics included).
"""

import argparse
import os
import random

import torch
import tokenizers
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

WORDS = "the a cat dog bird sat ran flew on under over mat rug tree and quickly slowly".split()


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


def sft_config(out, optim, optim_args=None, steps=3, batch=8, ga=1, **kw):
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    return SFTConfig(str(out), optim=optim, optim_args=optim_args or None, max_steps=steps,
                     per_device_train_batch_size=batch, gradient_accumulation_steps=ga, learning_rate=1e-2,
                     lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                     logging_steps=1, max_length=16, disable_tqdm=True, seed=0,
                     ddp_backend="gloo" if distributed else None, **kw)


def train(out, optim, optim_args=None, steps=3, batch=8, ga=1, cls=SFTTrainer, **kw):
    model = tiny_gpt2()
    trainer = cls(model=model, args=sft_config(out, optim, optim_args, steps, batch, ga, **kw),
                  train_dataset=text_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    return trainer, {k: v.detach().clone() for k, v in model.state_dict().items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out_dir", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cases", nargs="+", required=True, help="NAME:OPTIM:OPTIM_ARGS:BATCH:GA")
    opts = p.parse_args()
    for case in opts.cases:
        name, optim, optim_args, batch, ga = case.split(":")
        trainer, state = train(os.path.join(opts.out_dir, name), optim, optim_args, opts.steps, int(batch), int(ga))
        if trainer.args.process_index == 0:
            torch.save(state, os.path.join(opts.out_dir, f"{name}.pt"))
            torch.save(trainer.state.log_history, os.path.join(opts.out_dir, f"{name}.log"))


if __name__ == "__main__":
    main()
