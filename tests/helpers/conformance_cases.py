"""Models, data, factors and the pairwise case generator for tests/trainer/test_conformance.py.

Kept apart from the test so the matrix can be listed and inspected without running it:
`python -m tests.helpers.conformance_cases` prints the cases.
"""

from __future__ import annotations

from itertools import combinations
from types import SimpleNamespace

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tests.helpers import reference as R
# TinyNet: Linear -> LayerNorm -> tanh -> Linear, the mean cross-entropy; no **kwargs in forward, so Trainer
# neither counts items nor passes a count, and divides the loss by the accumulation steps
from tests.helpers.parity import TinyNet, bert_rows, stack

STEPS = 4  # Trainer steps per case
BS = 5  # per-device micro-batch: mSAM's m = 4 and m = 2 cut it unevenly (acc 1: 2,1,1,1 and 3,2; acc 3: 4,4,4,3
#         and 8,7 over micro-batches of 5, crossing their boundaries); Asynchronous SAM's r = 0.5 takes 8 of 15
#         samples (all of micro-batch 1 and 3 of micro-batch 2), r = 0.3 one whole micro-batch (acc 3) or 2 of 5
#         (acc 1), r = 1 the whole cycle
CLIP = 0.3  # max_grad_norm when clipping is on: the test models' gradient norms are 0.45..5 (the accumulated
#             TinyNet gradient is about 0.48, which max_grad_norm=1.0 would leave unclipped); each case with
#             clipping checks that Trainer logged a gradient norm above it
SMOOTHING = 0.1
WARMUP = 2  # lr_scheduler_type="linear", warmup_steps=2, over STEPS: factors 0, 0.5, 1, 0.5

# --------------------------------------------------------------------------- factors

RHO = 0.5  # SAM's radius in every case (ASAM: ASAM_RHO); large, so each method moves the weights well away from its
#           base optimizer in 4 steps (checked per case: test_conformance.POWER)
ASAM_RHO = 2.0  # ASAM perturbs by about rho x |w| (T = |w| + eta): its radius is typically 10x SAM's

# method id -> (optim name, optim_args of the method, Reference kwargs, step kwargs)
METHODS = {
    "sam": ("sam", {"rho": RHO}, {"rho": RHO}, {}),
    "asam": ("sam", {"rho": ASAM_RHO, "adaptive": "true", "eta": 0.05}, {"rho": ASAM_RHO, "adaptive": True, "eta": 0.05},
             {}),
    "msam-m4": ("msam", {"rho": RHO, "micro_batches": 4}, {"rho": RHO}, {"m": 4}),
    "msam-m2": ("msam", {"rho": RHO, "micro_batches": 2}, {"rho": RHO}, {"m": 2}),
    "sampa-lam0.5": ("sampa", {"rho": RHO, "lam": 0.5}, {"rho": RHO}, {"lam": 0.5}),
    "sampa-lam0": ("sampa", {"rho": RHO, "lam": 0.0}, {"rho": RHO}, {"lam": 0.0}),
    "asyncsam-r0.3": ("asyncsam", {"rho": RHO, "ascent_batch_ratio": 0.3}, {"rho": RHO}, {"ratio": 0.3}),
    "asyncsam-r0.5": ("asyncsam", {"rho": RHO, "ascent_batch_ratio": 0.5}, {"rho": RHO}, {"ratio": 0.5}),
    "asyncsam-r1": ("asyncsam", {"rho": RHO, "ascent_batch_ratio": 1.0}, {"rho": RHO}, {"ratio": 1.0}),
}

# base id -> (optim_args pieces, reference.Base)
# AdamW's eps is 1e-3 (TrainingArguments.adam_epsilon), not 1e-8: AdamW normalises each entry's step, so an entry whose
# gradient is a near-cancelling sum (GPT-2's MLP has one at 5e-5 where its tensor's typical entry is 7e-3) gets a
# step decided by round-off: two correct implementations that sum in different orders then differ by 1.5e-4 after
# 4 steps. With eps = 1e-3 a step moves by at most lr/eps = 20 times a gradient difference, so the comparison
# measures the rules, not the conditioning. The lookaheads read eps from the optimizer, so this also checks it flows.
ADAM_EPS = 1e-3
BASES = {
    "adamw": ("base=adamw_torch", R.Base("adamw", lr=0.02, weight_decay=0.1, eps=ADAM_EPS)),
    "adamw_fused": ("base=adamw_torch_fused", R.Base("adamw", lr=0.02, weight_decay=0.1, eps=ADAM_EPS, fused=True)),
    "sgd_nesterov": ("base=sgd,momentum=0.9,nesterov=true",
                     R.Base("sgd", lr=0.1, weight_decay=0.05, momentum=0.9, nesterov=True)),
}

LOSSES = ["mean", "loss_func", "causal_lm", "gpt2_lm", "label_smoothing", "kwargs_mean"]

# Sampled pairwise.
FACTORS = {
    "method": list(METHODS),
    "loss": LOSSES,
    "base": list(BASES),
    "accumulation": [1, 3],
    "schedule": ["constant", "warmup_linear"],
    "clip": ["noclip", "clip"],
}
# Crossed with every pairwise row: each row runs in fp32 (the rules held to 1e-5) and under bf16 autocast (the
# mixed-precision path, at a tolerance set by bf16's own round-off; see tests/trainer/test_conformance.py).
PRECISIONS = ["fp32", "bf16"]


def pairs_of(row: dict) -> set:
    names = list(row)
    return {(a, row[a], b, row[b]) for a, b in combinations(names, 2)}


def all_pairs(factors: dict) -> set:
    return {(a, va, b, vb) for a, b in combinations(list(factors), 2) for va in factors[a] for vb in factors[b]}


def pairwise(factors: dict) -> list[dict]:
    """A small set of rows covering every pair of values of every two factors (deterministic greedy, AETG-like):
    while pairs are uncovered, start a row from the first uncovered pair (in factor and value order), then give
    each remaining factor, in order, the value that covers the most uncovered pairs with the values already in the
    row (ties: the value used least so far, then the first)."""
    names = list(factors)
    uncovered = all_pairs(factors)
    used = {(f, v): 0 for f in names for v in factors[f]}

    def order(pair):
        a, va, b, vb = pair
        return names.index(a), factors[a].index(va), names.index(b), factors[b].index(vb)

    rows = []
    while uncovered:
        a, va, b, vb = min(uncovered, key=order)
        row = {a: va, b: vb}
        for f in names:
            if f in row:
                continue

            def gain(v, f=f):
                return sum(((g, row[g], f, v) if names.index(g) < names.index(f) else (f, v, g, row[g])) in uncovered
                           for g in row)

            row[f] = max(factors[f], key=lambda v: (gain(v), -used[(f, v)], -factors[f].index(v)))
        row = {f: row[f] for f in names}
        for f, v in row.items():
            used[(f, v)] += 1
        rows.append(row)
        uncovered -= pairs_of(row)
    return rows


def cases() -> list[dict]:
    """The matrix: every pairwise row, in each precision."""
    return [dict(row, precision=p) for row in pairwise(FACTORS) for p in PRECISIONS]


def case_id(row: dict) -> str:
    return "-".join(str(v) if f != "accumulation" else f"acc{v}" for f, v in row.items())


# --------------------------------------------------------------------------- models and data


def tiny_net_with_config(seed=0):
    """TinyNet with a `config` (Trainer reads `model.config.problem_type` when label smoothing is on)."""
    model = TinyNet(seed=seed)
    model.config = SimpleNamespace(problem_type=None)
    return model


def ce_sum_over_count(outputs, labels, num_items_in_batch=None):
    """A user `compute_loss_func`: the sum of per-sample cross-entropies over Trainer's count for the cycle."""
    logits = outputs["logits"]
    return nn.functional.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=-100) / num_items_in_batch


def vector_rows(n, dim=5, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


LM_VOCAB, LM_LEN = 40, 8


def tiny_gpt2(seed=0):
    """A one-layer GPT-2 causal LM; initializer 0.2 (not 0.02) keeps its attention gradients well above AdamW's eps,
    where float round-off would otherwise decide the sign of a step. c_attn's bias is frozen: its key third gets an
    identically zero gradient (softmax ignores a shift shared by all keys), which AdamW would turn into steps of
    order lr in the direction of round-off."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=LM_VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, bos_token_id=1, eos_token_id=1,
                     pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    for block in model.transformer.h:
        block.attn.c_attn.bias.requires_grad_(False)
    return model


def tiny_llama(seed=0):
    """A one-layer Llama causal LM (no biases, RMSNorm): transformers counts its shifted labels. Initializer 0.2 as
    for GPT-2."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=LM_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def lm_rows(n, seed=3):
    """Uneven lengths 3..8, right padding (token 0, attention mask 0, label -100), and every third row's first two
    labels masked (-100, a prompt): the shifted-label count differs from row to row and micro-batch to micro-batch."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, LM_LEN + 1, (1,), generator=g))
        ids = torch.zeros(LM_LEN, dtype=torch.long)
        ids[:length] = torch.randint(2, LM_VOCAB, (length,), generator=g)
        mask = (torch.arange(LM_LEN) < length).long()
        labels = ids.masked_fill(mask == 0, -100)
        if i % 3 == 0:
            labels[:2] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def tiny_bert(seed=0):
    """A one-layer BERT classifier (forward takes **kwargs and ignores `num_items_in_batch`). Initializer 0.2 and the
    frozen key bias as in tests/helpers/parity.py (well-conditioned attention gradients, no zero-gradient
    parameter that AdamW would step by round-off)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    model = BertForSequenceClassification(cfg)
    for layer in model.bert.encoder.layer:
        layer.attention.self.key.bias.requires_grad_(False)
    return model


def loss_setup(loss: str):
    """(model factory, rows(n), reference.LossKind, extra Trainer kwargs, extra TrainingArguments kwargs)."""
    if loss == "mean":
        return TinyNet, vector_rows, R.ModelMean(), {}, {}
    if loss == "loss_func":
        return TinyNet, vector_rows, R.CountNormalised(), {"compute_loss_func": ce_sum_over_count}, {}
    if loss == "causal_lm":
        return tiny_llama, lm_rows, R.TokenNormalised(count_shifted=True), {}, {}
    if loss == "gpt2_lm":
        return tiny_gpt2, lm_rows, R.TokenNormalised(count_shifted=False), {}, {}
    if loss == "label_smoothing":
        return (tiny_net_with_config, vector_rows, R.LabelSmoothed(SMOOTHING), {},
                {"label_smoothing_factor": SMOOTHING})
    if loss == "kwargs_mean":
        return tiny_bert, bert_rows, R.ModelMean(divide_by_steps=False), {}, {}
    raise ValueError(loss)


def cycles(rows, accumulation):
    """The cycles Trainer reads with sequential sampling: step t, micro-batch j = rows [(t a + j) BS, ... + BS)."""
    return [[stack(rows[(t * accumulation + j) * BS:(t * accumulation + j + 1) * BS]) for j in range(accumulation)]
            for t in range(STEPS)]


if __name__ == "__main__":
    rows = cases()
    for r in rows:
        print(case_id(r))
    print(len(pairwise(FACTORS)), "pairwise rows covering", len(all_pairs(FACTORS)), "pairs;", len(rows), "cases")
