"""SharpnessMixin and SharpnessTrainer: the methods inside `Trainer.training_step`.

Trainer calls `training_step` once per micro-batch of a gradient-accumulation cycle and steps the optimizer
after the last one. The mixin holds the cycle's micro-batches and, on the last one, lets the method compute the
step's gradient from all of them (DESIGN.md: with accumulation, B_t is the whole accumulated batch), through
the run's layout (one process, data parallel, role mode, FSDP2). Everything after that (clipping, the
GradScaler's overflow check, the optimizer and scheduler steps, logging, checkpointing) is Trainer's own code,
untouched.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from transformers import Trainer
from transformers.training_args import OptimizerNames

from .. import registry
from ..batching import TrainerBatch
from ..config import SharpnessConfig, SharpnessConfigError
from ..distributed.layouts import Layout, make_layout, trainer_sharding
from ..distributed.placement import cpu_cores
from ..distributed.plan import meant_several_processes
from ..methods import bisam
from ..methods.base import Progress, StepResult, run_batches
from ..optim import SharpnessOptimizer
from ..tensors import batchnorms, zero_grads
from .callbacks import MetricMeter, SkippedUpdateCallback, follow_transformers_logging, loss_factor_note
from .passes import _PASS_METRIC_ATTRS, TrainerPasses

logger = logging.getLogger(__name__)


class SharpnessMixin:
    """Adds the sharpness-aware methods (`sam`, `msam`, `sampa`, `asyncsam`, ...) to any `transformers.Trainer`
    subclass.

    Active when `args.optim` is a registered method; with any other optimizer the trainer behaves exactly like
    its base class. Compose it in front of the Trainer class: `class MyTrainer(SharpnessMixin, SFTTrainer)`.
    """

    sharpness_config: SharpnessConfig | None = None
    _sharpness_layout: Layout | None = None  # set with sharpness_config, before training
    _sharpness_loss_uses_count: bool | None = None  # measured by TrainerPasses on the first slice

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sharpness_setup()

    # ---- set-up, before training starts -------------------------------------
    def _sharpness_setup(self) -> None:
        if getattr(self, "_sharpness_ready", False):
            return
        self._sharpness_ready = True
        follow_transformers_logging()
        if not registry.is_method(self.args.optim):
            self.sharpness_config = None
            return
        cfg = SharpnessConfig.from_optim_args(self.args.optim, self.args.optim_args)
        method_cls = registry.get(cfg.method).method
        self.sharpness_config = cfg
        self._check_trainer(cfg)
        if getattr(cfg, "rule", None) == "bisam":  # outputs with no 0-1 loss, refused before training
            bisam.check_model(self.model)
        self._sharpness_held: list[TrainerBatch] = []
        self._sharpness_meter = MetricMeter()
        self._sharpness_optimizer: SharpnessOptimizer | None = None
        self._sharpness_batchnorms = batchnorms(self.model)
        roles_asked = method_cls.two_roles and cfg.parallel == "on"
        layout = make_layout(cfg, method_cls, self.args.device, float(self.args.ddp_timeout),
                             trainer_sharding(self, cfg.method, roles_asked), trainer_world=self.args.world_size)
        self._sharpness_layout = layout
        self._check_world(cfg, layout)
        layout.check_trainer(self)
        method_cls.check(cfg, layout, self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps)
        if layout.plan.mixed_devices and layout.plan.role == 1:
            self._setup_cpu_ascent_rank(cfg)
        logger.info("sam_hf: %s runs %s", cfg.method, layout.describe())
        hint = None if layout.distributed else meant_several_processes()
        if hint:
            logger.warning(hint)
        note = loss_factor_note(self.args, layout.plan,
                                self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
        if note:
            logger.info(note)
        if method_cls.skips_first_update:
            self.add_callback(SkippedUpdateCallback())

    def _setup_cpu_ascent_rank(self, cfg: SharpnessConfig) -> None:
        self.args.dataloader_pin_memory = False  # pinning would open a CUDA context on the CPU rank
        # torchrun sets OMP_NUM_THREADS=1 for every rank; the CPU ascent rank needs the cores to keep pace
        threads = cfg.ascent_threads or max(1, cpu_cores() - 1)
        torch.set_num_threads(threads)
        logger.info("sam_hf: the CPU ascent rank computes with %d threads", threads)

    def _check_trainer(self, cfg: SharpnessConfig) -> None:
        args = self.args
        # fp16 may also come from accelerate's config (ACCELERATE_MIXED_PRECISION), the same on every rank
        fp16 = args.fp16 or getattr(args, "mixed_precision", None) == "fp16"
        if cfg.cpu_rank and fp16:
            raise SharpnessConfigError(
                "optim_args: ascent_device=cpu with fp16 mixed precision: the CPU rank has no loss scaler, so a step "
                "the GPU rank's GradScaler skips for overflow would still be taken on the CPU; use --bf16 (or "
                "--mixed_precision bf16), or fp32")
        if args.n_gpu > 1:
            raise SharpnessConfigError(
                f"optim={cfg.method} does not support torch.nn.DataParallel ({args.n_gpu} GPUs in one process); "
                "launch one process per GPU: torchrun --nproc_per_node N script.py ...")

    def _check_world(self, cfg: SharpnessConfig, layout: Layout) -> None:
        trl_classes = [c for c in type(self).__mro__ if c.__module__.split(".")[0] == "trl"]
        if layout.distributed and trl_classes and not any(c.__name__ == "SFTTrainer" for c in trl_classes):
            raise SharpnessConfigError(
                f"optim={cfg.method} with {trl_classes[0].__name__} runs in one process only: on several processes "
                "sam_hf supports TRL's SFTTrainer (its per-pass metrics are counted once per sample and gathered "
                "within a role), not this trainer's own loss and metric collectives; launch one process, or use "
                "SFTTrainer")

    def create_optimizer(self, model=None):
        if self.sharpness_config is None:
            return super().create_optimizer(model)
        if self._sharpness_optimizer is not None and self._sharpness_host_optimizer() in (
                self.optimizer, getattr(self.optimizer, "optimizer", None)):  # again, e.g. a second train()
            self.optimizer = self._sharpness_host_optimizer()
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
        # the model tells the ascent rule its parameters' names (ASAM's T) and layers (SAM-ON's normalization layers)
        method = registry.get(cfg.method).method(cfg, self.optimizer, max_grad_norm=self.args.max_grad_norm,
                                                 layout=self._sharpness_layout, model=model or self.model)
        self._sharpness_optimizer = SharpnessOptimizer(self.optimizer, method)
        self.optimizer = self._sharpness_host_optimizer()
        return self.optimizer

    def _sharpness_host_optimizer(self):
        """What Trainer steps: the SharpnessOptimizer, or the plain base optimizer where the layout's engine steps it
        (DeepSpeed wraps the optimizer it is given and steps it once per step, after the method's passes)."""
        opt = self._sharpness_optimizer
        return opt.base if self._sharpness_layout.owns_step else opt

    def _wrap_model(self, model, training=True, dataloader=None):
        if self.sharpness_config is None:
            return super()._wrap_model(model, training, dataloader)
        return self._sharpness_layout.wrap_model(self, model, training, dataloader, super()._wrap_model)

    def _sharpness_role_units(self, num_items):
        """(num_items_in_batch, loss factor) under transformers' data-parallel rule, applied to the ranks that
        really are data-parallel replicas. Trainer gathers the count over every rank and `compute_loss` multiplies
        the loss by the number of processes; in role mode the 2k ranks are k replicas in two roles reading the same
        batches, so the count holds each sample twice and the factor is 2k where k is right."""
        args, share = self.args, self._sharpness_layout.replica_fraction
        if (share == 1.0 or num_items is None or not args.average_tokens_across_devices or args.n_gpu > 1
                or not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)):
            return num_items, 1.0
        return num_items * share, share

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
        layout, cfg = self._sharpness_layout, self.sharpness_config
        method = self._sharpness_optimizer.method
        step = layout.step_index = self.state.global_step
        layout.before_step(self, model, method)
        if cfg.check_every and step % cfg.check_every == 0:
            layout.check_replicas(method.params, step)
        id_column = method.example_id_column(cfg)
        passes = TrainerPasses(self, model, num_items_in_batch, hidden=(id_column,) if id_column else ())
        method.progress = Progress(step, self.state.max_steps, math.floor(self.state.epoch or 0.0),
                                   self._sharpness_num_examples())
        active = cfg.active(step, self.state.max_steps)  # always, for the methods without a schedule
        result = layout.step(method, batches, passes, step) if active else self._base_step(method, batches, passes)
        layout.end_step(method, result)
        if method.schedulable:
            result.metrics["sam/active"] = float(active)
        layout.sync_buffers(self._sharpness_batchnorms, method.clean_role, step)
        layout.share_pass_metrics(self, method, _PASS_METRIC_ATTRS)
        return result

    def _base_step(self, method, batches, passes) -> StepResult:
        """A step outside the method's schedule: the base optimizer's own one-pass step, as Trainer computes it."""
        zero_grads(method.params)
        loss = run_batches(passes, batches, clean=True)
        self._sharpness_layout.all_reduce_grads(method.params)
        return StepResult(loss)

    # ---- checkpoints -------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir):
        if self.sharpness_config is not None:  # every rank: gather per-shard state (SAMPa's held batch)
            self._sharpness_optimizer.method.prepare_checkpoint()
        super()._save_optimizer_and_scheduler(output_dir)
        if self.sharpness_config is not None:  # where the optimizer's own file cannot carry the method state
            self._sharpness_layout.save_state(self._sharpness_optimizer.method, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self.sharpness_config is not None:
            self._sharpness_layout.before_load(self)
        super()._load_optimizer_and_scheduler(checkpoint)
        method = getattr(self._sharpness_optimizer, "method", None)
        if checkpoint is not None and method is not None:
            self._sharpness_layout.load_state(method, checkpoint)

    # ---- data ------------------------------------------------------------------------
    def _sharpness_id_column(self) -> str | None:
        cfg = self.sharpness_config
        return None if cfg is None else registry.get(cfg.method).method.example_id_column(cfg)

    def _sharpness_num_examples(self) -> int | None:
        data = self.train_dataset
        try:
            return len(data) if data is not None else None
        except TypeError:  # an IterableDataset
            return None

    def _set_signature_columns_if_needed(self):
        """Trainer keeps the columns the model's forward takes; a method's example id column is kept too (the
        passes take it out of the batch before the forward)."""
        super()._set_signature_columns_if_needed()
        column = self._sharpness_id_column()
        if column is not None and column not in self._signature_columns:
            self._signature_columns.append(column)

    def _check_example_ids(self, dataset) -> None:
        """A method that keeps per-example state (SAF) needs a column of unique example ids in the training data."""
        column = self._sharpness_id_column()
        names = getattr(dataset, "column_names", None)
        if column is None or names is None:
            return
        method = self.sharpness_config.method
        if column not in names:
            raise SharpnessConfigError(
                f"optim={method} keeps a record per training example and reads its id from the column {column!r}, "
                f"which the training data lacks (columns: {names}); add it, e.g. "
                f"train_dataset = train_dataset.map(lambda row, i: {{{column!r}: i}}, with_indices=True), or name "
                f"an existing id column with optim_args id_column=...")
        ids = dataset[column]
        if len(set(ids)) != len(ids) or any(not isinstance(i, int) or i < 0 for i in ids):
            raise SharpnessConfigError(
                f"optim={method}: the example ids in column {column!r} must be distinct integers >= 0 (one per "
                "training example); number the rows, e.g. train_dataset.map(lambda row, i: "
                f"{{{column!r}: i}}, with_indices=True)")

    def get_train_dataloader(self):
        if self.sharpness_config is not None:
            self._check_example_ids(self.train_dataset)
        dataloader = super().get_train_dataloader()
        if self.sharpness_config is None:
            return dataloader
        return self._sharpness_layout.shard_dataloader(dataloader)

    def get_total_train_batch_size(self, args) -> int:
        default = super().get_total_train_batch_size(args)
        if self.sharpness_config is None:
            return default
        return self._sharpness_layout.train_batch_size(default, self._train_batch_size * args.gradient_accumulation_steps)

    # ---- metrics -------------------------------------------------------------
    def log(self, logs, *args, **kwargs):
        if self.sharpness_config is not None and "loss" in logs and self._sharpness_meter.sums:
            logs = {**logs, **self._sharpness_meter.pop()}
        return super().log(logs, *args, **kwargs)


class SharpnessTrainer(SharpnessMixin, Trainer):
    """`transformers.Trainer` with the sharpness-aware `--optim` names (see SharpnessMixin)."""
