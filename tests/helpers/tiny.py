"""Tiny models and data built from configs, so tests need nothing from the Hub."""

from __future__ import annotations

import torch
from datasets import Dataset
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments, ViTConfig, ViTForImageClassification

VOCAB = 50

# One configuration per method, shared by the test files that run "every method".
METHOD_CASES = {
    "sam": ("sam", "rho=0.1"),
    "asam": ("sam", "rho=0.5,adaptive=true"),
    "msam": ("msam", "rho=0.1,micro_batches=4"),
    "sampa": ("sampa", "rho=0.1,lam=0.2"),
    "asyncsam": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5"),
    "asyncsam_r1": ("asyncsam", "rho=0.1,ascent_batch_ratio=1.0"),
}


def tiny_bert(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def tiny_vit(seed: int = 0, num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=24, num_labels=num_labels,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


def text_data(n: int = 32, seq: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


def image_data(n: int = 24, seed: int = 0, num_labels: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"pixel_values": torch.randn(n, 1, 8, 8, generator=g).tolist(),
                              "labels": torch.randint(0, num_labels, (n,), generator=g).tolist()})


class MeanLossModel(nn.Module):
    """A small MLP classifier: forward(x, labels) -> {"loss": mean cross-entropy, "logits"}. No **kwargs,
    so Trainer normalises its loss by the accumulation steps as for any plain nn.Module."""

    def __init__(self, dim: int = 6, hidden: int = 8, classes: int = 3, seed: int = 0, batchnorm: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        layers = [nn.Linear(dim, hidden)] + ([nn.BatchNorm1d(hidden)] if batchnorm else []) + [nn.Tanh(),
                                                                                           nn.Linear(hidden, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class KwargsMeanModel(MeanLossModel):
    """forward takes **kwargs, so Trainer passes it num_items_in_batch and does not divide its loss by the
    accumulation steps, yet the loss is a plain mean that ignores the count: transformers' rule for models such
    as BertForSequenceClassification."""

    def forward(self, x, labels=None, **kwargs):
        return super().forward(x, labels)


class CountLossModel(MeanLossModel):
    """Sums the per-sample losses and divides by num_items_in_batch (Trainer's count over the accumulation cycle
    and the processes), as transformers' causal LMs do with tokens."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            losses = nn.functional.cross_entropy(logits, labels, reduction="none")
            out["loss"] = losses.mean() if num_items_in_batch is None else losses.sum() / num_items_in_batch
        return out


MODELS = {"mean": MeanLossModel, "kw": KwargsMeanModel, "count": CountLossModel}


def vector_data(n: int = 32, dim: int = 6, classes: int = 3, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"x": torch.randn(n, dim, generator=g).tolist(),
                              "labels": torch.randint(0, classes, (n,), generator=g).tolist()})


def args(out_dir, optim: str = "adamw_torch", optim_args: str | None = None, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out_dir), optim=optim, optim_args=optim_args, per_device_train_batch_size=8,
                learning_rate=1e-2, lr_scheduler_type="constant", max_steps=4, logging_steps=1, report_to=[],
                save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")
