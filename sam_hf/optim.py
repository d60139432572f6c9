"""SharpnessOptimizer: a base optimizer with a sharpness-aware method in front of its step.

Plain PyTorch, Accelerate and Lightning loops use it as any `torch.optim.Optimizer` with a closure:

    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = sam_hf.SharpnessOptimizer(base, "sampa", rho=0.1, lam=0.2, model=model)
    for batch in loader:
        loss = opt.step(sam_hf.BatchClosure(lambda b: loss_fn(model, b), batch))

`step(closure)` runs the method's forward + backward passes through the closure (PyTorch's convention: the
closure computes the loss, calls backward and returns the loss), leaves the method's gradient in `.grad`, clips
it (`max_grad_norm`) and steps the base optimizer, unless the method says the step makes no update (SAMPa's first
step: `skipped_last_step` is then True, and a learning-rate scheduler should not step either). Any closure runs
SAM, ASAM, SAMPa and Asynchronous SAM with r = 1; methods that cut a step's batch into samples (mSAM's
micro-batches, Asynchronous SAM's smaller ascent batch) need a `BatchClosure`, which knows its batch. Methods that
read the model's outputs (SAF's and MESA's trajectory loss, ESAM's data selection) need a `BatchClosure` whose
`loss_fn` returns the model's outputs (a mapping with `loss` and `logits`, as Hugging Face models return, or a
tuple `(loss, logits)`); methods that follow the epoch (SAF, MESA) need `steps_per_epoch` or `set_epoch(e)`.
On several
processes (torch.distributed initialised, the model not wrapped in DDP: the layout averages gradients itself)
the optimizer picks the layout as Trainer does: data parallel, or role mode for SAMPa and Asynchronous SAM, where
ranks (0, i) and (1, i) must read the same batches (`data_shard()`).

Inside Trainer (SharpnessMixin) the method has already left the step's gradient in `.grad` when Trainer calls
`step()`: it is then the base optimizer's step. Either way Trainer, accelerate's AcceleratedOptimizer, a
GradScaler and an LR scheduler see an ordinary optimizer: parameter groups, state and `step()` are the base
optimizer's, and `state_dict()` carries the method's state under one extra key (STATE_KEY), so Trainer's own
`optimizer.pt` checkpoints and resumes it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

import torch

from . import registry
from .config import SharpnessConfig, SharpnessConfigError, parse_optim_args
from .distributed import dtensor
from .distributed.layouts import make_layout
from .methods.base import Progress, SharpnessMethod, StepResult
from .tensors import batchnorms, frozen_running_stats, zero_grads

STATE_KEY = "sam_hf"
STEPS_KEY = "sam_hf_steps"


class BatchClosure(dict):
    """A closure that knows its batch: `loss_fn(batch) -> mean loss` and the batch (a dict of tensors whose first
    dimension is the sample). Called, it runs forward + backward on the whole batch and returns the loss; the
    methods can also cut it into samples, each slice contributing its share of the batch's mean loss.

    `logits_fn(batch) -> logits` is what rule=bisam needs besides: its ascent passes bound the 0-1 loss of the
    logits against `batch["labels"]` (logits of shape labels.shape + (classes,), aligned position by position;
    shift a causal LM's yourself)."""

    def __init__(self, loss_fn, batch: Mapping, logits_fn=None):
        if not isinstance(batch, Mapping):
            raise TypeError(f"BatchClosure needs a dict-like batch (name -> tensor), got {type(batch).__name__}; "
                            "e.g. BatchClosure(lambda b: loss_fn(model(b['x']), b['y']), {'x': x, 'y': y})")
        super().__init__(batch)
        self.loss_fn = loss_fn
        self.logits_fn = logits_fn

    def __call__(self):
        with torch.enable_grad():
            loss = self.loss_fn(self)
            loss.backward()
        return loss.detach()


def split_outputs(outputs):
    """(loss, outputs) from what a BatchClosure's loss_fn returned: a loss tensor, a mapping with `loss` (a Hugging
    Face model's output), or a tuple whose first element is the loss."""
    if torch.is_tensor(outputs):
        return outputs, None
    if isinstance(outputs, Mapping) and "loss" in outputs:
        return outputs["loss"], outputs
    if isinstance(outputs, (tuple, list)) and outputs and torch.is_tensor(outputs[0]):
        return outputs[0], outputs
    raise TypeError("a BatchClosure's loss_fn must return the loss tensor, the model's outputs with a `loss` (e.g. "
                    f"lambda b: model(**b)), or a tuple (loss, logits); got {type(outputs).__name__}")


class ClosurePasses:
    """methods.base.GradientPasses for a plain loop: each pass is one call of the step's closure, or of its
    `loss_fn` on a slice of its batch (weighted by the slice's share of the samples, the units of a mean loss)."""

    def __init__(self, loss_fn, batchnorms=(), freeze_stats: bool = True, hidden: tuple[str, ...] = (),
                 logits_fn=None):
        self.loss_fn = loss_fn  # for batches without their own: a held batch restored from a checkpoint
        self.logits_fn = logits_fn
        self.batchnorms = list(batchnorms)
        self.freeze_stats = freeze_stats
        self.hidden = hidden  # batch columns the method reads itself (an example id): loss_fn never sees them

    def _call(self, batch, part_of=None):
        fn = getattr(batch, "loss_fn", None) or getattr(part_of, "loss_fn", None) or self.loss_fn
        if self.hidden:
            batch = {k: v for k, v in batch.items() if k not in self.hidden}
        return fn(batch)

    def backward(self, batch, fraction: float = 1.0, clean: bool = True, part_of=None, weight: float = 1.0,
                 loss_term=None, ascent=None, last: bool = True) -> torch.Tensor:
        if ascent is not None:
            return self._ascent_backward(batch, fraction, clean, part_of, ascent)
        freeze = not clean and self.freeze_stats and self.batchnorms
        with frozen_running_stats(self.batchnorms) if freeze else contextlib.nullcontext(), torch.enable_grad():
            if not isinstance(batch, Mapping):  # a plain closure: forward + backward, returns the loss
                loss = batch()
                if not torch.is_tensor(loss):
                    raise TypeError("the closure passed to SharpnessOptimizer.step must return the loss tensor "
                                    f"(PyTorch's closure convention), got {type(loss).__name__}")
                return loss.detach()
            loss, outputs = split_outputs(self._call(batch, part_of))
            own = loss
            if loss_term is not None:
                if outputs is None:
                    raise TypeError("this method reads the model's outputs: the BatchClosure's loss_fn must return "
                                    "them (a mapping with `loss` and `logits`, e.g. lambda b: model(**b), or a tuple "
                                    "(loss, logits)), not the loss alone")
                values = loss_term(outputs, batch)
                if values is not None:  # a mean loss: the term's mean over the batch
                    loss = loss + values.reshape(-1).mean()
            if part_of is not None:
                loss, own = loss * fraction, own * fraction
            if weight != 1.0:
                loss, own = loss * weight, own * weight
            loss.backward()
        return own.detach()

    def forward(self, batch, clean: bool = True):
        freeze = not clean and self.freeze_stats and self.batchnorms
        with frozen_running_stats(self.batchnorms) if freeze else contextlib.nullcontext(), torch.no_grad():
            _, outputs = split_outputs(self._call(batch))
        if outputs is None:
            raise TypeError("this method reads the model's outputs: the BatchClosure's loss_fn must return them (a "
                            "mapping with `loss` and `logits`, e.g. lambda b: model(**b), or a tuple (loss, logits))")
        return outputs

    def _ascent_backward(self, batch, fraction, clean, part_of, ascent) -> torch.Tensor:
        """The rule's ascent loss (BiSAM's lower bound) on the model's logits and the batch's labels, in the units of
        a mean: the sum over the piece's scored examples / the whole batch's. The logits are those of the outputs
        loss_fn returns (one forward), or `logits_fn(batch)`'s (then the reported training loss costs one more
        forward, without gradients, BatchNorm statistics kept); returns the training loss."""
        from .methods import bisam

        logits_fn = getattr(batch, "logits_fn", None) or getattr(part_of, "logits_fn", None) or self.logits_fn
        freeze = not clean and self.freeze_stats and self.batchnorms
        with frozen_running_stats(self.batchnorms) if freeze else contextlib.nullcontext(), torch.enable_grad():
            if logits_fn is not None:
                loss, outputs = None, {"logits": logits_fn(batch)}
            else:
                loss, outputs = split_outputs(self._call(batch, part_of))
                if isinstance(outputs, (tuple, list)):
                    outputs = {"logits": outputs[1]} if len(outputs) > 1 else None
                if outputs is None or bisam.logits_of(outputs) is None:
                    raise TypeError("rule=bisam needs the model's logits: pass sam_hf.BatchClosure(lambda b: "
                                    "model(**b), batch), its loss_fn returning the outputs with `loss` and `logits` "
                                    "(or a tuple (loss, logits)), or BatchClosure(loss_fn, batch, logits_fn=...)")
            total, _ = ascent(*bisam.aligned(outputs, batch, shift=False))
            (total / max(bisam.scored(part_of if part_of is not None else batch, False), 1)).backward()
        if loss is None:
            with torch.no_grad(), frozen_running_stats(self.batchnorms) if self.batchnorms else \
                    contextlib.nullcontext():
                loss, _ = split_outputs(self._call(batch, part_of))
        return (loss * fraction if part_of is not None else loss).detach()

    def loss_scale(self) -> float:
        return 1.0


class SharpnessOptimizer(torch.optim.Optimizer):
    """`base` with a sharpness-aware method in front of its step (see the module docstring).

    Plain loops: `SharpnessOptimizer(base, "sam", rho=0.05, model=model)` (or `optim_args="rho=0.05"`, the same
    keys as `--optim_args`). `model` gives the ascent rule what it reads of the parameters (ASAM's T by name, SAM-ON's
    normalization layers by module type) and BatchNorm handling (`bn_stats`); `max_grad_norm` clips the final
    gradient as Trainer does; `total_steps` is needed for the `start`/`stop` schedule options and AE-SAM;
    `steps_per_epoch` (or `set_epoch(e)` at each epoch's start) tells SAF and MESA the epoch. Trainer builds it from a
    method instead."""

    # Like accelerate's AcceleratedOptimizer, a wrapper that does not call Optimizer.__init__:
    # everything an Optimizer holds is the base optimizer's.
    def __init__(self, base: torch.optim.Optimizer, method: SharpnessMethod | str, optim_args: str | None = None, *,
                 model: torch.nn.Module | None = None, max_grad_norm: float = 0.0, total_steps: int | None = None,
                 steps_per_epoch: int | None = None, timeout_s: float = 1800.0, **options):
        self.base = base
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.epoch: int | None = None  # set_epoch: the epoch the next steps belong to
        self.skip_next_step = False
        self.skipped_last_step = False  # read by trainer.SkippedUpdateCallback: the LR schedule waits too
        self.steps = 0
        self.last_metrics: dict = {}
        if isinstance(method, SharpnessMethod):
            if optim_args is not None or options:
                raise TypeError("SharpnessOptimizer(base, method): options go to the method's config, not here")
            self.method = method
            return
        options = {**parse_optim_args(optim_args), **options}
        if "base" in options:
            raise SharpnessConfigError(f"base={options['base']}: in a plain loop the base optimizer is the one you "
                                       f"pass (here {type(base).__name__}); drop base")
        cfg = SharpnessConfig.create(method, **options)
        if cfg.base_optim_args:
            raise SharpnessConfigError(
                f"{', '.join(cfg.base_optim_args)}: base-optimizer keys are set on the base optimizer you pass "
                f"(here {type(base).__name__}); SharpnessOptimizer takes --optim {cfg.method}'s own options")
        if cfg.scheduled and (cfg.start, cfg.stop) != (0.0, 1.0) and not total_steps:
            raise SharpnessConfigError("start/stop are fractions of the run's optimizer steps: give total_steps too")
        method_cls = registry.get(cfg.method).method
        if method_cls.needs_total_steps and not total_steps:
            raise SharpnessConfigError(f"--optim {cfg.method} follows the run's length: give total_steps (the number "
                                       "of optimizer steps the loop will take)")
        params = [p for g in base.param_groups for p in g["params"]]
        device = params[0].device if params else torch.device("cpu")
        sharding = "fsdp2" if any(dtensor.is_sharded(p) for p in params) else None
        layout = make_layout(cfg, method_cls, device, timeout_s, sharding)
        method_cls.check(cfg, layout)
        self.method = method_cls(cfg, base, max_grad_norm=max_grad_norm, layout=layout, model=model)
        layout.prepare_params(self.method.params, list(model.buffers()) if model is not None else [])

    # ---- what an Optimizer holds: the base optimizer's ----------------------------------------------------------
    @property
    def param_groups(self):
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.base.param_groups = value

    @property
    def state(self):
        return self.base.state

    @state.setter
    def state(self, value):
        self.base.state = value

    @property
    def defaults(self):
        return self.base.defaults

    @defaults.setter
    def defaults(self, value):
        self.base.defaults = value

    @property
    def layout(self):
        return self.method.layout

    def add_param_group(self, param_group):
        self.base.add_param_group(param_group)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next steps belong to (0-based), for methods that follow the epoch (SAF, MESA); without it
        the epoch is the step count // steps_per_epoch."""
        self.epoch = int(epoch)

    def _progress(self, step: int) -> Progress:
        epoch = self.epoch
        if epoch is None and self.steps_per_epoch:
            epoch = step // self.steps_per_epoch
        if epoch is None and self.method.needs_epoch:
            raise SharpnessConfigError(f"--optim {self.method.name} follows the epoch: give SharpnessOptimizer "
                                       "steps_per_epoch=..., or call optimizer.set_epoch(epoch) at each epoch's start")
        return Progress(step, self.total_steps, epoch)

    def data_shard(self) -> tuple[int, int]:
        """(number of shards, this rank's shard) of the data, e.g. for DistributedSampler(num_replicas, rank): in
        role mode ranks (0, i) and (1, i) read the same shard."""
        plan = self.layout.plan
        return (plan.dp_size, plan.dp_rank) if self.layout.roles else (plan.world_size, plan.rank)

    # ---- the step --------------------------------------------------------------------------------------------
    def step(self, closure=None):
        if closure is None:
            return self._base_step()
        return self._closure_step(closure)

    def _base_step(self):
        """The base optimizer's step on the gradient the method left in `.grad`, unless the method skips it."""
        self.skipped_last_step = self.skip_next_step
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        if not self.method.times_optimizer_step:
            return self.base.step()
        # Asynchronous SAM's ascent_batch_ratio=auto: each rank's step costs time outside the passes too
        self.method.synchronize()
        start = time.perf_counter()
        out = self.base.step()
        self.method.synchronize()
        self.method.last_step_seconds = time.perf_counter() - start
        return out

    def _closure_step(self, closure):
        method, layout, cfg = self.method, self.method.layout, self.method.config
        if not isinstance(closure, Mapping) and method.slices_batches:
            raise TypeError(f"--optim {cfg.method} with these options cuts each step's batch into samples, which a "
                            "plain closure cannot do: pass sam_hf.BatchClosure(loss_fn, batch) to step()")
        if not isinstance(closure, Mapping) and method.rule is not None and method.rule.ascent_loss is not None:
            raise TypeError(f"rule={cfg.rule} computes its ascent on the model's logits, which a plain closure does not "
                            "give: pass sam_hf.BatchClosure(lambda b: model(**b), batch) to step(), its loss_fn "
                            "returning the model's outputs (with `loss` and `logits`), or BatchClosure(loss_fn, batch, "
                            "logits_fn=...)")
        if not isinstance(closure, Mapping) and method.needs_outputs:
            raise TypeError(f"--optim {cfg.method} with these options reads the model's outputs, which a plain closure "
                            "does not give: pass sam_hf.BatchClosure(lambda b: model(**b), batch) to step(), its "
                            "loss_fn returning the model's outputs (with `loss` and `logits`)")
        step = layout.step_index = self.steps
        method.progress = self._progress(step)
        layout.before_step(None, self.model, method)
        if cfg.check_every and step % cfg.check_every == 0:
            layout.check_replicas(method.params, step)
        id_column = method.example_id_column(cfg)
        passes = ClosurePasses(getattr(closure, "loss_fn", None), batchnorms(self.model), cfg.bn_stats == "clean",
                               hidden=(id_column,) if id_column else (), logits_fn=getattr(closure, "logits_fn", None))
        # without total_steps only `interval` schedules (start/stop need it, checked at construction)
        active = cfg.active(step, self.total_steps or step + 1)
        if active:
            result = layout.step(method, [closure], passes, step)
        else:  # outside the schedule: the base optimizer's own one-pass step
            zero_grads(method.params)
            result = StepResult(passes.backward(closure))
            layout.all_reduce_grads(method.params)
        if method.schedulable:
            result.metrics["sam/active"] = float(active)
        layout.sync_buffers(batchnorms(self.model), method.clean_role, step)
        self.steps += 1
        self.last_metrics = {k: float(v) for k, v in result.metrics.items()}
        self.skip_next_step = result.skip_update
        if not result.skip_update and self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in method.params if p.grad is not None], self.max_grad_norm)
        self._base_step()
        return result.loss

    def zero_grad(self, set_to_none: bool = True):
        self.base.zero_grad(set_to_none=set_to_none)

    def train(self):
        if hasattr(self.base, "train"):
            self.base.train()

    def eval(self):
        if hasattr(self.base, "eval"):
            self.base.eval()

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def gather_state(self) -> None:
        """Every rank, before `state_dict()` on several processes: gather per-shard state (SAMPa's held batch) so
        that the checkpoint resumes on another number of processes (in one process `state_dict` does it)."""
        self.method.prepare_checkpoint()

    def state_dict(self):
        if not self.layout.distributed:
            self.method.prepare_checkpoint()
        state = self.base.state_dict()
        state[STATE_KEY] = self.method.state_dict()
        if self.steps:  # a plain loop's step count (schedules, replica checks); Trainer keeps its own
            state[STEPS_KEY] = self.steps
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        method_state = state_dict.pop(STATE_KEY, None)
        self.steps = int(state_dict.pop(STEPS_KEY, self.steps))
        self.base.load_state_dict(state_dict)
        if method_state is not None:
            self.method.load_state_dict(method_state)

    def __repr__(self):
        return f"SharpnessOptimizer({self.method.name}, base={self.base!r})"
