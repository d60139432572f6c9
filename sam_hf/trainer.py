"""SharpnessMixin and SharpnessTrainer: the methods inside `Trainer.training_step`.

Trainer calls `training_step` once per micro-batch of a gradient-accumulation
cycle and steps the optimizer after the last one. The mixin holds the cycle's
micro-batches and, on the last one, lets the method compute the step's
gradient from all of them (DESIGN.md: with accumulation, B_t is the whole
accumulated batch). Everything after that (clipping, the GradScaler's
overflow check, the optimizer and scheduler steps, logging, checkpointing) is
Trainer's own code, untouched.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.training_args import OptimizerNames

from . import lookahead, parallel, sharding
from .batching import TrainerBatch
from .config import METHODS, SCHEDULED_METHODS, SharpnessConfig, SharpnessConfigError
from .methods import METHOD_CLASSES
from .methods.base import StepResult, run_batches, zero_grads
from .optimizer import SharpnessOptimizer
from .placement import cpu_cores

logger = logging.getLogger(__name__)

# Reported as a count per logging interval; every other sam/ metric is averaged over it.
COUNTED_METRICS = ("sam/skipped_ascent", "sam/skipped_update")


_mirrored_handlers: list[logging.Handler] = []


def follow_transformers_logging() -> None:
    """sam_hf's info lines appear where Trainer's own do: the `sam_hf` logger takes the level Trainer set for
    transformers on this process (`--log_level`, `--log_level_replica`) and writes through transformers' handlers
    (or propagates where transformers does). Handlers a user added to `sam_hf` are left alone."""
    from transformers.utils import logging as hf_logging

    theirs, ours = hf_logging.get_logger(), logging.getLogger("sam_hf")
    ours.setLevel(theirs.getEffectiveLevel())
    for handler in _mirrored_handlers:
        ours.removeHandler(handler)
    _mirrored_handlers[:] = theirs.handlers
    for handler in _mirrored_handlers:
        ours.addHandler(handler)
    ours.propagate = theirs.propagate


def loss_factor_note(args, plan: parallel.ParallelPlan, loss_takes_count: bool) -> str | None:
    """One line for multi-process runs: the factor transformers puts on the logged loss (None where it puts none).

    With `average_tokens_across_devices` and a loss that takes `num_items_in_batch` (a model whose forward takes
    **kwargs, or a compute_loss_func), Trainer divides by all ranks' items and multiplies each rank's loss by the
    number of data-parallel replicas (sam_hf counts k of them in role mode, not 2k): right for a loss divided by
    the count, a factor on one that is a mean."""
    if not plan.distributed or not args.average_tokens_across_devices or not loss_takes_count:
        return None
    factor = plan.dp_size if plan.mode == "roles" else plan.world_size
    if factor == 1:  # role mode on 2 processes: one replica, nothing to say
        return None
    return (f"sam_hf: {plan.world_size} processes: transformers multiplies each rank's training loss by {factor} "
            f"(average_tokens_across_devices=True and a loss that takes num_items_in_batch): a loss divided by "
            f"the count logs the global batch's mean, but one that is a plain mean (e.g. "
            f"BertForSequenceClassification's) logs loss, and eval_loss, {factor} times too large; see the README, "
            f"'Where transformers itself surprises'")


def is_sharpness_optim(optim) -> bool:
    return str(getattr(optim, "value", optim)) in METHODS


class _MetricMeter:
    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] += 1

    def pop(self) -> dict[str, float]:
        out = {k: float(v) if k in COUNTED_METRICS else float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums.clear()
        self.counts.clear()
        return out


@contextlib.contextmanager
def _frozen_running_stats(modules: list[nn.Module]):
    """Leave BatchNorm running statistics as they were before the pass."""
    saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None}) for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


# Per-pass bookkeeping some Trainer subclasses keep in compute_loss (TRL: token count, entropy, accuracy).
_PASS_METRIC_ATTRS = ("_metrics", "_total_train_tokens")
# In role mode, the role whose pass is the one that counts in one process (SAMPa: the lookahead pass on B_{t+1};
# Asynchronous SAM: the descent pass on B_t); the other role's passes leave the metrics alone.
METRICS_ROLE = {"sampa": 1, "asyncsam": 0}


@contextlib.contextmanager
def _kept_pass_metrics(trainer):
    """A pass that does not count leaves the subclass's per-pass metrics as they were: each sample counts once."""
    saved = {k: copy.deepcopy(getattr(trainer, k)) for k in _PASS_METRIC_ATTRS if hasattr(trainer, k)}
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)


@contextlib.contextmanager
def _role_local_gathers(trainer, plan):
    """In role mode the two roles run different passes, so a collective over every rank inside compute_loss (TRL
    gathers its metrics on each pass) would pair unrelated calls and hang. A role's k ranks hold the whole step
    batch between them: gathers inside the passes go over the role's dp group only."""
    if plan is None or plan.mode != "roles":
        yield
        return
    acc = trainer.accelerator

    def gather(tensor):
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        if plan.dp_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(plan.dp_size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=plan.dp_group)
        return torch.cat(parts)

    acc.gather = acc.gather_for_metrics = lambda tensor, *args, **kwargs: gather(tensor)
    try:
        yield
    finally:
        del acc.gather, acc.gather_for_metrics  # back to the class's methods


class TrainerPasses:
    """Forward + backward exactly as `Trainer.training_step` does them (see methods/base.py).

    Units (DESIGN.md): a whole micro-batch is normalised as Trainer normalises it; a slice of one (mSAM's B_j,
    Asynchronous SAM's A_t) contributes exactly its part of that micro-batch's loss. It is given the cycle's
    `num_items_in_batch`, so a loss that divides by the count (causal LMs, a `compute_loss_func` that uses it)
    is its part as it stands; a loss that is a mean over the micro-batch (the model ignores the count, or gets
    none) is weighted by the slice's share of the micro-batch's items (labels != -100, as Trainer counts them).
    Which of the two a loss is, Trainer cannot know: it is measured once (`_loss_uses_count`).
    """

    def __init__(self, trainer: "SharpnessMixin", model: nn.Module, num_items_in_batch):
        self.trainer = trainer
        # The passes run on the bare module (sam_hf does not wrap it in DDP, see `_wrap_model`; a wrapper from
        # elsewhere would average the two roles' gradients): reductions happen where the method asks for them.
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.num_items_in_batch = num_items_in_batch
        self.batchnorms = trainer._sharpness_batchnorms

    def backward(self, batch, fraction: float = 1.0, clean: bool = True, part_of=None) -> torch.Tensor:
        t = self.trainer
        source = batch if part_of is None else part_of  # a slice is normalised as its micro-batch
        num_items = getattr(source, "num_items_in_batch", self.num_items_in_batch)
        # A held batch (SAMPa's B_t) is normalised by the accumulation steps of the cycle it came from.
        steps = getattr(source, "accumulation_steps", None) or t.current_gradient_accumulation_steps
        num_items, world_factor = t._sharpness_role_units(num_items)
        freeze = not clean and t.sharpness_config.bn_stats == "clean" and self.batchnorms
        # Both contexts end after the backward: BatchNorm saves its running statistics for it, so restoring them
        # in place before would fail autograd's version check.
        with (_frozen_running_stats(self.batchnorms) if freeze else contextlib.nullcontext(),
              contextlib.nullcontext() if self._counts(batch, part_of) else _kept_pass_metrics(t)):
            loss = self._loss(batch, num_items)
            if world_factor != 1.0:
                loss = loss * world_factor
            if t.args.n_gpu > 1:
                loss = loss.mean()
            if t.loss_is_scaled_for_ga is not None:
                scaled_for_ga = t.loss_is_scaled_for_ga
            else:  # Trainer's rule: the loss was normalised by num_items_in_batch already
                scaled_for_ga = (t.model_accepts_loss_kwargs and num_items is not None) or t.compute_loss_func is not None
            if part_of is not None and not self._loss_uses_count(batch, num_items):
                loss = loss * self._item_share(batch, part_of, fraction)
            if not scaled_for_ga:
                loss = loss / steps
            t.accelerator.backward(loss)
        return loss.detach()

    def _counts(self, batch, part_of) -> bool:
        """Whether this pass's per-pass metrics count: the first pass over a sample in a step does (SAM's clean
        pass, mSAM's clean slices, SAMPa's lookahead pass, Asynchronous SAM's descent), a pass over a batch already
        counted, or over a slice of one, does not (SAM's second pass, SAMPa's held B_t, the ascent batch A_t).
        In role mode only the role whose pass counts in one process counts (METRICS_ROLE)."""
        plan = self.trainer._sharpness_plan
        if plan is not None and plan.mode == "roles" and plan.role != METRICS_ROLE[self.trainer.sharpness_config.method]:
            return False
        if getattr(batch, "metrics_counted", False) or getattr(part_of, "metrics_counted", False):
            return False
        if isinstance(batch, TrainerBatch):
            batch.metrics_counted = True
        return True

    def _loss(self, batch, num_items):
        with self.trainer.compute_loss_context_manager(), _role_local_gathers(self.trainer, self.trainer._sharpness_plan):
            # a shallow copy: Trainer's compute_loss pops "labels" (label smoothing, compute_loss_func), and the
            # same batch runs again (SAM's second pass, SAMPa's held batch)
            return self.trainer.compute_loss(self.model, dict(batch), num_items_in_batch=num_items)

    def _loss_uses_count(self, batch, num_items) -> bool:
        """Whether the loss divides by `num_items_in_batch`: measured once per trainer, from two forward passes
        of one slice with the count and twice the count (same RNG, BatchNorm statistics and metrics kept)."""
        t = self.trainer
        if num_items is None:
            return False
        if t._sharpness_loss_uses_count is not None:
            return t._sharpness_loss_uses_count
        device = t.args.device
        devices = [device.index or 0] if device.type == "cuda" else []
        losses = []
        with torch.no_grad(), _frozen_running_stats(self.batchnorms), _kept_pass_metrics(t):
            for count in (num_items, num_items * 2):
                with torch.random.fork_rng(devices=devices):
                    losses.append(float(self._loss(batch, count).float().mean()))
        one, two = losses
        if not (math.isfinite(one) and one != 0.0):
            return True  # nothing to tell from this slice (no items): its part is 0 either way; ask again later
        uses = abs(2 * two - one) <= 1e-3 * abs(one)
        if not uses and abs(two - one) > 1e-3 * abs(one):
            logger.warning("sam_hf: the loss neither divides by num_items_in_batch nor ignores it (%.6g with the "
                           "count, %.6g with twice the count); slices of a micro-batch are given the cycle's count "
                           "and taken as they are", one, two)
            uses = True
        t._sharpness_loss_uses_count = uses
        logger.info("sam_hf: the loss %s num_items_in_batch: a slice of a micro-batch counts %s",
                    "divides by" if uses else "ignores",
                    "as the loss gives it" if uses else "its share of the micro-batch's items")
        return uses

    def _item_share(self, batch, whole, fraction: float):
        """The slice's share of its micro-batch's items, as Trainer counts items (labels != -100, shifted for a
        causal LM); the sample share where the batch has no labels."""
        t = self.trainer

        def items(b):
            if "shift_labels" in b:
                labels = b["shift_labels"]
            else:
                labels = b.get("labels")
                if torch.is_tensor(labels) and getattr(t, "_loss_shifts_labels", False):
                    labels = labels[..., 1:]
            return labels.ne(-100).sum() if torch.is_tensor(labels) else None

        part, total = items(batch), items(whole)
        if part is None or total is None:
            return fraction
        return part / total.clamp_min(1)

    def loss_scale(self) -> float:
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        return 1.0

    def all_reduce_grads(self, params) -> None:
        plan = self.trainer._sharpness_plan
        if plan.mode != "data":  # one process, or role mode where the exchange does the averaging
            return
        if sharding.grads_reduced_by_fsdp(params):  # FSDP2's reduce-scatter averaged the shards' .grad already;
            params = [p for p in params if not sharding.is_sharded(p)]  # parameters FSDP left alone are ours
            if not params:
                return
        parallel.all_reduce_grads_(params, plan, f"the gradient all-reduce at step {self.trainer.state.global_step}")


class SkippedUpdateCallback(TrainerCallback):
    """A step the method made no update in (SAMPa's first step) leaves the learning-rate schedule where it was, so
    the k-th update uses the schedule's k-th value. Trainer steps the scheduler unless accelerate reports the
    optimizer step as skipped (its rule for an fp16 overflow); this sets that report for such a step."""

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if getattr(optimizer, "_sam_hf_marked_skipped", False):  # without a GradScaler nothing else resets it
            optimizer._is_overflow = optimizer._sam_hf_marked_skipped = False

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, SharpnessOptimizer) and inner.skipped_last_step and hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = optimizer._sam_hf_marked_skipped = True


class SharpnessMixin:
    """Adds SAM, mSAM, SAMPa and Asynchronous SAM to any `transformers.Trainer` subclass.

    Active when `args.optim` is one of `sam`, `msam`, `sampa`, `asyncsam`;
    with any other optimizer the trainer behaves exactly like its base class.
    Compose it in front of the Trainer class: `class MyTrainer(SharpnessMixin, SFTTrainer)`.
    """

    sharpness_config: SharpnessConfig | None = None
    _sharpness_plan: parallel.ParallelPlan | None = None  # set with sharpness_config, before training
    _sharpness_loss_uses_count: bool | None = None  # measured by TrainerPasses on the first slice
    _sharpness_fsdp2 = False  # the parameters are FSDP2-sharded DTensors (sharding.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sharpness_setup()

    # ---- set-up, before training starts -------------------------------------
    def _sharpness_setup(self) -> None:
        if getattr(self, "_sharpness_ready", False):
            return
        self._sharpness_ready = True
        follow_transformers_logging()
        if not is_sharpness_optim(self.args.optim):
            self.sharpness_config = None
            return
        cfg = SharpnessConfig.from_optim_args(self.args.optim, self.args.optim_args)
        self.sharpness_config = cfg
        self._check_combination(cfg)
        self._sharpness_held: list[TrainerBatch] = []
        self._sharpness_meter = _MetricMeter()
        self._sharpness_optimizer: SharpnessOptimizer | None = None
        self._sharpness_batchnorms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                                      and m.track_running_stats]
        self._sharpness_plan = parallel.make_plan(cfg, self.args.device, float(self.args.ddp_timeout),
                                                  trainer_world=self.args.world_size)
        self._check_world(cfg, self._sharpness_plan)
        if self._sharpness_plan.mixed_devices and self._sharpness_plan.role == 1:
            self._setup_cpu_ascent_rank(cfg)
        logger.info("sam_hf: %s runs %s", cfg.method, self._sharpness_plan.describe())
        hint = None if self._sharpness_plan.distributed else parallel.meant_several_processes()
        if hint:
            logger.warning(hint)
        note = loss_factor_note(self.args, self._sharpness_plan,
                                self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
        if note:
            logger.info(note)
        if cfg.method == "sampa":
            self.add_callback(SkippedUpdateCallback())

    def _setup_cpu_ascent_rank(self, cfg: SharpnessConfig) -> None:
        self.args.dataloader_pin_memory = False  # pinning would open a CUDA context on the CPU rank
        # torchrun sets OMP_NUM_THREADS=1 for every rank; the CPU ascent rank needs the cores to keep pace
        threads = cfg.ascent_threads or max(1, cpu_cores() - 1)
        torch.set_num_threads(threads)
        logger.info("sam_hf: the CPU ascent rank computes with %d threads", threads)

    def _check_combination(self, cfg: SharpnessConfig) -> None:
        name, args = cfg.method, self.args
        # DeepSpeed, FSDP1 and FSDP flags accelerate left off are refused; under FSDP2 every method runs data parallel
        self._sharpness_fsdp2 = sharding.check_setup(self, cfg)
        # fp16 may also come from accelerate's config (ACCELERATE_MIXED_PRECISION), the same on every rank
        fp16 = args.fp16 or getattr(args, "mixed_precision", None) == "fp16"
        if cfg.ascent_device == "cpu" and fp16:
            raise SharpnessConfigError(
                "optim_args: ascent_device=cpu with fp16 mixed precision: the CPU rank has no loss scaler, so a step "
                "the GPU rank's GradScaler skips for overflow would still be taken on the CPU; use --bf16 (or "
                "--mixed_precision bf16), or fp32")
        if args.n_gpu > 1:
            raise SharpnessConfigError(
                f"optim={name} does not support torch.nn.DataParallel ({args.n_gpu} GPUs in one process); "
                "launch one process per GPU: torchrun --nproc_per_node N script.py ...")

    def _check_world(self, cfg: SharpnessConfig, plan: parallel.ParallelPlan) -> None:
        trl_classes = [c for c in type(self).__mro__ if c.__module__.split(".")[0] == "trl"]
        if plan.distributed and trl_classes and not any(c.__name__ == "SFTTrainer" for c in trl_classes):
            raise SharpnessConfigError(
                f"optim={cfg.method} with {trl_classes[0].__name__} runs in one process only: on several processes "
                "sam_hf supports TRL's SFTTrainer (its per-pass metrics are counted once per sample and gathered "
                "within a role), not this trainer's own loss and metric collectives; launch one process, or use "
                "SFTTrainer")
        if cfg.exchange_dtype != "fp32" and plan.mode != "roles":
            raise SharpnessConfigError(
                f"optim_args: exchange_dtype={cfg.exchange_dtype!r} applies to the role exchange (sampa or asyncsam "
                f"on 2 or more processes, parallel=auto/on); this run is {plan.describe()}, so it would be ignored: "
                "drop exchange_dtype")
        if plan.mode == "roles" and getattr(self.args, "train_sampling_strategy", None) == "batch_rebalance":
            raise SharpnessConfigError(
                f"train_sampling_strategy=batch_rebalance hands each of the {plan.world_size} ranks its own batches, "
                f"but role-parallel {cfg.method} needs ranks (0, i) and (1, i) to read the same stream; use "
                "train_sampling_strategy=group_by_length (it also evens the two roles' padded lengths) or random, or "
                "optim_args parallel=off")
        if cfg.method != "msam":
            return
        args, m = self.args, cfg.micro_batches
        # mSAM spreads its micro-batches over the ranks; under FSDP2 every rank runs all m (sharding.py)
        world = plan.world_size if plan.mode == "data" and not self._sharpness_fsdp2 else 1
        if m % world:
            raise SharpnessConfigError(
                f"optim_args: micro_batches={m} cannot be spread evenly over {world} processes; "
                f"use a multiple of {world} (e.g. micro_batches={world * max(1, m // world)})")
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        if m > samples:
            raise SharpnessConfigError(
                f"optim_args: micro_batches={m} is larger than the {samples} samples of a step ({world} process(es) "
                f"x per_device_train_batch_size={args.per_device_train_batch_size} x "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps}); use micro_batches <= {samples}")

    def create_optimizer(self, model=None):
        if self.sharpness_config is None:
            return super().create_optimizer(model)
        if self._sharpness_optimizer is not None and self._sharpness_optimizer in (
                self.optimizer, getattr(self.optimizer, "optimizer", None)):  # again, e.g. a second train()
            self.optimizer = self._sharpness_optimizer
            return self.optimizer
        cfg = self.sharpness_config
        if self.optimizer is None:  # build the base optimizer the way Trainer builds `--optim {base}`
            user_choice = self.optimizer_cls_and_kwargs
            if user_choice is None:
                base_args = copy.copy(self.args)
                base_args.optim = OptimizerNames(cfg.base)
                base_args.optim_args = cfg.base_optim_args_string()
                self.optimizer_cls_and_kwargs = self.get_optimizer_cls_and_kwargs(base_args, model or self.model)
            try:
                super().create_optimizer(model)
            finally:
                self.optimizer_cls_and_kwargs = user_choice
        base = self.optimizer
        if cfg.method == "sampa" and cfg.lookahead == "optimizer" and not lookahead.supports(base):
            raise SharpnessConfigError(
                f"optim_args: lookahead=optimizer has no closed form for {type(base).__name__}; "
                "use lookahead=sgd or an AdamW/Adam/SGD base optimizer")
        kwargs = {}
        if cfg.method == "msam" and self._sharpness_fsdp2:
            kwargs["micro_batches"] = sharding.msam_micro_batches(cfg)
        elif cfg.method == "msam" and self._sharpness_plan.mode == "data":
            kwargs["micro_batches"] = cfg.micro_batches // self._sharpness_plan.world_size
        names = {id(p): n for n, p in (model or self.model).named_parameters()}
        method = METHOD_CLASSES[cfg.method](cfg, base, max_grad_norm=self.args.max_grad_norm, param_names=names,
                                            **kwargs)
        method.role_parallel = self._sharpness_plan.mode == "roles"
        self.optimizer = self._sharpness_optimizer = SharpnessOptimizer(base, method)
        return self.optimizer

    def _wrap_model(self, model, training=True, dataloader=None):
        plan = self._sharpness_plan
        if self._sharpness_fsdp2 and plan.mode == "roles" and training and not sharding.is_fsdp2(model):
            # each role sharded over its own k ranks; accelerate.prepare then keeps the FSDP2 module as it is
            model, self._sharpness_role_params, self._sharpness_restore_ac = sharding.shard_for_roles(
                self.accelerator, model, plan, self.optimizer)
            return model
        if (plan is None or not plan.distributed or not training or self._sharpness_fsdp2
                or self.accelerator.unwrap_model(model, keep_torch_compile=False) is not model):
            return super()._wrap_model(model, training, dataloader)  # FSDP2: accelerate.prepare shards the model
        # No DistributedDataParallel: sam_hf reduces gradients itself (`all_reduce_grads`, the role exchange), so
        # DDP's buckets would only hold one more copy of the gradients; and DDP cannot span a CPU ascent rank.
        # Accelerate still places the model and adds mixed-precision autocast.
        model = self.accelerator.prepare_model(model, evaluation_mode=True)
        # what DDP's construction did: every replica starts from rank 0's weights and buffers
        parallel.broadcast_tensors(plan, [*model.parameters(), *model.buffers()], 0, "the initial weight broadcast")
        return model

    def _sharpness_role_units(self, num_items):
        """(num_items_in_batch, loss factor) under transformers' data-parallel rule, applied to the ranks that
        really are data-parallel replicas. Trainer gathers the count over every rank and `compute_loss` multiplies
        the loss by the number of processes; in role mode the 2k ranks are k replicas in two roles reading the same
        batches, so the count holds each sample twice and the factor is 2k where k is right."""
        args, plan = self.args, self._sharpness_plan
        if (plan.mode != "roles" or num_items is None or not args.average_tokens_across_devices or args.n_gpu > 1
                or not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)):
            return num_items, 1.0
        return num_items / 2, 0.5

    # ---- one step -----------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.sharpness_config is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        self._sharpness_held.append(TrainerBatch.of(self._prepare_inputs(inputs), num_items_in_batch,
                                                    self.current_gradient_accumulation_steps))
        if not self.accelerator.sync_gradients:  # more micro-batches of this step to come
            return torch.zeros((), device=self.args.device)
        batches, self._sharpness_held = self._sharpness_held, []
        result = self._sharpness_step(model, batches, num_items_in_batch)
        self._sharpness_optimizer.skip_next_step = result.skip_update
        self._sharpness_meter.add(result.metrics)
        return result.loss.detach()

    def _sharpness_step(self, model, batches, num_items_in_batch):
        plan, cfg = self._sharpness_plan, self.sharpness_config
        method = self._sharpness_optimizer.method
        step = self.state.global_step
        if self._sharpness_fsdp2:  # accelerate swapped the optimizer's parameters for DTensors after create_optimizer
            sharding.reshard(model)  # no unsharded copy left from an evaluation: the passes read the shards
            self._sharpness_rebind_optimizer()
            sharding.rebind_params(method)
            if plan.mode == "roles" and not getattr(self, "_sharpness_layout_checked", False):
                names = {id(p): n for n, p in sharding.unwrap(model).named_parameters()}
                sharding.check_role_layout(method.params, plan, names)  # e.g. a model the script sharded itself
                self._sharpness_layout_checked = True
        # replicas: every rank, or under FSDP2 the two roles' equal shards (data-parallel shards all differ)
        replicas = not self._sharpness_fsdp2 or plan.mode == "roles"
        if plan.distributed and replicas and cfg.check_every and step % cfg.check_every == 0:
            parallel.check_replicas(plan, method.params, step)
        passes = TrainerPasses(self, model, num_items_in_batch)
        active = cfg.active(step, self.state.max_steps)  # always, for the methods a schedule is refused to
        if not active:
            result = self._base_step(method, batches, passes)
        elif plan.mode == "roles":
            result = parallel.role_step(plan, method, batches, passes, step)
        else:
            result = method.step(batches, passes)
        if cfg.method in SCHEDULED_METHODS:
            result.metrics["sam/active"] = float(active)
        if plan.distributed and self._sharpness_batchnorms:
            clean_rank = plan.dp_size if plan.mode == "roles" else 0  # role 1 runs the unperturbed pass
            parallel.broadcast_buffers(plan, self._sharpness_batchnorms, clean_rank, step)
        if plan.mode == "roles" and any(hasattr(self, k) for k in _PASS_METRIC_ATTRS):
            self._broadcast_pass_metrics(plan, cfg)
        return result

    def _broadcast_pass_metrics(self, plan, cfg) -> None:
        """Every rank gets the per-pass metrics (TRL's) of the role whose pass counts, so rank 0 logs what one
        process would."""
        src = METRICS_ROLE[cfg.method] * plan.dp_size
        state = [{k: getattr(self, k) for k in _PASS_METRIC_ATTRS if hasattr(self, k)}]
        torch.distributed.broadcast_object_list(state, src=src)
        for k, v in state[0].items():
            setattr(self, k, v)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self._sharpness_fsdp2:  # accelerate's FSDP2 optimizer checkpoint keeps the base optimizer's state only
            sharding.save_method_state(self._sharpness_optimizer.method, output_dir)

    def _sharpness_rebind_optimizer(self) -> None:
        """Role mode under FSDP2: accelerate.prepare matches the optimizer's parameters by their shards' data
        pointers (an empty shard has none): point it at the sharded parameters again after every prepare."""
        groups = getattr(self, "_sharpness_role_params", None)
        if groups is not None:
            sharding.rebind_optimizer(self.optimizer, groups)
        if getattr(self, "_sharpness_restore_ac", False):  # prepare is done: the plugin's flag as the user set it
            self.accelerator.state.fsdp_plugin.activation_checkpointing = True
            self._sharpness_restore_ac = False

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self.sharpness_config is not None and self._sharpness_fsdp2:
            self._sharpness_rebind_optimizer()
        super()._load_optimizer_and_scheduler(checkpoint)
        method = getattr(self._sharpness_optimizer, "method", None)
        if self._sharpness_fsdp2 and checkpoint is not None and method is not None:
            sharding.load_method_state(method, checkpoint)
        for batch in getattr(method, "held", None) or []:  # SAMPa's B_t was counted in the step that handed it in
            batch.metrics_counted = True

    @staticmethod
    def _base_step(method, batches, passes) -> StepResult:
        """A step outside SAM's schedule: the base optimizer's own one-pass step, as Trainer computes it."""
        zero_grads(method.params)
        loss = run_batches(passes, batches, clean=True)
        passes.all_reduce_grads(method.params)
        return StepResult(loss)

    # ---- data: ranks (0, i) and (1, i) read the same shard stream --------------
    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        plan = self._sharpness_plan
        if plan is not None and plan.mode == "roles":
            shard = getattr(dataloader, "batch_sampler", None)
            if not hasattr(shard, "num_processes"):
                raise SharpnessConfigError(
                    f"role-parallel {self.sharpness_config.method} needs a map-style (sized) train dataset, so "
                    "both roles can read the same shard; use parallel=off for an iterable dataset")
            shard.num_processes, shard.process_index = plan.dp_size, plan.dp_rank
            if plan.dp_size == 1:
                # One rank per role reads the whole stream: keep the epoch's last partial batch as one process
                # would (accelerate's even_batches would complete it with samples from the epoch's start).
                shard.even_batches = False
        return dataloader

    def get_total_train_batch_size(self, args) -> int:
        plan = self._sharpness_plan
        if plan is not None and plan.mode == "roles":
            return self._train_batch_size * args.gradient_accumulation_steps * plan.dp_size
        return super().get_total_train_batch_size(args)

    # ---- metrics -------------------------------------------------------------
    def log(self, logs, *args, **kwargs):
        if self.sharpness_config is not None and "loss" in logs and self._sharpness_meter.sums:
            logs = {**logs, **self._sharpness_meter.pop()}
        return super().log(logs, *args, **kwargs)


class SharpnessTrainer(SharpnessMixin, Trainer):
    """`transformers.Trainer` with `--optim sam|msam|sampa|asyncsam` (see SharpnessMixin)."""
