"""The plain-PyTorch API in a loop: `SharpnessOptimizer(base, optim, optim_args).step(closure)`.

`train(optim, optim_args)` trains MeanLossModel on the global batches of `vector_data`, each rank reading its
shard of every global batch (`SharpnessOptimizer.data_shard()`: data parallel splits it, role mode gives ranks
(0, i) and (1, i) the same shard), and returns the weights. Under torchrun it trains the named cases and rank 0
saves each one's weights as OUT/NAME.pt:

    python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.plain_loop OUT NAME ...   # from the root
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

import sam_hf
from tests.helpers.processes import save_cases_on_gloo
from tests.helpers.tiny import MeanLossModel, vector_data

GLOBAL_BATCH, STEPS = 8, 4
CASES = {  # name: (optim, optim_args); the layout 2 processes get
    "sam": ("sam", "rho=0.1"),  # data parallel
    "msam": ("msam", "rho=0.1,micro_batches=4"),  # data parallel, 2 micro-batches per rank
    "sampa": ("sampa", "rho=0.1,lam=0.3"),  # role mode
    "sampa_off": ("sampa", "rho=0.1,lam=0.3,parallel=off"),  # data parallel
    "asyncsam": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5"),  # role mode
}


def global_batch(step: int) -> dict:
    rows = vector_data(n=GLOBAL_BATCH * STEPS)[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
    return {"x": torch.tensor(rows["x"]), "labels": torch.tensor(rows["labels"])}


def train(optim: str, optim_args: str, steps: int = STEPS, closure: str = "batch", seed: int = 0,
          save_at: int | None = None, resume_from: dict | None = None) -> dict:
    """Weights after `steps` steps. `closure`: "batch" hands `BatchClosure`s in, "plain" a PyTorch closure.
    `save_at`: also return the optimizer's state_dict after that many steps; `resume_from`: start from such a
    checkpoint ({"model", "optim", "step"}) in a fresh model and optimizer."""
    model = MeanLossModel(seed=seed)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt = sam_hf.SharpnessOptimizer(base, optim, optim_args, model=model, max_grad_norm=1.0)
    start, saved = 0, None
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        opt.load_state_dict(resume_from["optim"])
        start = resume_from["step"]
    shards, index = opt.data_shard()
    loss_fn = lambda b: model(**b)["loss"]  # noqa: E731
    for step in range(start, steps):
        full = global_batch(step)
        size = GLOBAL_BATCH // shards
        batch = {k: v[index * size:(index + 1) * size] for k, v in full.items()}
        if closure == "batch":
            opt.step(sam_hf.BatchClosure(loss_fn, batch))
        else:
            def plain(batch=batch):
                opt.zero_grad()
                loss = loss_fn(batch)
                loss.backward()
                return loss

            opt.step(plain)
        if save_at is not None and step + 1 == save_at:
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                     "optim": copy.deepcopy(opt.state_dict()), "step": step + 1}  # as a checkpoint file
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return (weights, saved) if save_at is not None else weights


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    # every rank starts from a different model: the optimizer gives them rank 0's weights, as DDP would
    save_cases_on_gloo(out, {name: (lambda name=name: train(*CASES[name], seed=dist.get_rank())) for name in names})


if __name__ == "__main__":
    main()
