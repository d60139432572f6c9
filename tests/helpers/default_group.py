"""Worker for tests/distributed/test_process_group.py: SharpnessTrainer on a process group started without a
backend (`init_process_group()`, accelerate's call where it finds no accelerator), under torchrun:

    python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.default_group OUT    # from the root

Each rank writes OUT/rankR.json (the group's backend, the message when TrainingArguments lacks --use_cpu, the
plan, the world size transformers sees, what a data-parallel **kwargs model logs) and OUT/rankR.pt (its weights
after 2 SAMPa steps).
"""

import io
import json
import logging
import sys

import torch
import torch.distributed as dist

import sam_hf
from sam_hf import SharpnessConfigError
from tests.helpers.tiny import KwargsMeanModel, MeanLossModel, args, vector_data, weights


def main() -> None:
    dist.init_process_group()  # no backend: torch's default, get_backend() 'undefined' (get_backend_config 'cpu:gloo')
    out, rank = sys.argv[1], dist.get_rank()
    result = {"backend": str(dist.get_backend())}
    # what TrainingArguments does on a machine without a GPU when --use_cpu is missing: accelerate takes the run for
    # a single process (world_size 1) on every rank
    try:
        sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=vector_data(),
                                args=args(out, "sampa", "rho=0.1", max_steps=2, use_cpu=False))
    except SharpnessConfigError as err:
        result["without_use_cpu"] = str(err)
    trainer = sam_hf.SharpnessTrainer(model=MeanLossModel(), args=args(out, "sampa", "rho=0.1", max_steps=2),
                                      train_dataset=vector_data())  # tiny.args: use_cpu=True
    trainer.train()
    result["plan"] = trainer._sharpness_layout.describe()
    result["world_size"] = trainer.args.world_size
    # a model taking **kwargs, data parallel (SAM): the factor transformers puts on its logged loss is stated once
    stream = io.StringIO()
    logging.getLogger("sam_hf").addHandler(logging.StreamHandler(stream))
    sam_hf.SharpnessTrainer(model=KwargsMeanModel(), train_dataset=vector_data(),
                            args=args(out, "sam", "rho=0.1", log_level="info", log_level_replica="info"))
    result["log"] = stream.getvalue()
    torch.save(weights(trainer.model), f"{out}/rank{rank}.pt")
    json.dump(result, open(f"{out}/rank{rank}.json", "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
