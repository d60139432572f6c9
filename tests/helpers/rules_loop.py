"""The plain-PyTorch loop of tests/helpers/plain_loop.py with the logits a rule may need (BiSAM), for the rules'
2-process tests: `python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.rules_loop OUT NAME ...`
(from the repository root) trains the named CASES, every rank from its own initial weights, and rank 0 saves each
one's weights as OUT/NAME.pt. `train(optim, optim_args)` is the same loop in one process, the reference.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import sam_hf
from tests.helpers.processes import save_cases_on_gloo
from tests.helpers.plain_loop import GLOBAL_BATCH, STEPS, global_batch
from tests.helpers.tiny import MeanLossModel

CASES = {  # name: (optim, optim_args); the layout 2 processes get
    "sam_vasso": ("sam", "rho=0.1,rule=vasso"),  # data parallel
    "sam_bisam": ("sam", "rho=0.1,rule=bisam"),  # data parallel
    "sampa_bisam": ("sampa", "rho=0.1,lam=0.3,rule=bisam"),  # role mode: q travels to role 0
    "sampa_msam2": ("sampa", "rho=0.1,lam=0.3,micro_batches=2"),  # role mode: 2 held gradients travel
    "sampa_vasso": ("sampa", "rho=0.1,lam=0.3,rule=vasso"),  # role mode
    "asyncsam_tau2": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5,staleness=2,rule=asam,asam_params=davda54"),
    # float64 models: the role exchange carries float64 gradients (fp32 would round them to about 1e-8)
    "sampa_fp64": ("sampa", "rho=0.1,lam=0.3", torch.float64),
    "asyncsam_fp64": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", torch.float64),
}


def train(optim: str, optim_args: str, dtype: torch.dtype = torch.float32, steps: int = STEPS, seed: int = 0) -> dict:
    model = MeanLossModel(seed=seed).to(dtype)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt = sam_hf.SharpnessOptimizer(base, optim, optim_args, model=model, max_grad_norm=1.0)
    shards, index = opt.data_shard()
    for step in range(steps):
        full = global_batch(step)
        size = GLOBAL_BATCH // shards
        batch = {k: v[index * size:(index + 1) * size] for k, v in full.items()}
        batch["x"] = batch["x"].to(dtype)
        opt.step(sam_hf.BatchClosure(lambda b: model(**b)["loss"], batch, logits_fn=lambda b: model(b["x"])["logits"]))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    save_cases_on_gloo(out, {name: (lambda name=name: train(*CASES[name], seed=dist.get_rank())) for name in names})


if __name__ == "__main__":
    main()
