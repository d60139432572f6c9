"""LookSAM, AE-SAM, ESAM and GSAM on FSDP2-sharded parameters: fsdp_train.py's loop (its MLP, Trainer's loss
normalisation, SGD with momentum) with these cases added. Under torchrun with 2 processes rank 0 writes OUT/NAME.json:
the largest difference from one unsharded process, and for the stateful cases from a run resumed halfway from a
sharded checkpoint (torch.distributed.checkpoint).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.efficient_fsdp OUT
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from tests.helpers import fsdp_train

CASES = {  # name: (optim, optim_args, max_grad_norm)
    "looksam": ("looksam", "rho=0.5,k=2,base=sgd", 0.0),  # steps 0, 2, 4 SAM; 1, 3, 5 reuse g_v
    "looksam_lora": ("looksam", "rho=0.5,k=2,base=sgd", 0.0),  # the adapters only, the frozen weights sharded too
    "aesam": ("aesam", "rho=0.5,delta=0.5,base=sgd", 0.0),
    "esam": ("esam", "rho=0.5,beta=0.5,base=sgd", 0.0),
    "gsam": ("gsam", "rho=0.5,alpha=0.4,base=sgd", 0.0),
}
RESUMED = ("looksam", "esam")  # g_v; the mask generator
STEPS = 6


def diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    out = sys.argv[1]
    fsdp_train.CASES.update(CASES)
    fsdp_train.ALL_CASES.update(CASES)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for name in CASES:
            sharded, _ = fsdp_train.train(name, STEPS, world, rank, sharded=True)
            result = {}
            if rank == 0:
                one, _ = fsdp_train.train(name, STEPS, world, 0, sharded=False)
                result["vs_one_process"] = diff(sharded, one)
            if name in RESUMED:
                resumed = fsdp_train.train_with_resume(name, STEPS, world, rank, os.path.join(out, f"ckpt_{name}"))
                result["resumed_vs_straight"] = diff(resumed, sharded)
            if rank == 0:
                with open(os.path.join(out, f"{name}.json"), "w") as f:
                    json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
