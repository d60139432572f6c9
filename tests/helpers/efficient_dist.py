"""The efficient variants (LookSAM, AE-SAM, ESAM, GSAM, SAF, MESA) on N processes, for
tests/distributed/test_efficient_distributed.py.

`train(optim, optim_args, batch)` trains MeanLossModel with SharpnessTrainer on 16 examples (with an `idx` column;
2 global batches of 8 per epoch, shuffled anew every epoch unless `sequential`) for STEPS steps and returns the
weights; `plain(...)` does the same with the plain-loop API, each rank reading its shard of every global batch (the
shards swap ranks every epoch, as a shuffling sampler would move examples between ranks). Under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.efficient_dist OUT NAME:KIND:OPTIM:OPTIM_ARGS ...

trains every case (KIND trainer, trainer_sequential or plain; the per-device batch is 8 / world size) and rank 0 saves
OUT/NAME.pt.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist

import sam_hf
from tests.helpers.processes import save_cases_on_gloo
from tests.helpers.tiny import MeanLossModel, args as make_args, vector_data

N, GLOBAL_BATCH, STEPS = 16, 8, 6


def dataset():
    return vector_data(n=N).add_column("idx", list(range(N)))


def train(optim: str, optim_args: str, batch: int = GLOBAL_BATCH, sequential: bool = False) -> dict:
    model = MeanLossModel()
    distributed = "RANK" in os.environ
    order = dict(train_sampling_strategy="sequential") if sequential else {}
    with tempfile.TemporaryDirectory() as out:
        a = make_args(out, optim, optim_args or None, max_steps=STEPS, per_device_train_batch_size=batch,
                      max_grad_norm=0.0, ddp_backend="gloo" if distributed else None, **order)
        sam_hf.SharpnessTrainer(model=model, args=a, train_dataset=dataset()).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plain(optim: str, optim_args: str) -> dict:
    model = MeanLossModel(seed=dist.get_rank() if dist.is_initialized() else 0)  # rank 0's weights are broadcast
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt = sam_hf.SharpnessOptimizer(base, optim, optim_args, model=model, total_steps=STEPS,
                                    steps_per_epoch=N // GLOBAL_BATCH)
    shards, index = opt.data_shard()
    ids = opt.method.example_id_column(opt.method.config)  # SAF's
    rows = vector_data(n=N)
    size = GLOBAL_BATCH // shards
    for t in range(STEPS):
        shard = (index + t // (N // GLOBAL_BATCH)) % shards  # another shard every epoch
        start = (t * GLOBAL_BATCH) % N + shard * size
        part = rows[start:start + size]
        batch = {"x": torch.tensor(part["x"]), "labels": torch.tensor(part["labels"])}
        if ids:
            batch[ids] = torch.arange(start, start + size)
        opt.step(sam_hf.BatchClosure(lambda b: model(**b), batch))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    out, cases = sys.argv[1], sys.argv[2:]

    def one(case):
        _, kind, optim, optim_args = case.split(":", 3)
        if kind == "plain":
            return plain(optim, optim_args)
        return train(optim, optim_args, GLOBAL_BATCH // dist.get_world_size(), kind == "trainer_sequential")

    save_cases_on_gloo(out, {case.split(":", 1)[0]: (lambda case=case: one(case)) for case in cases})


if __name__ == "__main__":
    main()
