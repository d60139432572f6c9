"""Train a tiny model with SharpnessTrainer, in 1 process or under torchrun with N.

`--cases NAME:OPTIM:OPTIM_ARGS:BATCH ...` trains several configurations one after the other in the same
processes (one launch, several results; a NAME ending in _bn uses a model with BatchNorm, one ending in _rankinit
initialises the model differently on every rank, _kw and _count pick the model's loss kind, see tiny.MODELS; a NAME with _compile trains
under --torch_compile with the aot_eager backend, _inductor with inductor; one ending in _ga2 accumulates 2
micro-batches per step);
rank 0 saves each final state dict as OUT_DIR/NAME.pt, its log
history as NAME.log, what Trainer wrapped the model in as NAME.wrapper and its evaluation as NAME.eval; every
rank r saves its weights as NAME.rank{r}.pt and its thread count and device as NAME.rank{r}.json.
--device cuda trains on the GPU (with ascent_device=cpu: rank 0 on the GPU, rank 1 on the CPU). Fault injection for the failure tests (the last rank, at step N): --kill_at N exits, --hang_at N
stops answering, --corrupt_at N nudges one weight by --corrupt_by (replicas diverge).
"""

import argparse
import json
import os
import time

import torch
from transformers import TrainerCallback

import sam_hf
from tests.helpers.tiny import MODELS, args as make_args, vector_data


class FaultInjection(TrainerCallback):
    def __init__(self, opts):
        self.opts = opts
        world = int(os.environ.get("WORLD_SIZE", 1))
        self.active = world > 1 and int(os.environ.get("RANK", 0)) == world - 1

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not self.active:
            return
        if state.global_step == self.opts.kill_at:
            if self.opts.kill_once:  # an elastic restart: killed the first time only
                if os.path.exists(self.opts.kill_once):
                    return
                open(self.opts.kill_once, "w").close()
            os._exit(3)
        if state.global_step == self.opts.hang_at:
            time.sleep(3600)  # alive but silent: the peers' next collective gets no answer
        if state.global_step == self.opts.corrupt_at:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += self.opts.corrupt_by


def slow_roles(descent_s, ascent_s_per_sample, ascent_step_s=0.0):
    """Make asyncsam's two passes (and the ascent rank's optimizer step) take known times, as on devices of
    different speeds."""
    from sam_hf.batching import leading_samples
    from sam_hf.methods import AsyncSAM

    role_pass = AsyncSAM.role_pass

    def slowed(self, role, batches, passes):
        out = role_pass(self, role, batches, passes)
        extra = descent_s if role == 0 else ascent_s_per_sample * sum(len(p.batch["labels"]) for p in
                                                                      leading_samples(batches, self.ratio))
        time.sleep(extra)
        out["descent_seconds" if role == 0 else "ascent_seconds"] += extra
        return out

    AsyncSAM.role_pass = slowed
    if ascent_step_s and int(os.environ.get("RANK", 0)) == 1:
        adamw_step = torch.optim.AdamW.step

        def slow_step(self, *args, **kwargs):
            time.sleep(ascent_step_s)
            return adamw_step(self, *args, **kwargs)

        torch.optim.AdamW.step = slow_step


def train(out_dir, optim, optim_args, batch=8, steps=4, ga=1, save_steps=0, resume=None, timeout=60,
          batchnorm=False, callbacks=(), model_seed=0, device="cpu", model="mean", compile_backend=None):
    save = dict(save_strategy="steps", save_steps=save_steps) if save_steps else {}
    distributed = "RANK" in os.environ
    sam_hf.place_ascent_rank(optim, optim_args or None, "gloo")  # ascent_device=cpu: rank 1 on the CPU
    targs = make_args(os.path.join(out_dir, "run"), optim, optim_args or None, max_steps=steps,
                      per_device_train_batch_size=batch, gradient_accumulation_steps=ga, ddp_timeout=timeout,
                      ddp_backend="gloo" if distributed else None, use_cpu=device == "cpu", **save,
                      **(dict(torch_compile=True, torch_compile_backend=compile_backend) if compile_backend else {}))
    model = MODELS[model](batchnorm=batchnorm, seed=model_seed)
    trainer = sam_hf.SharpnessTrainer(model=model, args=targs, train_dataset=vector_data(n=64),
                                      callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", required=True, help="NAME:OPTIM:OPTIM_ARGS:BATCH")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--resume", default=None, help="a checkpoint folder, or 'last': the run's newest one if any "
                                                     "(an elastic restart)")
    p.add_argument("--kill_once", default=None, help="with --kill_at: a marker file; kill only while it is absent")
    p.add_argument("--timeout", type=int, default=60)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kill_at", type=int, default=-1)
    p.add_argument("--hang_at", type=int, default=-1)
    p.add_argument("--corrupt_at", type=int, default=-1)
    p.add_argument("--corrupt_by", type=float, default=1e-3)
    p.add_argument("--slow_roles", default=None,
                   help="DESCENT_S,ASCENT_S_PER_SAMPLE[,ASCENT_STEP_S]: asyncsam's passes (and the ascent rank's "
                        "optimizer step) sleep this long (a slower ascent device)")
    opts = p.parse_args()
    if opts.slow_roles:
        slow_roles(*map(float, opts.slow_roles.split(",")))
    for case in opts.cases:
        name, optim, optim_args, batch = case.split(":")
        resume = opts.resume
        if resume == "last":  # what resume_from_checkpoint=True finds, or a fresh start where there is none yet
            from transformers.trainer_utils import get_last_checkpoint

            run_dir = os.path.join(opts.out_dir, name, "run")
            resume = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
        trainer, state = train(os.path.join(opts.out_dir, name), optim, optim_args, int(batch), opts.steps,
                               save_steps=opts.save_steps, resume=resume, timeout=opts.timeout,
                               batchnorm=name.endswith("_bn"), callbacks=[FaultInjection(opts)],
                               model_seed=trainer_rank() if name.endswith("_rankinit") else 0, device=opts.device,
                               model=model_kind(name), compile_backend=compile_backend(name),
                               ga=2 if name.endswith("_ga2") else 1)
        rank_file = os.path.join(opts.out_dir, f"{name}.rank{trainer.args.process_index}")
        torch.save(state, rank_file + ".pt")
        with open(rank_file + ".json", "w") as f:
            json.dump({"threads": torch.get_num_threads(), "device": trainer.args.device.type}, f)
        evaluation = evaluate(trainer)
        if trainer.args.process_index == 0:
            torch.save(state, os.path.join(opts.out_dir, f"{name}.pt"))
            torch.save(trainer.state.log_history, os.path.join(opts.out_dir, f"{name}.log"))
            with open(os.path.join(opts.out_dir, f"{name}.wrapper"), "w") as f:
                f.write(type(trainer.model_wrapped).__name__)
            torch.save(evaluation, os.path.join(opts.out_dir, f"{name}.eval"))


def evaluate(trainer) -> dict:
    """Evaluation after training, sharded over all ranks as Trainer does it: metrics, and this rank's batches.

    The loss on 32 samples (whole batches on every rank: Trainer's eval_loss averages per-batch means, so a
    padded batch would weigh differently); predictions on 20 (the last batch padded, the padding dropped)."""
    data, odd = vector_data(n=32, seed=1), vector_data(n=20, seed=1)
    return {"eval_loss": trainer.evaluate(data)["eval_loss"], "batches": len(trainer.get_eval_dataloader(data)),
            "predictions": torch.as_tensor(trainer.predict(odd).predictions)}


def model_kind(name: str) -> str:
    """A case NAME ending in _kw trains tiny.KwargsMeanModel, one ending in _count tiny.CountLossModel."""
    return next((kind for kind in MODELS if name.endswith(f"_{kind}")), "mean")


def compile_backend(name: str):
    """A case NAME with _inductor trains under --torch_compile with inductor, one with _compile with aot_eager."""
    return "inductor" if "_inductor" in name else "aot_eager" if "_compile" in name else None


def trainer_rank() -> int:
    return int(os.environ.get("RANK", 0))


if __name__ == "__main__":
    main()
