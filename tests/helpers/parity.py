"""The reference-parity tests' models and data (tests/trainer/test_reference_parity.py, test_schedule.py and the
conformance cases share them): TinyNet and its rows, a tiny BERT classifier and its rows, a list data set, and
`stack`, which turns rows into the batch Trainer's default collator builds."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification


class TinyNet(nn.Module):
    """Linear -> LayerNorm -> tanh -> Linear, mean cross-entropy, optional per-sample loss weights.

    Has biases and a LayerNorm (so Trainer's decay / no-decay groups differ) and a frozen parameter
    (requires_grad=False: never perturbed, never stepped). `weight` lets a test force a zero gradient.
    """

    def __init__(self, dim=5, hidden=6, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, classes)
        self.frozen = nn.Parameter(0.1 * torch.randn(hidden), requires_grad=False)
        with torch.no_grad():  # LayerNorm away from its (1, 0) init, so decay on it would show
            self.norm.weight.add_(0.2 * torch.randn(hidden))
            self.norm.bias.add_(0.2 * torch.randn(hidden))

    def forward(self, x, labels=None, weight=None):
        logits = self.fc2(torch.tanh(self.norm(self.fc1(x)) + self.frozen))
        out = {"logits": logits}
        if labels is not None:
            per_sample = nn.functional.cross_entropy(logits, labels, reduction="none")
            if weight is not None:
                per_sample = per_sample * weight
            out["loss"] = per_sample.mean()
        return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def vector_rows(n, dim=5, classes=3, seed=1, zero_weight=()):
    """Samples for TinyNet; indices in `zero_weight` get loss weight 0 (their gradient is exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [{"x": x[i], "labels": y[i], "weight": torch.tensor(0.0 if i in zero_weight else 1.0)} for i in range(n)]


# BERT's default init (0.02) leaves this tiny model's attention almost uniform: the query/key gradients are
# ~1e-8, at AdamW's eps, where the step amplifies float round-off without bound. 0.2 gives well-conditioned ones.
BERT_INIT = 0.2


def tiny_bert(seed=0, init=BERT_INIT):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=init)
    model = BertForSequenceClassification(cfg).eval()  # Trainer calls .train(); dropout is 0 anyway
    # The key bias's gradient is identically zero (softmax ignores a shift shared by all keys): what autograd
    # returns is round-off, which AdamW turns into steps of order lr. Freeze it, which also checks that frozen
    # BERT parameters are neither perturbed nor stepped.
    for layer in model.bert.encoder.layer:
        layer.attention.self.key.bias.requires_grad_(False)
    return model


def bert_rows(n, seq=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, -2:] = 0  # some padding
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
