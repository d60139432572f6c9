"""Hessian sharpness on several processes (run under torchrun, gloo): each rank holds a shard of the sample.

Writes OUT_DIR/rank{r}.json with, for rank r:
  "measure":  measure_sharpness of a float64 tanh MLP on this rank's every world_size-th of 13 examples, in
              uneven batches (the sample's 1-process figures come from the same `sample()`);
  "logged":   the sharpness/* entries a plain AdamW Trainer (DDP) logged with a SharpnessCallback.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

import sam_hf
from tests.helpers.tiny import MeanLossModel, args as make_args, vector_data

CALLBACK = dict(every=2, samples=13, top_k=2, trace_samples=10)


def mlp64() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def sample(rank: int = 0, world: int = 1) -> list:
    """13 examples; rank r takes every world-th, in batches of 1, 2, 3, ... (uneven on purpose)."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(13, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (13,), generator=g)
    x, y = x[rank::world], y[rank::world]
    batches, start, size = [], 0, 1
    while start < len(y):
        batches.append({"x": x[start:start + size], "labels": y[start:start + size]})
        start, size = start + size, size + 1
    return batches


def loss_fn(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["labels"])


def measure(rank: int = 0, world: int = 1) -> dict:
    return sam_hf.measure_sharpness(mlp64(), sample(rank, world), loss_fn=loss_fn, top_k=3, trace_samples=50)


def train_with_callback(out_dir: str, batch: int, distributed: bool):
    """A plain Trainer (AdamW; DDP on several processes) with a SharpnessCallback: its sharpness log entries."""
    from transformers import Trainer

    targs = make_args(out_dir, "adamw_torch", max_steps=4, per_device_train_batch_size=batch,
                      ddp_backend="gloo" if distributed else None)
    trainer = Trainer(model=MeanLossModel(), args=targs, train_dataset=vector_data(n=64),
                      callbacks=[sam_hf.SharpnessCallback(**CALLBACK)])
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "sharpness/lambda_max" in h]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out_dir", required=True)
    out_dir = p.parse_args().out_dir
    trainer, logged = train_with_callback(os.path.join(out_dir, "run"), batch=4, distributed=True)
    rank, world = dist.get_rank(), dist.get_world_size()  # Trainer's arguments set the process group up
    result = {"measure": measure(rank, world), "logged": logged, "wrapper": type(trainer.model_wrapped).__name__}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
