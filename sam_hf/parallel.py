"""Several processes: the role mesh, shard streams and the one exchange per step.

Two layouts (DESIGN.md, "With several processes"):

* data parallel (`mode="data"`): SAM, mSAM, and SAMPa / Asynchronous SAM with
  `parallel=off`. Every rank runs the whole method on its own shard; gradients
  are averaged over all ranks where the method says (`all_reduce_grads`).
* role parallel (`mode="roles"`): SAMPa and Asynchronous SAM on 2k ranks
  (Asynchronous SAM by default only on 2: `parallel=on` asks for 2k).
  A 2 x k `DeviceMesh` with dims (`role`, `dp`): role 0 computes the first
  gradient of the step (SAMPa's g~_t, Asynchronous SAM's descent), role 1 the
  second (g_{t+1}, the ascent a_t), each data parallel over its k ranks.
  Ranks (0, i) and (1, i) read the same shard stream, so every rank sees the
  same batches. The exchange (`exchange`) averages each role's gradient over
  its k dp ranks, then swaps it point to point between (0, i) and (1, i),
  received straight into the method state this rank has spent: every rank
  then holds both gradients and takes the same optimizer step, with no more
  than one extra copy of the weights (see `exchange`).

Under FSDP2 each role is sharded over its own k ranks (sharding.py): FSDP averages
a role's gradient over them, and the exchange swaps local shards, since ranks
(0, i) and (1, i) hold the same one.

Asynchronous SAM may put its ascent rank on the CPU beside a GPU descent rank
(`ascent_device=cpu`, placement.py): the exchange goes through CPU buffers over
gloo, and since the two devices' optimizer steps differ by round-off, the
replica check allows for it and then copies rank 0's weights to rank 1.

Every collective here waits at most `timeout` (Trainer's `ddp_timeout`): a peer
that died or hangs ends training with an error naming the step and the role,
never a silent hang. Replicas are compared by checksum every `check_every` steps.
"""

from __future__ import annotations

import atexit
import datetime
import faulthandler
import logging
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import sharding
from .config import SharpnessConfig, SharpnessConfigError
from .placement import cpu_ascent_world_message

logger = logging.getLogger(__name__)

ROLE_NAMES = {"sampa": ("perturbed gradient g~_t", "lookahead gradient g_{t+1}"),
              "asyncsam": ("descent", "ascent")}
SUPPORTED_BACKENDS = ("gloo", "nccl")


class PeerFailure(RuntimeError):
    """A peer process died, hung past the timeout, or drifted from the others."""


@dataclass
class ParallelPlan:
    mode: str = "single"  # single | data | roles
    world_size: int = 1
    rank: int = 0
    role: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    timeout_s: float = 1800.0
    mesh: object = None
    dp_group: object = None
    peer: int = 0  # role mode: the global rank of the other role's rank with this dp index
    exchange_dtype: str = "fp32"  # role mode: what the gradients cross the link as (optim_args exchange_dtype)
    mixed_devices: bool = False  # ascent_device=cpu: a CPU ascent rank beside the descent rank's device
    staging_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if self.mode == "roles":
            return f"role-parallel 2 x {self.dp_size} mesh (rank {self.rank}: role {self.role}, dp {self.dp_rank})"
        return f"{self.mode} ({self.world_size} process{'es' if self.world_size != 1 else ''})"


def _destroy_process_group() -> None:
    """At exit, tear the process group down while Python still runs: left to interpreter teardown, gloo's
    threads can abort the process ("terminate called without an active exception") after a finished run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_backend(device: torch.device) -> str:
    """The backend of the default process group that carries `device`'s tensors.

    A group started with one backend names it (`dist.get_backend()`: "gloo", "nccl"). One started without
    (`init_process_group()`, as accelerate does where it finds no accelerator) gets torch's default of one backend
    per device type: `get_backend()` then says "undefined" (or "cpu:gloo,cuda:nccl") and `get_backend_config()`
    lists them, e.g. "cpu:gloo"."""
    backend = str(dist.get_backend())
    if backend in SUPPORTED_BACKENDS:
        return backend
    per_device = dict(p.strip().split(":", 1) for p in str(dist.get_backend_config()).split(",") if ":" in p)
    return per_device.get(device.type, backend)


def meant_several_processes(env=os.environ) -> str | None:
    """A warning for a one-process run whose launcher was asked for several, else None: `accelerate launch
    --num_processes N` without --multi_gpu starts one process through its simple launcher, which sets MASTER_ADDR
    (for N > 1) but no WORLD_SIZE."""
    if "MASTER_ADDR" in env and "WORLD_SIZE" not in env and any(k.startswith("ACCELERATE_") for k in env):
        return ("sam_hf: this run has 1 process, but accelerate launch was asked for several (MASTER_ADDR is set, "
                "WORLD_SIZE is not): without --multi_gpu its launcher starts one process; add --multi_gpu (on a "
                "machine without GPUs, also --use_cpu in the script's arguments)")
    return None


def make_plan(cfg: SharpnessConfig, device: torch.device, timeout_s: float,
              trainer_world: int | None = None) -> ParallelPlan:
    """Decide the layout from the method, `parallel` and the world size; reject what cannot work.

    `trainer_world` is the number of processes transformers works with (TrainingArguments.world_size): it must be
    torch.distributed's, or each process would train alone on the whole data while sam_hf pairs them up."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if trainer_world is not None and trainer_world != world:
        raise SharpnessConfigError(
            f"sam_hf: torch.distributed runs {world} processes but transformers sees {trainer_world} (accelerate "
            "found no GPU, and without --use_cpu it trains each process alone on the whole data): add --use_cpu "
            "(CPU processes over gloo)")
    if cfg.parallel == "on" and cfg.method not in ROLE_NAMES:
        raise SharpnessConfigError(f"optim_args: parallel=on (two roles) applies to sampa and asyncsam; "
                                   f"{cfg.method} is data parallel over all ranks: drop parallel=on")
    if world == 1:
        if cfg.ascent_device == "cpu":
            raise SharpnessConfigError(cpu_ascent_world_message(1))
        if cfg.parallel == "on" and cfg.method in ROLE_NAMES:
            raise SharpnessConfigError(
                "optim_args: parallel=on needs 2 processes or more, this run has 1; launch with "
                "torchrun --nproc_per_node 2 (or accelerate launch --num_processes 2), or use parallel=auto")
        return ParallelPlan(timeout_s=timeout_s)
    backend = device_backend(device)
    if backend not in SUPPORTED_BACKENDS:
        raise SharpnessConfigError(f"sam_hf runs on the gloo and nccl backends; this run's {device.type} tensors go "
                                   f"through {backend!r}: add --ddp_backend gloo (CPU) or nccl (GPUs)")
    atexit.unregister(_destroy_process_group)  # registered once, however many trainers a script builds
    atexit.register(_destroy_process_group)
    # TrainingArguments gives a CPU process's group no timeout (gloo's 30 min default): let --ddp_timeout bound
    # gloo's own waits on every rank, as it does on GPU ranks
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:
        set_timeout(datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    staging = torch.device("cpu") if backend == "gloo" else device
    kinds: list[str] = [""] * world
    dist.all_gather_object(kinds, device.type)
    mixed = _check_devices(cfg, kinds, backend)
    base = dict(world_size=world, rank=rank, timeout_s=timeout_s, staging_device=staging, mixed_devices=mixed,
                exchange_dtype=cfg.exchange_dtype)
    if cfg.method not in ROLE_NAMES:
        return ParallelPlan(mode="data", **base)
    roles = cfg.parallel == "on" or (cfg.parallel == "auto" and world % 2 == 0)
    if cfg.method == "asyncsam" and cfg.parallel == "auto" and world != 2:
        roles = False
    if not roles:
        if cfg.parallel == "auto" and rank == 0:  # once, not once per rank
            logger.warning("sam_hf: %s on %d processes runs data parallel (both passes on every rank); "
                           "role-parallel needs %s", cfg.method, world,
                           "2 processes (or parallel=on on an even number)" if cfg.method == "asyncsam"
                           else "an even number of processes")
        return ParallelPlan(mode="data", **base)
    if world % 2:
        raise SharpnessConfigError(
            f"optim_args: parallel=on splits the ranks into two roles, but the world size is {world} (odd); "
            f"use {world - 1} or {world + 1} processes, or parallel=off to run both passes on every rank")
    from torch.distributed.device_mesh import init_device_mesh

    k = world // 2
    mesh = init_device_mesh(staging.type, (2, k), mesh_dim_names=("role", "dp"))
    role, dp_rank = mesh.get_local_rank("role"), mesh.get_local_rank("dp")
    return ParallelPlan(mode="roles", role=role, dp_rank=dp_rank, dp_size=k, mesh=mesh, dp_group=mesh.get_group("dp"),
                        peer=int(mesh.mesh[1 - role, dp_rank]), **base)


def _check_devices(cfg: SharpnessConfig, kinds: list[str], backend: str) -> bool:
    """Every rank on the same device kind, or the one mix sam_hf supports (ascent_device=cpu). Returns whether
    the replicas may differ by round-off: with ascent_device=cpu, even where both ranks happen to be CPUs."""
    mixed = len(set(kinds)) > 1
    if cfg.ascent_device != "cpu":
        if mixed:
            raise SharpnessConfigError(
                f"sam_hf: the ranks run on different device kinds {kinds}; every rank must take the same optimizer "
                "step, so put them on one kind, or use asyncsam with ascent_device=cpu (only rank 1 on the CPU)")
        return False
    if len(kinds) != 2:
        raise SharpnessConfigError(cpu_ascent_world_message(len(kinds)))
    if "gloo" not in backend:
        raise SharpnessConfigError(f"optim_args: ascent_device=cpu needs --ddp_backend gloo (NCCL cannot reach a CPU "
                                   f"rank), this run uses {backend!r}; add --ddp_backend gloo")
    if kinds[1] != "cpu":
        raise SharpnessConfigError(
            f"optim_args: ascent_device=cpu, but rank 1 (the ascent rank) runs on {kinds[1]}; start the script "
            "through `sam-hf launch` (or -m sam_hf.launch), which places it, or call "
            "sam_hf.place_ascent_rank(optim, optim_args, 'gloo') before building TrainingArguments")
    return True


EXIT_GRACE_S = 5.0  # after a peer failure, time left for the error to unwind before the process is ended


def _wait(work, plan: ParallelPlan, what: str) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=plan.timeout_s))
    except Exception as exc:  # gloo/nccl raise RuntimeError subclasses with transport details
        # The abandoned collective keeps the process group's threads busy, and tearing the group down at exit
        # would wait on them: a C-level watchdog ends the process if the error has not done so in time.
        faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True)
        raise PeerFailure(
            f"sam_hf: rank {plan.rank} lost its peers during {what}: a process died or did not answer within "
            f"{plan.timeout_s:.0f} s (--ddp_timeout). Cause reported by torch.distributed: {exc}") from exc


@torch.no_grad()
def all_reduce_grads_(params: list[torch.Tensor], plan: ParallelPlan, what: str) -> None:
    """Average every parameter's `.grad` over all ranks, in place (data-parallel mode).

    One small all-reduce of has-gradient flags first: a parameter no rank has a gradient for keeps None, one that
    only some ranks have one for gets zeros on the others. Then the gradients in buckets (`_mean_`): an fp32
    gradient that fills a bucket alone is reduced where it lies, the rest through one bucket-sized fp32 staging
    buffer at a time, so the reduction never holds a second copy of all the gradients (a low-precision gradient
    is still averaged in fp32)."""
    flags = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float32,
                         device=plan.staging_device)
    _wait(dist.all_reduce(flags, async_op=True), plan, what)
    for p, f in zip(params, flags.tolist()):
        if p.grad is None and f > 0:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
    _mean_([p.grad for p in params if p.grad is not None], plan, what, None, plan.world_size)


@torch.no_grad()
def take_grads(params: list[torch.Tensor], scale: float) -> list[torch.Tensor | None]:
    """The gradients a pass left in `.grad`, taken out as unscaled fp32 (None where a parameter got none).

    An fp32 contiguous `.grad` is handed over as it is, divided by `scale` in place (no copy); any other is
    converted once. `.grad` is cleared: the tensors now belong to the caller (the method's state, the exchange's
    send buffers, the next `.grad`)."""
    out = []
    for p in params:
        g, p.grad = p.grad, None
        if g is not None:
            g = g.detach()
            if g.dtype != torch.float32 or not g.is_contiguous():
                g = g.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            if scale != 1.0:
                g.div_(scale)
        out.append(g)
    return out


DP_BUCKET_BYTES = 32 * 2**20  # a gradient all-reduce stages at most this much at a time
BUCKET_SHARE = 16  # ... and at most this fraction of all the gradients' bytes
SMALL_NUMEL = 16384  # gradients of fewer elements (biases, norms) cross the link together, in one message


def _post(ops: list) -> list:
    """Post point-to-point operations as one batch (NCCL needs the sends and receives of a pair grouped)."""
    return dist.batch_isend_irecv(ops) if ops else []


def _mean_(tensors: list[torch.Tensor], plan: ParallelPlan, what: str, group, size: int) -> None:
    """Average `tensors` in place over `group` (of `size` ranks; None: all ranks), in buckets of at most
    DP_BUCKET_BYTES and at most 1/BUCKET_SHARE of all the bytes (so the staging buffer is a small fraction of
    a copy even for a small model): an fp32 contiguous tensor on the staging device that fills a bucket alone is
    reduced where it lies, without a copy; the others go through an fp32 staging buffer and are copied back."""
    bucket: list[torch.Tensor] = []
    nbytes = 0
    cap = min(DP_BUCKET_BYTES, sum(t.numel() for t in tensors) * 4 // BUCKET_SHARE)

    def in_place(t):
        return t.dtype == torch.float32 and t.is_contiguous() and t.device == plan.staging_device

    def flush():
        if not bucket:
            return
        if len(bucket) == 1:  # reduced where it lies, or one fp32 staging copy
            flat = bucket[0] if in_place(bucket[0]) else bucket[0].to(
                plan.staging_device, torch.float32, copy=True, memory_format=torch.contiguous_format).reshape(-1)
        else:
            flat = torch.cat([t.reshape(-1).to(plan.staging_device, torch.float32) for t in bucket])
        _wait(dist.all_reduce(flat, group=group, async_op=True), plan, what)
        flat.div_(size)
        if flat is not bucket[0]:
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        bucket.clear()

    for t in tensors:
        if bucket and nbytes + t.numel() * 4 > cap:
            flush()
            nbytes = 0
        bucket.append(t)
        nbytes += t.numel() * 4
    flush()


def _small_ones(like: list[torch.Tensor]) -> list[bool]:
    """Which gradients travel in the shared small message: those under SMALL_NUMEL elements, in order, while the
    message stays within 1/64 of all trainable elements (so its send and receive copies stay negligible)."""
    room = sum(p.numel() for p in like) // 64
    out = []
    for p in like:
        take = p.numel() < SMALL_NUMEL and p.numel() <= room
        room -= p.numel() if take else 0
        out.append(take)
    return out


def exchange(plan: ParallelPlan, grads: list[torch.Tensor | None], like: list[torch.Tensor], scale: float,
             extras: dict[str, float], extra_keys: tuple[str, ...], step: int, method: str,
             into: list[torch.Tensor | None] | None = None, dtype: str | None = None):
    """The role exchange: returns (role 0's gradients, role 1's gradients, merged extras), dp-averaged and
    unscaled fp32, on every rank. `grads` are this rank's `.grad` tensors (scaled by `scale`), the params' `like`.

    Each gradient crosses the link once, point to point between the paired ranks (0, i) and (1, i), and lands
    where it is used. This rank's own slot is its `.grad` tensors themselves, unscaled in place (`take_grads`);
    the other role's gradients are received straight into `into`, the buffers of the method state this rank has
    spent (SAMPa's g_t, Asynchronous SAM's a_(t-1)), allocated only where there is none to reuse. With k > 1
    ranks per role, the own slot is first averaged in place over the role's k dp ranks. A small message ahead
    carries the has-gradient flags and the scalar extras, so a parameter that got no gradient sends nothing; the
    small gradients (`_small_ones`: biases, norms) travel together in one message, so the per-message cost is
    paid about once per large tensor.

    `dtype="bf16"` (default: the plan's, optim_args exchange_dtype=bf16; for bandwidth-bound links) sends bf16
    copies, and each rank rounds its own gradients the same way, so the ranks still combine identical values and
    stay replicas (the result is then SAMPa / Asynchronous SAM with bf16-rounded gradients, not bit for bit the
    1-process run).
    """
    what = f"the {method} exchange at step {step} (this rank: {ROLE_NAMES[method][plan.role]})"
    n = len(like)
    if any(g is not p.grad for g, p in zip(grads, like)):
        raise ValueError("exchange: `grads` must be the `.grad` tensors of `like` (it takes them over)")
    own = take_grads(like, scale)
    sharded = sharding.has_sharded_params(like)
    if sharded:  # FSDP2: each role is sharded over its k ranks; rank (0, i) and (1, i) hold the same shard
        own_dt, like_dt, into_dt = own, like, into
        own, like = [None if g is None else sharding.local(g) for g in own], [sharding.local(p) for p in like]
        into = None if into is None else [None if b is None else sharding.local(b) for b in into]
    meta = torch.zeros(n + len(extra_keys), dtype=torch.float64)
    meta[:n] = torch.tensor([float(g is not None) for g in own], dtype=torch.float64)
    meta[n:] = torch.tensor([float(extras.get(k, 0.0)) for k in extra_keys], dtype=torch.float64)
    meta = meta.to(plan.staging_device)
    if plan.dp_size > 1:  # average the role's k shards first: flags (any rank's), extras, gradients
        _wait(dist.all_reduce(meta, group=plan.dp_group, async_op=True), plan, what)
        meta[n:] /= plan.dp_size
        if not sharded:  # FSDP2's reduce-scatter has already averaged each shard over the role's k ranks
            flags = meta[:n].tolist()
            own = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) if g is None and f > 0 else g
                   for g, p, f in zip(own, like, flags)]
            _mean_([g for g in own if g is not None], plan, what, plan.dp_group, plan.dp_size)
    theirs_meta = torch.empty_like(meta)
    for work in _post([dist.P2POp(dist.isend, meta, plan.peer), dist.P2POp(dist.irecv, theirs_meta, plan.peer)]):
        _wait(work, plan, what)
    flags = theirs_meta[:n].tolist()
    low = torch.bfloat16 if (dtype or plan.exchange_dtype) == "bf16" else None
    staging = plan.staging_device
    wire_dtype = low or torch.float32
    small = _small_ones(like)
    ops, sent, landing = [], [], []  # landing: (received tensor, where it goes) where the two differ
    theirs: list[torch.Tensor | None] = []

    def receive_buffer(i, p):
        buf = into[i] if into is not None and i < len(into) else None
        if buf is None or buf.shape != p.shape or buf.dtype != torch.float32 or not buf.is_contiguous() \
                or buf.device != p.device:
            buf = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        return buf

    with torch.no_grad():
        if low is not None:  # this rank combines exactly what the peer receives
            for g in own:
                if g is not None:
                    g.copy_(g.to(low))
        # the small gradients (biases, norms) travel together, in one message after the large ones
        mine_small = [g.reshape(-1) for g, s in zip(own, small) if g is not None and s]
        for i, (g, p) in enumerate(zip(own, like)):
            if g is not None and not small[i]:
                out = g if low is None and g.device == staging else g.to(staging, wire_dtype)
                sent.append(out)
                ops.append(dist.P2POp(dist.isend, out, plan.peer, tag=i + 1))
            if flags[i] > 0:
                buf = receive_buffer(i, p)
                theirs.append(buf)
                if small[i]:
                    continue
                wire = buf
                if low is not None or buf.device != staging:
                    wire = torch.empty(p.shape, dtype=wire_dtype, device=staging)
                    landing.append((wire, buf))
                ops.append(dist.P2POp(dist.irecv, wire, plan.peer, tag=i + 1))
            else:
                theirs.append(None)
        if mine_small:
            out = torch.cat(mine_small).to(staging, wire_dtype)
            sent.append(out)
            ops.append(dist.P2POp(dist.isend, out, plan.peer, tag=n + 1))
        their_small = [t for t, s in zip(theirs, small) if t is not None and s]
        if their_small:
            wire = torch.empty(sum(t.numel() for t in their_small), dtype=wire_dtype, device=staging)
            ops.append(dist.P2POp(dist.irecv, wire, plan.peer, tag=n + 1))
            offset = 0
            for t in their_small:
                landing.append((wire[offset:offset + t.numel()], t.view(-1)))
                offset += t.numel()
        into = None  # the buffers that were not reused are freed with it
        for work in _post(ops):
            _wait(work, plan, what)
        del sent
        for wire, buf in landing:
            buf.copy_(wire)
    merged_values = (meta[n:] + theirs_meta[n:]).tolist()
    merged = dict(zip(extra_keys, merged_values))
    if sharded:  # the received shards become DTensors laid out as the parameters (the reused buffers already are)
        own = own_dt
        theirs = [None if t is None else _as_dtensor(t, p, into_dt[i] if into_dt is not None and i < len(into_dt)
                                                     else None) for i, (t, p) in enumerate(zip(theirs, like_dt))]
    return (own, theirs, merged) if plan.role == 0 else (theirs, own, merged)


def _as_dtensor(shard: torch.Tensor, param, reused):
    """`shard` as a DTensor sharded like `param`: `reused` itself where the shard was received into its buffer."""
    if reused is not None and sharding.local(reused) is shard:
        return reused
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def role_step(plan: ParallelPlan, method, batches, passes, step: int):
    """One role-parallel step: this rank's pass, the exchange, and the method's combination of the two gradients
    (the same `StepResult` on both roles). `passes` runs forward + backward as the host's loop does."""
    scale = passes.loss_scale()
    extras = method.role_pass(plan.role, batches, passes)
    start = time.perf_counter()
    # the other role's gradient lands in the buffers of the method state this rank has spent
    g0, g1, merged = exchange(plan, [p.grad for p in method.params], method.params, scale, extras,
                              method.EXTRA_KEYS, step, method.config.method, into=method.receive_buffers())
    exchange_seconds = time.perf_counter() - start
    result = method.finish(g0, g1, batches, merged, scale)
    result.metrics["sam/exchange_seconds"] = exchange_seconds
    return result


MIXED_RTOL = 1e-5  # CPU and GPU optimizer steps on the same gradients differ by round-off only


def check_replicas(plan: ParallelPlan, params: list[torch.Tensor], step: int) -> None:
    """Compare a float64 checksum of the weights over all ranks; a mismatch is an error, not a silent drift.

    With mixed devices the ranks' round-off differs: the checksums must agree to MIXED_RTOL, and rank 0's
    weights are then copied to the others. Under FSDP2 (role mode) each rank checksums its shard, which must
    equal the shard of the role-0 rank with the same dp index."""
    with torch.no_grad():
        shards = [sharding.local(p.detach()) for p in params]
        s1 = sum((p.double().sum() for p in shards), torch.zeros((), dtype=torch.float64))
        s2 = sum((p.double().pow(2).sum() for p in shards), torch.zeros((), dtype=torch.float64))
    mine = torch.stack([s1.cpu(), s2.cpu()]).to(plan.staging_device)
    gathered = [torch.zeros_like(mine) for _ in range(plan.world_size)]
    _wait(dist.all_gather(gathered, mine, async_op=True), plan, f"the replica check at step {step}")
    sharded = sharding.has_sharded_params(params)
    numel = sum(p.numel() for p in shards)  # the same on every rank compared (the same shard layout)
    layout = plan.mesh.mesh.flatten().tolist() if sharded else None  # row 0 (role 0) first
    for rank, other in enumerate(gathered):
        ref_rank = layout[layout.index(rank) % plan.dp_size] if sharded else 0
        ref = gathered[ref_rank]
        # |sum| <= sqrt(n * sum of squares): scale both checksums' tolerances by what they can reach
        tol = torch.stack([(numel * ref[1]).sqrt(), ref[1]]) * (MIXED_RTOL if plan.mixed_devices else 0.0)
        if not bool(((other - ref).abs() <= tol).all()):
            raise PeerFailure(
                f"sam_hf: replicas diverged at step {step}: rank {rank}'s weight checksum {other.tolist()} != "
                f"rank {ref_rank}'s {ref.tolist()}{' (the same shard)' if sharded else ''}. Every rank must take "
                "the same optimizer step; something changed the weights on one rank only (a callback, a "
                "non-deterministic kernel, or a mixed device setup).")
    if plan.mixed_devices:
        broadcast_tensors(plan, params, 0, f"the weight re-sync at step {step}")


BROADCAST_BUCKET_BYTES = 256 * 2**20  # as DDP's start-up broadcast: a large model never needs a second copy at once


def broadcast_tensors(plan: ParallelPlan, tensors: list[torch.Tensor], src: int, what: str, group=None) -> None:
    """Copy rank `src`'s values of `tensors` to every rank of `group` (default: all) in place: one broadcast per
    dtype and bucket."""
    open_buckets: dict[torch.dtype, tuple[list[torch.Tensor], int]] = {}
    buckets: list[list[torch.Tensor]] = []
    for t in tensors:
        bucket, size = open_buckets.get(t.dtype, (None, 0))
        if bucket is None or size >= BROADCAST_BUCKET_BYTES:
            bucket, size = [], 0
            buckets.append(bucket)
        bucket.append(t)
        open_buckets[t.dtype] = (bucket, size + t.numel() * t.element_size())
    for bucket in buckets:
        flat = torch.cat([t.detach().reshape(-1).to(plan.staging_device) for t in bucket])
        _wait(dist.broadcast(flat, src=src, group=group, async_op=True), plan, what)
        offset = 0
        with torch.no_grad():
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_buffers(plan: ParallelPlan, modules: list[torch.nn.Module], src: int, step: int) -> None:
    """Give every rank the BatchNorm statistics of the rank that ran the clean pass."""
    buffers = [b for module in modules for _, b in module.named_buffers(recurse=False) if b is not None]
    broadcast_tensors(plan, buffers, src, f"the BatchNorm broadcast at step {step}")
