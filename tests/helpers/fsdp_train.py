"""Every method on FSDP2-sharded parameters, as a plain training loop (no Trainer).

`python -m torch.distributed.run --nproc_per_node N -m tests.helpers.fsdp_train --out_dir D` (from the root) trains each case of CASES on a
small MLP sharded with `torch.distributed.fsdp.fully_shard` over gloo (DTensor parameters, as accelerate's FSDP2
plugin builds them) and saves, from rank 0, the full weights as D/NAME.pt and every rank's memory figures as
D/NAME.mem.json; a case that raises writes D/NAME.rank{r}.error instead. `--resume_check` also trains the
stateful methods with a checkpoint halfway (model, optimizer and method state through
torch.distributed.checkpoint) and saves the resumed weights as D/NAME.resumed.pt. `--checks` checks the
reductions over the shards and a Trainer with FSDP flags on CPU processes (D/checks.json); `--trainer_cases`
then runs fsdp_trainer.py's Trainer cases in the same processes (one launch instead of two), into D/trainer.
`train(..., sharded=False)` is the same loop in one process on the unsharded model: the reference.

The loop is Trainer's: the method turns the step's batch into `.grad` through `Passes` (Trainer's loss
normalisation: the model's mean loss, a slice of a micro-batch weighted by its share), then clipping and the base
optimizer's step unless the method skips it. Each rank gets its share of the global batch; the one-process run
gets the global batch reordered so that its consecutive sample ranges are the ranks' slices taken together (see
`global_order`): mSAM's micro-batch j and Asynchronous SAM's ascent batch are then the same samples on both sides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

from sam_hf import registry
from sam_hf.distributed import dtensor, fsdp2
from sam_hf.distributed.layouts import make_layout, trainer_sharding
from sam_hf.batching import TrainerBatch
from sam_hf.config import SharpnessConfig
from sam_hf.tensors import backup

GLOBAL_BATCH = 8
DIM, CLASSES = 6, 3
# name: (optim, optim_args, max_grad_norm); every one runs data parallel (SAMPa / Asynchronous SAM parallel=off).
# The base optimizer is SGD with momentum (AdamW's first steps are sign-like, which would hide a wrong
# perturbation), except for SAMPa's AdamW lookahead case.
CASES = {
    "sam": ("sam", "rho=0.5,base=sgd", 0.0),
    "asam": ("sam", "rho=1.0,adaptive=true,base=sgd", 0.0),
    "msam": ("msam", "rho=0.5,micro_batches=2,base=sgd", 0.0),
    "sampa": ("sampa", "rho=0.5,lam=0.3,parallel=off,base=sgd", 1.0),  # clipping: the lookahead clips g_t globally
    "sampa_adamw": ("sampa", "rho=0.5,lam=0.3,parallel=off", 0.0),
    "asyncsam": ("asyncsam", "rho=0.5,ascent_batch_ratio=0.5,parallel=off,base=sgd", 0.0),
    # LoRA (PEFT) on the sharded model: only the adapters are trainable, the frozen weights are sharded too
    "sam_lora": ("sam", "rho=0.5,base=sgd", 0.0),
    "sampa_lora": ("sampa", "rho=0.5,lam=0.3,parallel=off,base=sgd", 0.0),
    # VaSSO's average lives on the local shard (and is checkpointed through torch.distributed.checkpoint)
    "sam_vasso": ("sam", "rho=0.5,rule=vasso,base=sgd", 0.0),
    "sampa_vasso": ("sampa", "rho=0.5,lam=0.3,rule=vasso,parallel=off,base=sgd", 0.0),
}
STATEFUL = ("sampa", "sampa_adamw", "asyncsam", "sampa_lora", "sam_vasso", "sampa_vasso")
# Role mode (launched on 2k processes): each role sharded over its own k ranks (`fsdp2.role_mesh`), the two
# gradients exchanged shard for shard between ranks (0, i) and (1, i)
ROLE_CASES = {
    "sampa_roles": ("sampa", "rho=0.5,lam=0.3,parallel=on,base=sgd", 1.0),
    "sampa_adamw_roles": ("sampa", "rho=0.5,lam=0.3,parallel=on", 0.0),
    "asyncsam_roles": ("asyncsam", "rho=0.5,ascent_batch_ratio=0.5,parallel=on,base=sgd", 0.0),
}
ALL_CASES = {**CASES, **ROLE_CASES}


class MLP(nn.Module):
    """Rows that do not split evenly over 2 ranks (9, 5, 3), a LayerNorm and biases."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(DIM, 9)
        self.norm = nn.LayerNorm(9)
        self.mid = nn.Linear(9, 5)
        self.out = nn.Linear(5, CLASSES)

    def forward(self, x, labels):
        h = torch.tanh(self.norm(self.inp(x)))
        logits = self.out(torch.tanh(self.mid(h)))
        return nn.functional.cross_entropy(logits, labels)


def with_lora(model: MLP):
    """LoRA adapters (rank 2, B not zero so that every adapter gets a gradient at once) on the hidden layers."""
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["inp", "mid"], lora_dropout=0.0,
                             init_lora_weights=False)
    return peft.get_peft_model(model, config)


def shard_model(model, world: int, mesh=None):
    """fully_shard every Linear (with its LoRA adapters) and the root over `mesh` (default: all `world` ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = mesh if mesh is not None else init_device_mesh("cpu", (world,))
    mlp = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in (mlp.inp, mlp.mid, mlp.out):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root holds the LayerNorm's parameters
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, DIM, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)


def global_order(world: int, parts: int) -> list[int]:
    """Rank r's share is samples [r b, (r + 1) b) of the global batch (b = batch / world); each share is cut into
    `parts` consecutive slices. The order that puts slice j of every rank together, for j = 0, 1, ..."""
    b = GLOBAL_BATCH // world
    cut = [round(j * b / parts) for j in range(parts + 1)]
    return [r * b + i for j in range(parts) for r in range(world) for i in range(cut[j], cut[j + 1])]


class Passes:
    """methods.base.GradientPasses as Trainer runs it, for a model whose loss is the mean over the batch."""

    def __init__(self, model):
        self.model = model

    def backward(self, batch, fraction: float = 1.0, clean: bool = True, part_of=None, last=True) -> torch.Tensor:
        loss = self.model(batch["x"], batch["labels"])
        if part_of is not None or fraction != 1.0:  # a slice contributes its share of the micro-batch's mean loss
            loss = loss * fraction
        loss.backward()
        return loss.detach()

    def loss_scale(self) -> float:
        return 1.0



def build(name: str, world: int, sharded: bool, layout=None):
    """The model (sharded over all ranks, or over this rank's role in role mode: `layout`), optimizer and method."""
    optim, optim_args, clip = ALL_CASES[name]
    model = with_lora(MLP()) if name.endswith("_lora") else MLP()
    cfg = SharpnessConfig.from_optim_args(optim, optim_args)
    method_cls = registry.get(optim).method
    if layout is not None:
        shard_model(model, world, mesh=fsdp2.role_mesh(layout.plan))
        if layout.plan.role == 1:  # role 1 built differently: the layout's start gives it role 0's shards
            with torch.no_grad():
                for p in model.parameters():
                    dtensor.local(p).add_(1.0)
        layout.prepare_params(list(model.parameters()))
    elif sharded:
        shard_model(model, world)
        layout = make_layout(cfg, method_cls, torch.device("cpu"), 60.0, sharding="fsdp2")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.base == "sgd":
        opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    method = method_cls(cfg, opt, max_grad_norm=clip, layout=layout, model=model)
    if layout is not None and layout.roles:
        layout.before_step(None, model, method)  # checks that each role is sharded over its own ranks
    return model, opt, method, clip


def parts_for(name: str) -> int:
    cfg = SharpnessConfig.from_optim_args(*ALL_CASES[name][:2])
    return cfg.micro_batches if cfg.method == "msam" else 2


def step_batch(step: int, name: str, world: int, rank: int, sharded: bool) -> TrainerBatch:
    x, y = global_batch(step)
    if sharded:
        b = GLOBAL_BATCH // world
        x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
    else:
        order = torch.tensor(global_order(world, parts_for(name)))
        x, y = x[order], y[order]
    return TrainerBatch.of({"x": x, "labels": y}, None, 1)


def run_steps(model, opt, method, clip, name, steps, world, rank, sharded, start=0):
    """Trainer's loop. In role mode (`plan`) `world` and `rank` are the role's k ranks and this rank's dp index:
    ranks (0, i) and (1, i) read the same share of the batch."""
    passes = Passes(model)
    for step in range(start, steps):
        batch = step_batch(step, name, world, rank, sharded)
        result = method.layout.step(method, [batch], passes, step)
        method.layout.check_replicas(method.params, step)  # role mode: the roles' equal shards stay equal
        if not result.skip_update:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        opt.zero_grad(set_to_none=True)


def full_weights(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if dtensor.is_sharded(v) else v).detach().clone() for k, v in model.state_dict().items()}


def memory(method) -> dict[str, int]:
    """Bytes this rank holds for a weight backup and for the method's gradient-sized state."""
    state = {k: v for k, v in method.state_dict().items() if k in ("g", "a")}
    return {"backup": dtensor.local_bytes(backup(method.params)), "state": dtensor.local_bytes(state)}


def train(name: str, steps: int, world: int = 2, rank: int = 0, sharded: bool = False, layout=None):
    model, opt, method, clip = build(name, world, sharded, layout)
    run_steps(model, opt, method, clip, name, steps, world, rank, sharded)
    return full_weights(model), memory(method)


def role_layout(name: str):
    """The FSDP2 role layout (2 x k role mesh) make_layout builds for the case (as the Trainer does)."""
    cfg = SharpnessConfig.from_optim_args(*ALL_CASES[name][:2])
    layout = make_layout(cfg, registry.get(cfg.method).method, torch.device("cpu"), 60.0, sharding="fsdp2")
    assert layout.roles, layout.describe()
    return layout


def train_base_only(name: str, steps: int, world: int = 2) -> dict[str, torch.Tensor]:
    """The one-process reference's loop with the base optimizer alone (no sharpness-aware step)."""
    model, opt, method, clip = build(name, world, False)
    for step in range(steps):
        batch = step_batch(step, name, world, 0, False)
        model(batch["x"], batch["labels"]).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return full_weights(model)


def train_with_resume(name: str, steps: int, world: int, rank: int, ckpt: str, layout=None):
    """Train `steps // 2` steps, checkpoint, and continue in a fresh model, optimizer and method from it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    half = steps // 2
    model, opt, method, clip = build(name, world, True, layout)
    run_steps(model, opt, method, clip, name, half, world, rank, True)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(ckpt, "train"))
    method.layout.save_state(method, ckpt)
    del model, opt, method

    model, opt, method, clip = build(name, world, True, layout)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=os.path.join(ckpt, "train"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert method.layout.load_state(method, ckpt)
    run_steps(model, opt, method, clip, name, steps, world, rank, True, start=half)
    return full_weights(model)


def collective_checks(world: int, rank: int) -> dict:
    """The reductions over the shards: values against the full tensors, and the collectives each one issues."""

    model = shard_model(MLP(), world)
    x, y = global_batch(0)
    b = GLOBAL_BATCH // world
    model(x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]).backward()
    grads = [p.grad for p in model.parameters()]
    full = [g.full_tensor() for g in grads]
    calls = []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(1)
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        out = {"params": len(grads), "is_fsdp2": [fsdp2.is_fsdp2(model), fsdp2.is_fsdp2(MLP())]}
        before = len(calls)
        norm = dtensor.global_norm(grads)
        out["norm_collectives"] = len(calls) - before
        out["norm_error"] = abs(float(norm) - float(torch.linalg.vector_norm(torch.cat([f.reshape(-1) for f in full]))))
        before = len(calls)
        sums = dtensor.totals([(g * g).sum() for g in grads], [g.sum() for g in grads])
        out["totals_collectives"] = len(calls) - before
        expected = torch.tensor([sum(float((f * f).sum()) for f in full), sum(float(f.sum()) for f in full)])
        out["totals_error"] = float((sums - expected).abs().max())
        out["finite_clean"] = dtensor.all_finite(grads)
        if rank == world - 1:  # a non-finite value in the last rank's shard only
            dtensor.local(grads[0]).view(-1)[0] = float("inf")
        before = len(calls)
        out["finite_with_inf_on_one_rank"] = dtensor.all_finite(grads)
        out["finite_collectives"] = len(calls) - before
    finally:
        dist.all_reduce = all_reduce
    return out


def cpu_fsdp_flags_check(out_dir: str) -> str:
    """A Trainer with FSDP flags on CPU processes: accelerate leaves FSDP off; trainer_sharding must say so."""
    from tests.helpers.tiny import MeanLossModel, args as make_args, vector_data
    from transformers import Trainer

    from sam_hf.config import SharpnessConfigError

    targs = make_args(os.path.join(out_dir, "cpu_fsdp"), "adamw_torch", None, fsdp=True,
                      fsdp_config={"version": 2}, ddp_backend="gloo")
    trainer = Trainer(model=MeanLossModel(), args=targs, train_dataset=vector_data(n=16))
    try:
        trainer_sharding(trainer, "sam", roles_asked=False)
    except SharpnessConfigError as exc:
        return f"is_fsdp_enabled={trainer.is_fsdp_enabled}: {exc}"
    return f"is_fsdp_enabled={trainer.is_fsdp_enabled}: no error"


def run_role_case(name: str, opts, world: int, rank: int) -> None:
    """A role-mode case: weights (rank 0), every rank's memory and role/dp index, the resumed weights."""
    try:
        layout = role_layout(name)
        plan = layout.plan
        k, i = plan.dp_size, plan.dp_rank
        weights, mem = train(name, opts.steps, k, i, sharded=True, layout=layout)
        mems = [None] * world
        dist.all_gather_object(mems, {**mem, "role": plan.role, "dp": i})
        if rank == 0:
            torch.save(weights, os.path.join(opts.out_dir, f"{name}.pt"))
            with open(os.path.join(opts.out_dir, f"{name}.mem.json"), "w") as f:
                json.dump(mems, f)
        if opts.resume_check:
            resumed = train_with_resume(name, opts.steps, k, i, os.path.join(opts.out_dir, f"ckpt_{name}"), layout)
            if rank == 0:
                torch.save(resumed, os.path.join(opts.out_dir, f"{name}.resumed.pt"))
    except Exception:
        with open(os.path.join(opts.out_dir, f"{name}.rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())


def role_layout_check(name: str) -> str:
    """Role mode on a model sharded over all 2k ranks (the roles would all-gather from each other): refused."""
    from sam_hf.config import SharpnessConfigError

    plan = role_layout(name).plan
    model = shard_model(MLP(), plan.world_size)
    try:
        fsdp2.check_role_layout(list(model.parameters()), plan)
    except SharpnessConfigError as exc:
        return str(exc)
    return "no error"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out_dir", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--role_cases", nargs="*", default=[], help="ROLE_CASES to run (launch 2k processes)")
    p.add_argument("--resume_check", action="store_true")
    p.add_argument("--timeout", type=int, default=60, help="seconds a collective may wait for a peer")
    p.add_argument("--checks", action="store_true", help="the reductions' collectives and the CPU FSDP-flags check")
    p.add_argument("--trainer_cases", nargs="*", default=[],
                   help="then fsdp_trainer.py's NAME:OPTIM:OPTIM_ARGS cases in these processes, FSDP2 turned on")
    p.add_argument("--trainer_resume", nargs="*", default=[])
    opts = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=opts.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if opts.checks:
            results = [None] * world
            dist.all_gather_object(results, collective_checks(world, rank))
            message = cpu_fsdp_flags_check(opts.out_dir)
            if rank == 0:
                with open(os.path.join(opts.out_dir, "checks.json"), "w") as f:
                    json.dump({"ranks": results, "cpu_fsdp_flags": message}, f)
        for name in opts.cases:
            try:  # a case that fails on every rank (the same exception) leaves the others to run
                weights, mem = train(name, opts.steps, world, rank, sharded=True)
                mems = [None] * world
                dist.all_gather_object(mems, mem)
                if rank == 0:
                    torch.save(weights, os.path.join(opts.out_dir, f"{name}.pt"))
                    with open(os.path.join(opts.out_dir, f"{name}.mem.json"), "w") as f:
                        json.dump(mems, f)
                if opts.resume_check and name in STATEFUL:
                    resumed = train_with_resume(name, opts.steps, world, rank,
                                                os.path.join(opts.out_dir, f"ckpt_{name}"))
                    if rank == 0:
                        torch.save(resumed, os.path.join(opts.out_dir, f"{name}.resumed.pt"))
            except Exception:
                with open(os.path.join(opts.out_dir, f"{name}.rank{rank}.error"), "w") as f:
                    f.write(traceback.format_exc())
        for name in opts.role_cases:
            run_role_case(name, opts, world, rank)
        if opts.role_cases:
            message = role_layout_check(opts.role_cases[0])
            if rank == 0:
                with open(os.path.join(opts.out_dir, "role_layout.json"), "w") as f:
                    json.dump({"all_ranks_mesh": message}, f)
        if opts.trainer_cases:  # after the FSDP-flags check: this turns accelerate's FSDP on for CPU processes
            from tests.helpers.fsdp_trainer import run_cases

            run_cases(os.path.join(opts.out_dir, "trainer"), opts.trainer_cases, opts.trainer_resume, device="cpu")
        dist.barrier()  # no rank tears gloo down while a peer's last collective is still in flight
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
