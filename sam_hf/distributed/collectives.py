"""Collectives with a deadline: gradient averaging, broadcasts, the replica check.

Every collective here waits at most the plan's `timeout_s` (Trainer's `ddp_timeout`): a peer that died or hangs
ends training with an error naming the step and what was being exchanged, never a silent hang. Gradients are
averaged in place, in buckets, so a reduction never holds a second copy of all the gradients.
"""

from __future__ import annotations

import datetime
import faulthandler

import torch
import torch.distributed as dist

from . import dtensor
from .plan import ParallelPlan


class PeerFailure(RuntimeError):
    """A peer process died, hung past the timeout, or drifted from the others."""


EXIT_GRACE_S = 5.0  # after a peer failure, time left for the error to unwind before the process is ended


def wait(work, plan: ParallelPlan, what: str) -> None:
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
def all_reduce_grads_(params: list[torch.Tensor], plan: ParallelPlan, what: str, group=None,
                      size: int | None = None) -> None:
    """Average every parameter's `.grad` over all ranks (or over `group`, of `size` ranks), in place (data-parallel
    mode).

    One small all-reduce of has-gradient flags first: a parameter no rank has a gradient for keeps None, one that
    only some ranks have one for gets zeros on the others. Then the gradients in buckets (`_mean_`): an fp32
    gradient that fills a bucket alone is reduced where it lies, the rest through one bucket-sized fp32 staging
    buffer at a time, so the reduction never holds a second copy of all the gradients (a low-precision gradient
    is still averaged in fp32)."""
    flags = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float32,
                         device=plan.staging_device)
    wait(dist.all_reduce(flags, group=group, async_op=True), plan, what)
    for p, f in zip(params, flags.tolist()):
        if p.grad is None and f > 0:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
    mean_([p.grad for p in params if p.grad is not None], plan, what, group, size or plan.world_size)


DP_BUCKET_BYTES = 32 * 2**20  # a gradient all-reduce stages at most this much at a time


BUCKET_SHARE = 16  # ... and at most this fraction of all the gradients' bytes


def post(ops: list) -> list:
    """Post point-to-point operations as one batch (NCCL needs the sends and receives of a pair grouped)."""
    return dist.batch_isend_irecv(ops) if ops else []


def mean_(tensors: list[torch.Tensor], plan: ParallelPlan, what: str, group, size: int) -> None:
    """Average `tensors` in place over `group` (of `size` ranks; None: all ranks), in buckets of at most
    DP_BUCKET_BYTES and at most 1/BUCKET_SHARE of all the bytes (so the staging buffer is a small fraction of
    a copy even for a small model): an fp32 contiguous tensor on the staging device that fills a bucket alone is
    reduced where it lies, without a copy; the others go through an fp32 staging buffer and are copied back."""
    bucket: list[torch.Tensor] = []
    nbytes = 0
    cap = min(DP_BUCKET_BYTES, sum(t.numel() for t in tensors) * 4 // BUCKET_SHARE)

    def in_place(t):
        return t.dtype in (torch.float32, torch.float64) and t.is_contiguous() and t.device == plan.staging_device

    def flush():
        if not bucket:
            return
        # float64 gradients (a float64 model) are averaged in float64, everything else in fp32
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in bucket) else torch.float32
        if len(bucket) == 1:  # reduced where it lies, or one staging copy
            flat = bucket[0] if in_place(bucket[0]) else bucket[0].to(
                plan.staging_device, dtype, copy=True, memory_format=torch.contiguous_format).reshape(-1)
        else:
            flat = torch.cat([t.reshape(-1).to(plan.staging_device, dtype) for t in bucket])
        wait(dist.all_reduce(flat, group=group, async_op=True), plan, what)
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


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor, plan: ParallelPlan, what: str) -> torch.Tensor:
    """Every rank's `tensor` concatenated along the first dimension, in rank order (ranks may hold different
    numbers of rows: the row counts are gathered first and the tensors padded to the largest)."""
    device = plan.staging_device
    local = tensor.detach().to(device)
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(plan.world_size)]
    wait(dist.all_gather(counts, count, async_op=True), plan, what)
    rows = [int(c) for c in counts]
    padded = local.new_zeros((max(rows), *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in rows]
    wait(dist.all_gather(parts, padded.contiguous(), async_op=True), plan, what)
    return torch.cat([p[:n] for p, n in zip(parts, rows)]).to(tensor.device)


MIXED_RTOL = 1e-5  # CPU and GPU optimizer steps on the same gradients differ by round-off only


def check_replicas(plan: ParallelPlan, params: list[torch.Tensor], step: int) -> None:
    """Compare a float64 checksum of the weights over all ranks; a mismatch is an error, not a silent drift.

    With mixed devices the ranks' round-off differs: the checksums must agree to MIXED_RTOL, and rank 0's
    weights are then copied to the others. Under FSDP2 (role mode) each rank checksums its shard, which must
    equal the shard of the role-0 rank with the same dp index."""
    with torch.no_grad():
        shards = [dtensor.local(p.detach()) for p in params]
        s1 = sum((p.double().sum() for p in shards), torch.zeros((), dtype=torch.float64))
        s2 = sum((p.double().pow(2).sum() for p in shards), torch.zeros((), dtype=torch.float64))
    mine = torch.stack([s1.cpu(), s2.cpu()]).to(plan.staging_device)
    gathered = [torch.zeros_like(mine) for _ in range(plan.world_size)]
    wait(dist.all_gather(gathered, mine, async_op=True), plan, f"the replica check at step {step}")
    sharded = dtensor.has_sharded_params(params)
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
        wait(dist.broadcast(flat, src=src, group=group, async_op=True), plan, what)
        offset = 0
        with torch.no_grad():
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_buffers(plan: ParallelPlan, modules: list[torch.nn.Module], src: int, step: int) -> None:
    """Give every rank the BatchNorm statistics of the rank that ran the clean pass."""
    buffers = [b for module in modules for _, b in module.named_buffers(recurse=False) if b is not None]
    broadcast_tensors(plan, buffers, src, f"the BatchNorm broadcast at step {step}")

