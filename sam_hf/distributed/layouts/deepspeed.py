"""DeepSpeed ZeRO 1, 2 and 3: the methods on this rank's fp32 partitions, the engine stepped once per step.

Under `--deepspeed ds_config.json` (or accelerate's DeepSpeed plugin) the engine owns the backward pass, the
gradient reduction, the loss scale and the optimizer step, and `p.grad` is None after every backward: ZeRO-1/2
reduce the gradient into this rank's partition at an accumulation boundary, ZeRO-3 also partitions the weights.
The window a sharpness-aware method needs between its passes exists in every stage, without changing DeepSpeed:

* **A pass ends on a boundary.** Each backward goes straight to the engine
  (`set_gradient_accumulation_boundary(last)`, `engine.backward(loss, scale_wrt_gas=False)`: Trainer's units);
  after the pass's last one, the averaged gradient partition (still loss-scaled) is copied out of the
  optimizer's buffers into the method's parameters' `.grad`. The next pass starts from a fresh window (what
  the optimizer's overflow branch clears, without stepping; ZeRO-3 also zeroes its persistent partitions).
* **The method's parameters are slices of the fp32 master partitions** (the base optimizer's own parameters,
  one flat tensor per ZeRO group, per sub-group under ZeRO-3): one 1-D view per parameter slice the rank holds,
  named by its parameter, with its own `.grad` (DeepSpeed's offload buffer in the master's `.grad` is never
  touched). Everything elementwise (the perturbation, its backup, ASAM's T, SAMPa's lookahead and combination,
  method state) works on this rank's slices, parameter by parameter as in one process: extra memory per rank is
  about the one-process extra divided by the number of ranks. Norms, dot products and finiteness are one
  all-reduce over DeepSpeed's data-parallel group (each element lives on one rank). Which slice of which
  parameter a partition holds (`fragments`) comes from the flat buffers' own layout, not DeepSpeed's
  `_hp_mapping`, which is wrong under ZeRO-1/2 `round_robin_gradients` (see tests).
* **The forward sees the masters.** A method changes the weights in place (x + e, SAMPa's lookahead y, the
  restore by copy); before a pass's first forward, masters changed since the module's weights were last cast
  from them (tensor version counters) are published the way the optimizer step publishes them (ZeRO-1/2: the
  bit16 partition and the all-gather; ZeRO-3: the bit16 partitions and the persistent parameters). In
  fp16/bf16 the forward sees cast(x + e), computed in fp32. A restore needs no publication before an applied
  step (the step publishes the new weights); after a skipped one it is published at once.
* **One engine step.** `end_step` writes the method's final gradient into the buffers the step reads (unless it
  is the last pass's gradient, untouched) and calls `engine.step()` with the boundary set: clipping
  (`gradient_clipping`), the fp16 loss scale and its overflow skip, DeepSpeed's scheduler and `global_steps` are
  plain DeepSpeed's, and so is the `grad_norm` Trainer logs. A step without an update (SAMPa's first) is not
  stepped at all and is reported to Trainer as skipped, so its learning-rate schedule waits too.

Data parallel only: SAMPa and Asynchronous SAM run both passes on every rank (`parallel=auto` -> off). One
engine's ZeRO group spans every rank, so two roles would need two engines and a role exchange of partitions:
`parallel=on` is refused, as is `sync_ascent=false` (a rank holds only its partition of the averaged gradient)
and `ascent_device=cpu`. Method state is checkpointed per rank beside DeepSpeed's own checkpoint
(`sam_hf_state.rank{r}.pt`, world size and partition sizes recorded).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...config import SharpnessConfigError
from .. import collectives
from ...tensors import norm_parameters
from ..checkpoint import RANK_FILE, read_state_file
from .base import Layout
from .data_parallel import DataParallel


@dataclass
class Fragment:
    """`param.view(-1)[param_start:param_start + numel]` is `partition[group][flat_start:flat_start + numel]`."""
    param: torch.nn.Parameter
    group: int
    flat_start: int
    param_start: int
    numel: int


def _get(config: dict, path: str, default=None):
    node = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _on(value) -> bool:
    return value not in (None, False, 0, "none", "None", "false", "False", "auto")


def check_config(config: dict, method: str) -> None:
    """Refuse, before training, what the layout does not run, naming the ds_config key and what to use instead."""
    def refuse(key, value, why, instead):
        raise SharpnessConfigError(f"optim={method} under DeepSpeed: {key}={value!r} {why}; {instead}")

    stage = _get(config, "zero_optimization.stage", 0)
    if stage not in (1, 2, 3):
        refuse("zero_optimization.stage", stage, "is not ZeRO (stage 0 is DeepSpeed's own data parallelism, "
               "whose gradients sam_hf does not reach)", "set zero_optimization.stage to 1, 2 or 3, or drop "
               "--deepspeed and launch with torchrun (sam_hf then averages the gradients itself)")
    if "optimizer" in config:
        refuse("optimizer", _get(config, "optimizer.type"), "makes DeepSpeed build the optimizer, so Trainer never "
               "builds the base optimizer the method runs on", "remove the ds_config's optimizer section and pick "
               "the base with optim_args base=... (Trainer then builds it and DeepSpeed wraps it)")
    for key in ("pipeline.stages", "pipeline_parallel_size"):
        if _on(_get(config, key)) and _get(config, key) != 1:
            refuse(key, _get(config, key), "asks for pipeline parallelism, whose engine runs forward, backward and "
                   "step in one train_batch() call: there is no window between two passes", "use ZeRO-3")
    zenflow = _get(config, "zero_optimization.zenflow")
    if zenflow:
        refuse("zero_optimization.zenflow", zenflow, "overlaps selective, asynchronous optimizer updates with the next "
               "passes, so a step no longer uses one final gradient at one point", "use plain offload_optimizer "
               "(ZeRO-1/2) or none")
    for key in ("zero_optimization.offload_optimizer.super_offload", "zero_optimization.super_offload"):
        if _on(_get(config, key)):
            refuse(key, _get(config, key), "runs the optimizer step asynchronously beside the next passes",
                   "drop super_offload (plain offload_optimizer with device cpu works under ZeRO-1/2)")
    for what in ("offload_optimizer", "offload_param"):
        device = _get(config, f"zero_optimization.{what}.device", "none")
        if device == "nvme":
            refuse(f"zero_optimization.{what}.device", device, "swaps the partitions sam_hf works on to NVMe "
                   "(not supported yet)", "use offload_optimizer with device cpu under ZeRO-1/2, or no offload "
                   "under ZeRO-3")
        if _on(device) and (stage == 3 or what == "offload_param"):
            refuse(f"zero_optimization.{what}.device", device, f"under ZeRO-{stage} keeps the fp32 partitions "
                   "(and the weights) off the device in a layout sam_hf does not support yet", "use ZeRO-3 without "
                   "offload, or ZeRO-2 with offload_optimizer device cpu")
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients"):
        if _on(_get(config, f"zero_optimization.{key}")):
            refuse(f"zero_optimization.{key}", True, "(ZeRO++) quantizes the weights or gradients sam_hf perturbs "
                   "and reduces, lossily and through CUDA-only kernels never run here", "drop it (plain ZeRO-3)")
    hpz = _get(config, "zero_optimization.zero_hpz_partition_size", 1)
    if _on(hpz) and hpz != 1:
        refuse("zero_optimization.zero_hpz_partition_size", hpz, "(ZeRO++ hierarchical partitioning) keeps a "
               "secondary copy of the weights that is tested only in the degenerate case hpz = world size",
               "drop it (plain ZeRO-3)")
    tp = _get(config, "tensor_parallel.autotp_size", 1)
    if _on(tp) and tp != 1:
        refuse("tensor_parallel.autotp_size", tp, "partitions the weights over a model-parallel group too, so norms "
               "and overflow checks are also reduced over it (not supported)", "drop tensor parallelism (ZeRO-3 "
               "partitions the weights over the data-parallel ranks)")
    sp = _get(config, "sequence_parallel_size", 1)
    if _on(sp) and sp != 1:
        refuse("sequence_parallel_size", sp, "(Ulysses) splits each sequence over a group whose gradients and "
               "norms are reduced in other groups (not supported)", "drop sequence parallelism")
    for key in ("bf16.bf16_master_weights_and_grads", "fp16.fp16_master_weights_and_grads",
                "zero_optimization.low_precision_master_weights_and_grads"):
        if _on(_get(config, key)):
            refuse(key, True, "keeps the master weights in 16 bits, which sam_hf's perturbation and restore have "
                   "not been checked with", "drop it (fp32 master weights, DeepSpeed's default)")


# how many tensors share a storage (a private torch API: without it every gradient is exposed as a copy)
_use_count = (lambda storage: torch._C._storage_Use_Count(storage._cdata)) \
    if hasattr(torch._C, "_storage_Use_Count") else None


def _process_group_rank(group) -> int:
    return dist.get_rank(group=group) if dist.is_initialized() else 0


class DeepSpeed(Layout):
    """DeepSpeed ZeRO stage 1, 2 or 3, data parallel over every rank (see the module docstring)."""

    sharded = True  # method state lives on this rank's partition
    reduces_every_pass = True  # the engine averages every pass's gradient over the ranks
    owns_step = True  # the engine steps the base optimizer (end_step); Trainer gets the plain base optimizer
    whole_params = False  # the method's parameters are the slices of parameters this rank's partitions hold

    def __init__(self, plan=None):
        super().__init__(plan)
        self.config: dict = {}
        self.engine = None
        self.opt = None  # DeepSpeed's ZeRO optimizer
        self.group = None  # its data-parallel process group
        self.stage = None
        self._masters: list[torch.Tensor] = []  # DeepSpeed's fp32 partitions (the base optimizer's parameters)
        self._chunks: list[tuple[int, int, int]] = []  # (partition, start, numel) of each parameter slice
        self._params: list[torch.Tensor] = []  # those slices of the masters (1-D views): the method's parameters
        self._names: list[str] = []  # their parameters' names
        self._published: list[int] | None = None  # the masters' versions when the module weights were cast from them
        self._open = False  # a pass has started (its first forward ran) and not ended
        self._dirty = False  # an ended pass's gradient still sits in DeepSpeed's buffers
        self._exposed: list = []  # (weak reference, version) of each `.grad` the last pass left
        self._shared: dict = {}  # DeepSpeed buffers those `.grad`s are views of: (storage, use count, views)

    # every rank holds its own data shard, as under DDP
    data_rank = DataParallel.data_rank
    gather_data_shards = DataParallel.gather_data_shards

    def describe(self) -> str:
        stage = self.stage if self.stage is not None else _get(self.config, "zero_optimization.stage", "?")
        return f"DeepSpeed ZeRO-{stage} ({self.world_size} process{'es' if self.world_size != 1 else ''})"

    # ---- set-up ----------------------------------------------------------------------------------------------
    def check_trainer(self, trainer) -> None:
        plugin = trainer.accelerator.state.deepspeed_plugin
        self.config = dict(getattr(plugin, "deepspeed_config", None) or {})
        check_config(self.config, trainer.sharpness_config.method)
        pc = getattr(trainer.accelerator, "parallelism_config", None)
        if pc is not None and (getattr(pc, "sp_size", 1) or 1) > 1:
            raise SharpnessConfigError(
                f"optim={trainer.sharpness_config.method} under DeepSpeed: accelerate's ParallelismConfig sp_size="
                f"{pc.sp_size} (sequence parallelism) reduces gradients and norms in other groups (not supported); "
                "drop it")

    def before_step(self, trainer, model, method) -> None:
        self._attach(trainer.accelerator.deepspeed_engine_wrapped.engine, method)
        self._open = False

    def before_load(self, trainer) -> None:
        self._attach(trainer.accelerator.deepspeed_engine_wrapped.engine, trainer._sharpness_optimizer.method)

    def _attach(self, engine, method) -> None:
        """Bind the method to this engine's partitions (again where DeepSpeed replaced them, e.g. a new engine)."""
        if engine is not self.engine:
            self._check_engine(engine, method.name)
            self.engine, self.opt = engine, engine.optimizer
            self.stage = int(engine.zero_optimization_stage())
            self.group = self.opt.dp_process_group
            self._masters = []
        masters = self._current_masters()
        if len(masters) != len(self._masters) or any(a is not b for a, b in zip(masters, self._masters)):
            self._masters = masters
            # one chunk per parameter slice this rank's partitions hold, in flat order: a 1-D view of the master
            # (its storage and version counter; its own .grad), named by its parameter
            names = {id(p): n for n, p in engine.module.named_parameters()}
            frags = sorted(self.fragments(), key=lambda f: (f.group, f.flat_start))
            self._chunks = [(f.group, f.flat_start, f.numel) for f in frags]
            self._params = [masters[i].detach().view(-1)[a:a + n] for i, a, n in self._chunks]
            self._names = [names.get(id(f.param), "") for f in frags]
            norms = norm_parameters(engine.module)
            self._in_norm = [id(f.param) in norms for f in frags]
            self._published = self._versions()  # DeepSpeed cast the module's weights from them
            self._dirty = False
        if len(method.params) != len(self._params) or any(a is not b for a, b in zip(method.params, self._params)):
            method.bind(self._params, self._names, self._in_norm)
        # the engine clips the final gradient; SAMPa's lookahead clips g_t the same way
        method.max_grad_norm = float(self.engine.gradient_clipping() or 0.0)

    def _check_engine(self, engine, method: str) -> None:
        from deepspeed.runtime.pipe.engine import PipelineEngine

        if isinstance(engine, PipelineEngine):
            raise SharpnessConfigError(
                "sam_hf under DeepSpeed: pipeline parallelism (a PipelineModule) runs forward, backward and step in "
                "one train_batch() call, so there is no window between two passes; use ZeRO-3")
        if getattr(engine, "has_moe_layers", False):
            raise SharpnessConfigError(
                "sam_hf under DeepSpeed: the model has mixture-of-experts layers, whose gradients and norms DeepSpeed "
                "also reduces over expert groups (not supported); train it without DeepSpeed MoE layers")
        check_config(dict(getattr(engine, "config", None) or {}), method)  # the config DeepSpeed really runs

    def _current_masters(self) -> list[torch.Tensor]:
        opt = self.opt
        return list(opt.fp32_partitioned_groups_flat if self.stage == 3 else opt.single_partition_of_fp32_groups)

    @property
    def _offload(self) -> bool:
        return self.stage != 3 and bool(getattr(self.opt, "cpu_offload", False))

    def fragments(self) -> list[Fragment]:
        """Which slice of which module parameter each partition holds, on this rank.

        ZeRO-1/2 from the flat buffers' own layout (`round_robin_bit16_groups`/`offsets`, what the step's
        `_update_model_bit16_weights` uses), not from `param._hp_mapping`: with `round_robin_gradients` and no
        padded parameter, DeepSpeed 0.19.8 links the parameters in their original order onto a buffer laid out in
        round-robin order (`_link_all_hp_params`), so the mapping (and `safe_get_full_fp32_param`) is wrong there.
        ZeRO-3: each parameter's partition (`partition_numel()` elements from rank x numel), in sub-group order."""
        opt, out = self.opt, []
        if self.stage == 3:
            for i, params in enumerate(opt.fp16_groups):
                offset = 0
                for p in params:
                    n = p.partition_numel()
                    group = opt._get_param_partition_group(p) if hasattr(opt, "_get_param_partition_group") \
                        else self.group
                    start = n * _process_group_rank(group)
                    real = max(0, min(n, p.ds_numel - start))
                    if real:
                        out.append(Fragment(p, i, offset, start, real))
                    offset += n
            return out
        for i, (params, offsets) in enumerate(zip(opt.round_robin_bit16_groups, opt.round_robin_bit16_offsets)):
            size = int(opt.partition_size[i])
            lo = size * _process_group_rank(opt.real_dp_process_group[i])
            for p, off in zip(params, offsets):
                start, end = max(off, lo), min(off + p.numel(), lo + size)
                if start < end:
                    out.append(Fragment(p, i, start - lo, start - off, end - start))
        return out

    # ---- arithmetic over the partitions: one all-reduce over DeepSpeed's data-parallel group ---------------------
    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        return t

    def norm(self, tensors):
        # one tensor at a time: `tensors` may be a generator of per-chunk temporaries (ASAM's T d), which a list
        # of them would keep alive all at once (a whole partition)
        squares = [torch.dot(v, v) for v in (t.detach().float().reshape(-1) for t in tensors)]
        if not squares:
            return None
        return self._all_reduce(torch.stack(squares).sum()).sqrt()

    def all_finite(self, tensors) -> bool:
        flags = [torch.isfinite(t).all() for t in tensors if t is not None]
        flag = torch.stack(flags).all().to(torch.int32) if flags else torch.ones((), dtype=torch.int32)
        return bool(self._all_reduce(flag, dist.ReduceOp.MIN))

    def totals(self, *groups, like=(), replicated=None):
        out = torch.stack([torch.stack([v.float() for v in g]).sum() if g else torch.zeros(()) for g in groups])
        return self._all_reduce(out)

    def local(self, t):
        return t

    def gather_rows(self, tensor):
        if not self.distributed:
            return tensor
        return collectives.all_gather_rows(tensor, self.plan, f"the per-example gather at step {self.step_index}")

    def is_whole(self, t) -> bool:
        return False  # every element of a partition lives on this rank only

    # ---- one pass --------------------------------------------------------------------------------------------
    def before_forward(self, backward: bool = True) -> None:
        if self._open or self.engine is None:
            return
        if backward:  # a new pass: a fresh accumulation window
            self._open = True
            if self._dirty:
                self._reset()
        if self._versions() != self._published:
            self._publish()

    def backward(self, loss, last: bool, backward) -> None:
        if self.engine is None:
            return backward(loss)
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)  # Trainer's units: divided by the accumulation steps already
        if last:
            self._expose()
            self._open, self._dirty = False, True

    def loss_scale(self, host_scale: float) -> float:
        return float(self.opt.loss_scale) if self.opt is not None else host_scale

    @torch.no_grad()
    def _expose(self) -> None:
        """The pass's averaged gradient (loss-scaled, fp32) into the method's `.grad`, chunk by chunk, added.

        Where DeepSpeed holds a partition as consecutive fp32 slices of one buffer (ZeRO-1 and ZeRO-3 with
        contiguous gradients) each chunk's `.grad` lies on that buffer's storage, no copy; otherwise (ZeRO-2 fills
        its buffer in backward order, the last rank's padding, offload) a view of one copy of the partition. A
        `.grad` on DeepSpeed's buffer the method still holds when DeepSpeed next uses it (the next pass, the step)
        becomes a copy then (`_detach_exposed`), and the buffer is then no longer held by it."""
        self._exposed, views = [], {}
        flats = [self._read(i) for i in range(len(self._masters))]
        flat = None
        for p, (i, a, n) in zip(self._params, self._chunks):
            flat, shared = flats[i]
            # on DeepSpeed's buffer: a tensor on its storage, not a view; a view keeps its base, and with it the
            # whole buffer, alive after `_detach_exposed` gives it a storage of its own
            g = flat.new_empty(0).set_(flat.untyped_storage(), flat.storage_offset() + a, (n,), (1,)) if shared \
                else flat[a:a + n]
            p.grad = g if p.grad is None else p.grad.add_(g)
            self._exposed.append((weakref.ref(p.grad), p.grad._version))
            if shared and p.grad is g:
                views.setdefault(g.untyped_storage().data_ptr(), [g.untyped_storage(), 0])[1] += 1
            del g
        del flats, flat
        # how many tensors share each buffer now: afterwards only DeepSpeed's own (and none of the method's) may
        self._shared = {ptr: (storage, _use_count(storage), ours) for ptr, (storage, ours) in views.items()}
        del views

    def _read(self, i: int) -> tuple[torch.Tensor, bool]:
        """(partition i's gradient, flat, and whether it is a view of DeepSpeed's buffer)."""
        master = self._masters[i]
        if self._offload:  # the boundary copied it into the master's own .grad, on the offload device
            self.opt._wait_for_offload_copies()
            return master.grad.detach().float().reshape(-1).clone(), False
        views = self._grad_views(i)
        first = views[0]
        consecutive = _use_count is not None and all(
            v.dtype == torch.float32 and v.is_contiguous() and v.device == first.device
            and v.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for v in views) \
            and all(b.storage_offset() == a.storage_offset() + a.numel() for a, b in zip(views, views[1:]))
        if consecutive:
            return torch.as_strided(first, (master.numel(),), (1,), first.storage_offset()), True
        return torch.cat([v.float() for v in views]), False

    def _grad_views(self, i: int) -> list[torch.Tensor]:
        """DeepSpeed's reduced gradient for partition i: 1-D views covering it in order (the step reads them)."""
        views = self.opt.averaged_gradients.get(i)
        if views is None:
            raise RuntimeError("sam_hf: DeepSpeed holds no reduced gradient for the step: a pass ended without an "
                               "accumulation boundary")
        views = [v.view(-1) for v in views]
        total = sum(v.numel() for v in views)
        if total != self._masters[i].numel():
            raise RuntimeError(f"sam_hf: DeepSpeed's gradient partition {i} has {total} elements, its fp32 "
                               f"partition {self._masters[i].numel()}")
        return views

    def _detach_exposed(self) -> None:
        """Before DeepSpeed reuses its gradient buffers: exposed views the method still holds become copies."""
        for ref, _ in self._exposed:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() in self._shared:
                t.data = t.detach().clone()
            del t
        for storage, count, ours in self._shared.values():
            if _use_count(storage) > count - ours:
                raise RuntimeError(
                    "sam_hf: a method kept another tensor on DeepSpeed's gradient buffer (an alias of `.grad` made "
                    "with .detach(), .view() or similar) past the pass that produced it; keep `.grad` itself, or a "
                    "copy, as method state")
        self._exposed, self._shared = [], {}

    @torch.no_grad()
    def _write(self, grads: list) -> None:
        """The gradient the step uses <- `grads` (per chunk, loss-scaled; None: leave that chunk as it is), in
        DeepSpeed's own buffers."""
        for i, master in enumerate(self._masters):
            mine = [(a, n, g) for (j, a, n), g in zip(self._chunks, grads) if j == i and g is not None]
            if not mine:
                continue
            if self._offload:
                flat = master.grad.view(-1)
                for a, n, g in mine:
                    flat[a:a + n].copy_(g.reshape(-1))
                self._refresh_offload_norms(i, flat)
                continue
            views = self._grad_views(i)
            starts = [0]
            for v in views:
                starts.append(starts[-1] + v.numel())
            k = 0
            for a, n, g in mine:  # chunks in flat order: walk the views once
                g = g.reshape(-1)
                while starts[k + 1] <= a:
                    k += 1
                j = k
                while j < len(views) and starts[j] < a + n:
                    lo, hi = max(a, starts[j]), min(a + n, starts[j + 1])
                    views[j][lo - starts[j]:hi - starts[j]].copy_(g[lo - a:hi - a])
                    j += 1

    def _refresh_offload_norms(self, i: int, flat: torch.Tensor) -> None:
        """With offload the step clips with per-parameter norms recorded at the boundary and checks a recorded
        overflow flag (stage_1_and_2.py: set_norm_for_param_grad_in_gpu, update_offload_overflow_tracker): the
        norms recomputed from the written gradient (the flag in `end_step`)."""
        from deepspeed.runtime.zero.utils import get_norm_dtype

        opt = self.opt
        for param in opt.params_in_partition[i]:
            pid = opt.get_param_id(param)
            if pid in opt.norm_for_param_grads:
                _, _, dest, n = opt.grad_position[pid]
                opt.norm_for_param_grads[pid] = flat[dest:dest + n].to(get_norm_dtype()).norm(2)

    def _reset(self) -> None:
        """A fresh accumulation window: the next pass's gradient is not added to the last one.

        ZeRO-1/2: what the step's overflow branch clears, without stepping (stage_1_and_2.py `step`). ZeRO-3: the
        persistent gradient partitions are zeroed and `zero_grad` resets `micro_step_id`, so the next reduction
        copies into them instead of adding (without this, ZeRO-3 SAM would step with the sum of both passes)."""
        self._detach_exposed()
        opt = self.opt
        if self.stage == 3:
            for views in opt.averaged_gradients.values():
                for v in views or []:
                    v.zero_()
            opt.zero_grad(set_to_none=True)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            if self._offload:
                opt.reset_cpu_buffers()
                opt._offload_accumulated_param_ids = set()
            opt.zero_grad(set_to_none=True)
            opt._release_preflattened_grad_buffers()
            for k in list(opt.averaged_gradients.keys()):
                opt.averaged_gradients[k] = None
            for k in list(opt.all_grad_tensors.keys()):
                opt.all_grad_tensors[k] = None
            opt.micro_step_id = INITIAL_MICRO_STEP_ID
        self._dirty = False

    # ---- the weights the forward reads -----------------------------------------------------------------------
    def _versions(self) -> list[int]:
        return [m._version for m in self._masters]

    @torch.no_grad()
    def _publish(self) -> None:
        """The module's weights <- cast(masters), the way the optimizer step publishes them."""
        opt = self.opt
        if self.stage == 3:
            opt._partition_all_parameters()  # nothing gathered stays stale (the step does it first)
            for i, master in enumerate(self._masters):
                opt.fp16_partitioned_groups_flat[i].copy_(master)
                opt._unflatten_partitioned_parameters(i)
            if opt.persistent_parameters:  # kept gathered between forwards: gather them again
                opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
            opt.invalidate_secondary_tensor()
        else:
            from deepspeed.runtime.utils import all_gather_dp_groups

            for i, master in enumerate(self._masters):
                part = opt.parallel_partitioned_bit16_groups[i][_process_group_rank(opt.real_dp_process_group[i])]
                part.copy_(master)
            all_gather_dp_groups(groups_flat=opt.bit16_groups_flat,
                                 partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                                 dp_process_group=opt.real_dp_process_group,
                                 start_alignment_factor=opt.nccl_start_alignment_factor,
                                 allgather_bucket_size=opt.allgather_bucket_size)
            for i in range(len(opt.bit16_groups)):
                opt._update_model_bit16_weights(i)
        self._published = self._versions()

    # ---- the step --------------------------------------------------------------------------------------------
    def end_step(self, method, result) -> None:
        if result.skip_update:  # no update: no engine step; Trainer's scheduler waits as for a skipped step
            self.opt.overflow = True  # what accelerate reports as `optimizer_step_was_skipped`
            self.engine._global_grad_norm = 0.0  # Trainer logs the norm of the (zero) gradient, as in one process
            self._finish(applied=False)
            return
        finals = []
        for p in self._params:  # the final gradients, not held through the step
            g, p.grad = p.grad, None
            unchanged = g is not None and any(ref() is g and g._version == version for ref, version in self._exposed)
            finals.append(None if unchanged else torch.zeros_like(p) if g is None else g)
            del g
        # views of DeepSpeed's buffers the method keeps (state such as a_t, or a final gradient) become copies
        # before those buffers are written; unchanged chunks hold the last pass's gradient already
        self._detach_exposed()
        self._write(finals)
        if self._offload and any(g is not None for g in finals):  # the overflow flag the step reads, recomputed
            self.opt.local_overflow = not all(bool(torch.isfinite(m.grad).all()) for m in self._masters)
        del finals
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self._dirty = False
        self._finish(applied=self.engine.was_step_applied())

    def _finish(self, applied: bool) -> None:
        for p in self._params:
            p.grad = None
        self._open = False
        if applied:  # the step cast the module's weights from the updated masters
            self._published = self._versions()
        elif self._versions() != self._published:  # e.g. restored after x + e, then an fp16 overflow skipped
            self._publish()

    @contextlib.contextmanager
    def base_optimizer(self, optimizer):
        """The base torch optimizer DeepSpeed steps, seen from the method's parameters: each chunk in its
        partition's group (ZeRO-3 empties the groups outside its step), with its slice of the partition's state
        (exp_avg, exp_avg_sq: views; the step count shared)."""
        inner = self.opt.optimizer
        view = object.__new__(type(inner))
        view.__dict__.update(inner.__dict__)
        groups = [dict(g, params=[]) for g in inner.param_groups]
        state = {}
        for p, (i, a, n) in zip(self._params, self._chunks):
            master = self._masters[i]
            if self.stage == 3:
                index = self.opt.sub_group_to_group_id[i]
            else:
                index = next((k for k, g in enumerate(inner.param_groups) if any(q is master for q in g["params"])), i)
            groups[index]["params"].append(p)
            if master in inner.state:
                state[p] = {k: v.view(-1)[a:a + n] if torch.is_tensor(v) and v.numel() == master.numel() else v
                            for k, v in inner.state[master].items()}
        view.param_groups, view.state = groups, state
        yield view

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save_state(self, method, checkpoint_dir: str) -> None:
        """This rank's method state beside DeepSpeed's checkpoint, one file per rank: its partitions (SAMPa's g_t,
        Asynchronous SAM's a_(t-1)) and what `prepare_checkpoint` gathered (SAMPa's held batch, all of it).
        DeepSpeed's `client_state` is written by one rank only, so it cannot hold partitions."""
        os.makedirs(checkpoint_dir, exist_ok=True)
        torch.save({"state": method.state_dict(), "world_size": self.world_size, "stage": self.stage,
                    "numels": [m.numel() for m in self._masters], "chunks": [list(c) for c in self._chunks]},
                   os.path.join(checkpoint_dir, RANK_FILE.format(rank=self.plan.rank)))

    def load_state(self, method, checkpoint_dir: str) -> bool:
        path = os.path.join(checkpoint_dir, RANK_FILE.format(rank=self.plan.rank))
        if not os.path.exists(path):
            return False
        saved = read_state_file(path)  # tensors and plain containers only
        now = {"world_size": self.world_size, "stage": self.stage, "numels": [m.numel() for m in self._masters],
               "chunks": [list(c) for c in self._chunks]}
        if any(saved.get(k) != v for k, v in now.items()):
            raise SharpnessConfigError(
                f"sam_hf: the method state in {checkpoint_dir} was saved on {saved.get('world_size')} processes under "
                f"ZeRO-{saved.get('stage')} (partitions {saved.get('numels')}); this run has {now['world_size']} "
                f"under ZeRO-{now['stage']} (partitions {now['numels']}): resume with the same world size and ZeRO "
                "stage")
        method.load_state_dict(saved["state"])
        return True
