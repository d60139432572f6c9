"""SharpnessTrainer under DeepSpeed ZeRO (`--deepspeed ds_config.json`, or accelerate's DeepSpeed plugin), under
torchrun on CPU processes over gloo (`--use_cpu`: accelerate then runs DeepSpeed on every process).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.deepspeed_trainer --out_dir OUT \\
        --cases NAME:STAGE:OPTIM:OPTIM_ARGS[:FLAG+FLAG...] ...

Each case trains MeanLossModel on vector_data(64) for --steps steps (per-device batch 4, the sequential sampler, so
rank r reads rows 8t + 4r .. 8t + 4r + 3 at step t) and rank 0 writes OUT/NAME.pt (the full weights, gathered under
ZeRO-3) and OUT/NAME.json (log history, each step's loss scale and skipped-step count, each rank's bytes of
method state, the engine's class and stage, checks). Flags:

  ga2        per-device batch 2 with gradient accumulation 2 (the same global batch)
  resume     the run checkpoints every 2 steps; then a new trainer resumes it from checkpoint-2 and trains to the
             end: OUT/NAME.resumed.pt
  steps3     3 steps instead of 4
  ids16      16 rows with an `idx` column (the efficient variants' example ids), 6 steps: 3 epochs
  fp16/bf16  DeepSpeed's fp16 (dynamic loss scale from 2^8) / bf16 mixed precision
  poison     row 8 (rank 0's first sample of step 1) is inf: an fp16 overflow at step 1
  offload    zero_optimization.offload_optimizer device cpu (a torch optimizer: zero_force_ds_cpu_optimizer false)
  ln         LayerNormMLP (SAM-ON perturbs its LayerNorm)
  rr         zero_optimization.round_robin_gradients (ZeRO-1/2) on LayerNormMLP (groups of 3 and 5 parameters, which
             round robin reorders); also checks which partition slice is which
  nopersist  ZeRO-3 with stage3_param_persistence_threshold 0 (every parameter gathered per forward)
  buckets    reduce and all-gather buckets of 100 elements (several per step, a weight larger than one)
  overlap    overlap_comm, contiguous_gradients off, buckets of 100 (what GPU configs set)
  eval       evaluated at the start and every 2 steps (vector_data(16, seed=1), per-device batch 4)
  plugin     accelerate's DeepSpeed plugin from the environment (what `accelerate launch --use_deepspeed
             --zero_stage N` sets) instead of --deepspeed, and transformers.Trainer itself (sam_hf imported)

DeepSpeed's CPU accelerator builds its shared-memory communication op (a C++ extension, minutes to compile on a
fresh machine) when it creates its communication backend, for `inference_all_reduce` only, which training never
calls: the script marks the op unavailable, so DeepSpeed runs every collective over gloo without building it.
DeepSpeed's CPU accelerator reports fp16 as unsupported without mkldnn fp16; torch runs these fp16 ops on any CPU,
so the fp16 cases say what a GPU reports (as the FSDP tests turn FSDP on for CPU processes).
"""

import argparse
import gc
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import sam_hf  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from tests.helpers.tiny import MeanLossModel, args as make_args, vector_data  # noqa: E402

STEPS, BATCH, MAX_GRAD_NORM = 4, 4, 0.3  # clipping is active: the gradient norms are 0.4-0.8


def without_shm_op() -> None:
    """DeepSpeed's gloo-only communication on CPU processes: no shared-memory op to compile (see the docstring)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def fp16_as_on_gpus() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


class LayerNormMLP(torch.nn.Module):
    """Linear-LayerNorm-Tanh-Linear-Tanh-Linear: Trainer's AdamW groups hold 3 weights (decay) and 5 biases and
    LayerNorm parameters (no decay), so round_robin_gradients reorders both groups over 2 ranks."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def ds_config(stage: int, flags: set) -> dict:
    zero = {"stage": stage}
    if "offload" in flags:
        zero["offload_optimizer"] = {"device": "cpu"}
    if "rr" in flags:
        zero["round_robin_gradients"] = True
    if "buckets" in flags:
        zero.update(reduce_bucket_size=100, allgather_bucket_size=100)
    if "overlap" in flags:
        zero.update(overlap_comm=True, contiguous_gradients=False, reduce_bucket_size=100)
    if "nopersist" in flags:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=50,
                    stage3_max_live_parameters=100, stage3_max_reuse_distance=0)
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_optimization": zero,
              "bf16": {"enabled": "auto"},
              "fp16": {"enabled": "auto", "initial_scale_power": 8, "loss_scale_window": 1000, "hysteresis": 1}}
    if "offload" in flags:
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def data(poison: bool, ids16: bool = False):
    if ids16:
        return vector_data(n=16).add_column("idx", list(range(16)))
    rows = vector_data(n=64)
    if not poison:
        return rows
    x = [list(r) for r in rows["x"]]
    x[8] = [float("inf")] * len(x[8])
    return rows.remove_columns("x").add_column("x", x)


class StepStats(TrainerCallback):
    """After each step: the engine's loss scale and skipped-step count."""

    def __init__(self):
        self.trainer, self.stats = None, []

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        self.stats.append([float(engine.optimizer.loss_scale), int(engine.skipped_steps)])


def train(out_dir, stage, optim, optim_args, flags, save_steps=0, resume=None):
    ga = 2 if "ga2" in flags else 1
    steps = 3 if "steps3" in flags else 6 if "ids16" in flags else STEPS
    kwargs = dict(ddp_backend="gloo", max_grad_norm=MAX_GRAD_NORM, train_sampling_strategy="sequential",
                  gradient_accumulation_steps=ga, fp16="fp16" in flags, bf16="bf16" in flags)
    if save_steps:
        kwargs.update(save_strategy="steps", save_steps=save_steps)
    if "eval" in flags:
        kwargs.update(eval_strategy="steps", eval_steps=2, eval_on_start=True, per_device_eval_batch_size=4)
    env = {}
    if "plugin" in flags:  # what `accelerate launch --use_deepspeed --zero_stage N` puts in the environment
        env = dict(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage),
                   ACCELERATE_GRADIENT_ACCUMULATION_STEPS=str(ga), ACCELERATE_GRADIENT_CLIPPING=str(MAX_GRAD_NORM))
        os.environ.update(env)
    else:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"ds_config.rank{os.environ.get('RANK', '0')}.json")  # no rank reads a half file
        with open(path, "w") as f:
            json.dump(ds_config(stage, flags), f)
        kwargs["deepspeed"] = path
    try:
        targs = make_args(out_dir, optim, optim_args or None, max_steps=steps, per_device_train_batch_size=BATCH // ga,
                          **kwargs)
        callback = StepStats()
        # plugin: transformers.Trainer itself, which `import sam_hf` turns into a sharpness-aware one (as for an
        # unmodified script under `sam-hf launch`)
        plain = "plugin" in flags or not sam_hf.registry.is_method(optim)
        trainer_cls = __import__("transformers").Trainer if plain else sam_hf.SharpnessTrainer
        trainer = trainer_cls(model=LayerNormMLP() if {"rr", "ln"} & set(flags) else MeanLossModel(), args=targs,
                              train_dataset=data("poison" in flags, "ids16" in flags),
                              eval_dataset=vector_data(n=16, seed=1) if "eval" in flags else None,
                              callbacks=[callback])
        callback.trainer = trainer
        trainer.train(resume_from_checkpoint=resume)
    finally:
        for k in env:
            os.environ.pop(k, None)
    return trainer, full_weights(trainer), callback.stats


def full_weights(trainer):
    model = trainer.model
    if trainer.model_wrapped.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def partition_checks(trainer) -> dict:
    """Under ZeRO-1/2 every rank holds the full module weights: assembling them from the fp32 partitions with the
    layout's `fragments()` must give them exactly. DeepSpeed's own lp->hp mapping is reported beside it."""
    from deepspeed.utils import safe_get_full_fp32_param

    layout = trainer._sharpness_layout
    params = list(trainer.model.parameters())
    full = {id(p): torch.zeros(p.numel()) for p in params}
    for f in layout.fragments():
        full[id(f.param)][f.param_start:f.param_start + f.numel] = layout._masters[f.group][
            f.flat_start:f.flat_start + f.numel]
    for t in full.values():
        dist.all_reduce(t)
    ours = max(float((full[id(p)] - p.detach().float().view(-1)).abs().max()) for p in params)
    theirs = max(float((safe_get_full_fp32_param(p).float() - p.detach().float()).abs().max()) for p in params)
    return {"fragments_vs_module": ours, "deepspeed_mapping_vs_module": theirs}


def state_bytes(method) -> int:
    """Bytes of the tensors this rank keeps as method state (SAMPa's g_t, Asynchronous SAM's a_{t-1})."""
    state = method.state_dict()
    tensors = [t for key in ("g", "a") for t in (state.get(key) or []) if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_case(out, case):
    parts = case.split(":")
    name, stage, optim, optim_args = parts[0], int(parts[1]), parts[2], parts[3]
    flags = set(parts[4].split("+")) if len(parts) > 4 and parts[4] else set()
    run = os.path.join(out, name)
    trainer, weights, stats = train(run, stage, optim, optim_args, flags, save_steps=2 if "resume" in flags else 0)
    engine = trainer.model_wrapped
    info = {"engine": type(engine).__name__, "stage": int(engine.zero_optimization_stage()),
            "distributed_type": str(trainer.accelerator.distributed_type), "world": dist.get_world_size(),
            "log": trainer.state.log_history, "stats": stats, "global_steps": int(engine.global_steps)}
    if sam_hf.registry.is_method(optim):
        method = trainer._sharpness_optimizer.method
        info["layout"] = trainer._sharpness_layout.describe()
        info["elements"] = sum(p.numel() for p in method.params)  # this rank's slices of the fp32 partitions
        info["state_bytes"] = state_bytes(method)
        info["offloaded"] = bool(getattr(engine.optimizer, "cpu_offload", False))
        if "rr" in flags:
            info["checks"] = partition_checks(trainer)
    infos = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    if "resume" in flags:
        files = sorted(os.listdir(os.path.join(run, "checkpoint-2")))
        _, resumed, _ = train(run, stage, optim, optim_args, flags, resume=os.path.join(run, "checkpoint-2"))
    if dist.get_rank() == 0:
        torch.save(weights, run + ".pt")
        result = {**infos[0], "state_bytes": [i.get("state_bytes") for i in infos],
                  "elements": [i.get("elements") for i in infos],
                  "checks": [i.get("checks") for i in infos]}
        if "resume" in flags:
            torch.save(resumed, run + ".resumed.pt")
            result["checkpoint_files"] = files
        with open(run + ".json", "w") as f:
            json.dump(result, f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out_dir", required=True)
    p.add_argument("--cases", nargs="+", required=True, help="NAME:STAGE:OPTIM:OPTIM_ARGS[:FLAG+FLAG]")
    opts = p.parse_args()
    without_shm_op()
    fp16_as_on_gpus()
    torch.set_num_threads(1)
    # Trainer.train() starts with accelerate's full gc.collect(), ~1.5 s with transformers and deepspeed imported:
    # freezing what exists makes it cheap (as tests/conftest.py does for the suite)
    gc.collect()
    gc.freeze()
    for case in opts.cases:
        run_case(opts.out_dir, case)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
