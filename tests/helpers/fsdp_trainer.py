"""SharpnessTrainer under accelerate's FSDP2 plugin (`--fsdp`, `fsdp_config={"version": 2}`), under torchrun.

`--cases NAME:OPTIM:OPTIM_ARGS ...` trains each case for --steps steps (per-device batch --batch) and saves, from
rank 0, the full weights as OUT_DIR/NAME.pt and OUT_DIR/NAME.json (whether the method's parameters were DTensors,
the model's class, each rank's bytes of method state); `--resume_cases NAME ...` also trains that case with a
checkpoint every 2 steps (accelerate's SHARDED_STATE_DICT) and then resumes from checkpoint-2 in a new trainer:
OUT_DIR/NAME.resumed.pt. `--device cuda` runs on the GPUs (nccl); `--device cpu` runs on CPU processes over gloo,
where accelerate leaves FSDP off (it enables it for accelerators only), so the script turns it on itself: it sets
the FSDP plugin on the accelerator state after Trainer built it, exactly the state accelerate builds on GPUs.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

import sam_hf
from sam_hf.distributed import dtensor
from tests.helpers.tiny import MeanLossModel, args as make_args, vector_data

IGNORED = r"net\.2"  # MeanLossModel's output layer, for the NAME_ignored cases
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["Linear"], "state_dict_type": "SHARDED_STATE_DICT"}


def force_fsdp_on_cpu():
    """What accelerate does on GPUs, on CPU processes: distributed type FSDP with the Trainer's FSDP2 plugin."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer

    create = Trainer.create_accelerator_and_postprocess

    def create_with_fsdp(self):
        create(self)
        if self.args.fsdp_plugin_args is not None:
            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            # as accelerate does on GPUs: a later AcceleratorState() (AcceleratedOptimizer's) copies it back from here
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    Trainer.create_accelerator_and_postprocess = create_with_fsdp


class RootParamModel(MeanLossModel):
    """A parameter on the root module (FSDP2 keeps the root's parameters unsharded after a forward until the
    backward): with an evaluation before the first training step, the optimizer must still hold the shards."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x, labels=None):
        logits = self.net(x) * self.scale
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def train(out_dir, optim, optim_args, batch, steps, fsdp=True, device="cpu", save_steps=0, resume=None,
          evaluate=False, ignored=None, checkpointing=False):
    """`evaluate`: the RootParamModel, evaluated before the first step and every 2 steps. `ignored`: a regex of
    modules FSDP leaves unsharded (accelerate's ignored_modules): their parameters stay plain tensors.
    `checkpointing`: the plugin's activation checkpointing."""
    kwargs = dict(fsdp=True, fsdp_config=dict(FSDP_CONFIG, activation_checkpointing=checkpointing)) if fsdp else {}
    if "RANK" in os.environ:
        kwargs["ddp_backend"] = "gloo" if device == "cpu" else "nccl"
    if save_steps:
        kwargs.update(save_strategy="steps", save_steps=save_steps)
    if evaluate:
        kwargs.update(eval_strategy="steps", eval_steps=2, eval_on_start=True, per_device_eval_batch_size=4)
    targs = make_args(out_dir, optim, optim_args, max_steps=steps, per_device_train_batch_size=batch,
                      use_cpu=device == "cpu", **kwargs)
    model = RootParamModel() if evaluate else MeanLossModel()
    if ignored and fsdp:  # the plugin reads it when the Trainer builds the accelerator
        os.environ["FSDP_IGNORED_MODULES"] = ignored
    try:
        trainer = sam_hf.SharpnessTrainer(model=model, args=targs, train_dataset=vector_data(n=64),
                                          eval_dataset=vector_data(n=16, seed=1) if evaluate else None)
    finally:
        os.environ.pop("FSDP_IGNORED_MODULES", None)
    trainer.train(resume_from_checkpoint=resume)
    weights = {k: (v.full_tensor() if dtensor.is_sharded(v) else v).detach().cpu().clone()
               for k, v in trainer.model.state_dict().items()}
    return trainer, weights


def run_cases(out_dir, cases, resume_cases=(), batch=4, steps=4, device="cpu"):
    """Train each NAME:OPTIM:OPTIM_ARGS case (and resume those in `resume_cases`); rank 0 writes the results."""
    if device == "cpu":
        force_fsdp_on_cpu()
    for case in cases:
        name, optim, optim_args = case.split(":")
        run = os.path.join(out_dir, name)
        evaluate = name.endswith("_eval")
        ignored = IGNORED if name.endswith("_ignored") else None
        trainer, weights = train(run, optim, optim_args, batch, steps, device=device, evaluate=evaluate,
                                 ignored=ignored, checkpointing=name.endswith("_ac"))
        method = trainer._sharpness_optimizer.method
        state = {k: v for k, v in method.state_dict().items() if k in ("g", "a")}
        plain = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not dtensor.is_sharded(p)]
        info = {"sharded": dtensor.has_sharded_params(method.params), "model": type(trainer.model).__name__,
                "plain_trainable": plain, "names": [n for n, _ in trainer.model.named_parameters()],
                "state_bytes": dtensor.local_bytes(state), "log": trainer.state.log_history}
        infos = [None] * dist.get_world_size()
        dist.all_gather_object(infos, info)
        if name in resume_cases:
            _, full = train(run + "_saved", optim, optim_args, batch, steps, device=device, save_steps=2,
                            evaluate=evaluate)
            _, resumed = train(run + "_saved", optim, optim_args, batch, steps, device=device,
                               resume=os.path.join(run + "_saved", "checkpoint-2"), evaluate=evaluate)
        if dist.get_rank() == 0:
            torch.save(weights, run + ".pt")
            with open(run + ".json", "w") as f:
                json.dump({**infos[0], "state_bytes": [i["state_bytes"] for i in infos]}, f)
            if name in resume_cases:
                torch.save(full, run + ".saved.pt")
                torch.save(resumed, run + ".resumed.pt")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out_dir", required=True)
    p.add_argument("--cases", nargs="+", required=True, help="NAME:OPTIM:OPTIM_ARGS")
    p.add_argument("--resume_cases", nargs="*", default=[])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    opts = p.parse_args()
    run_cases(opts.out_dir, opts.cases, opts.resume_cases, opts.batch, opts.steps, opts.device)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
