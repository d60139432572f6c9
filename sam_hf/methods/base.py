"""What every method shares: the gradient-pass interface, the method base classes, one step's result.

A method turns one step's batches into the gradient left in `.grad`, the one the base optimizer then steps
with. It knows nothing of Trainer: the host hands it a `GradientPasses` object that runs forward + backward on
a batch exactly as the host's own loop would (Trainer's loss normalisation and loss scaling; a closure in a
plain loop), so `.grad` always holds *scaled* gradients in the host's units, and methods divide by
`loss_scale()` before any norm or lookahead. How gradients are averaged over processes, how norms are reduced
and where state lives is the layout's business (distributed/layouts): a method asks `self.layout` and never
tests which layout it runs under.

A method whose two passes are independent (SAMPa, Asynchronous SAM) derives from `TwoRoleMethod`, the
protocol the role-parallel layouts drive: each role runs `role_pass`, the layout exchanges the two gradients,
and every rank calls `finish` with both.

What else a method may need of its host, it declares (class attributes, read by Trainer's glue and by the
plain-loop optimizer alike, never by testing which method runs): the model's outputs of a pass (`needs_outputs`:
a pass then hands them to a `LossTerm`, and `forward` runs a pass without backward), the epoch
(`needs_epoch`), the run's length (`needs_total_steps`), the model itself (`needs_model`: its buffers and
train/eval mode) and a per-example id column of the training data (`example_id_column`). The host says where the
run stands in `method.progress` before every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..batching import Batch, Piece
from ..config import SharpnessConfig, SharpnessConfigError
from ..distributed.layouts.base import Layout
from ..tensors import trainable_params
from .rules import AscentRule, ParamInfo


# A term a method adds to a pass's loss (SAF's and MESA's trajectory loss): given the model's outputs and the
# pass's batch, per-item values (one per example, or one per scored token), weights included, or None to add
# nothing. The host adds them in the units of its own loss: their mean where the loss is a mean over the batch,
# their sum over the cycle's `num_items_in_batch` where the loss divides by that count (DESIGN.md, "Units").
LossTerm = Callable[[Any, Batch], "torch.Tensor | None"]


@dataclass
class Progress:
    """Where the run stands when a step starts, as the host knows it (None: the host does not know)."""

    step: int = 0  # the optimizer step being computed, 0-based (Trainer's global_step)
    total_steps: int | None = None  # the run's optimizer steps (Trainer's max_steps)
    epoch: int | None = None  # the epoch this step belongs to, 0-based (Trainer's state.epoch, integer part)
    num_examples: int | None = None  # examples in the training set, where it has a length


class GradientPasses(Protocol):
    def backward(self, batch: Batch, fraction: float = 1.0, clean: bool = True, part_of: Batch | None = None,
                 weight: float = 1.0, loss_term: LossTerm | None = None, ascent=None, last: bool = True
                 ) -> torch.Tensor:
        """Forward + backward on `batch`, adding to `.grad`; returns the detached loss as the host reports it.

        For a slice of a micro-batch, `part_of` is that micro-batch and `fraction` the slice's share of its
        samples: the slice then contributes exactly its part of the micro-batch's loss (DESIGN.md, "Units").
        `clean=False` marks a pass at perturbed weights (BatchNorm statistics are kept). `weight` multiplies the
        pass's loss (ESAM's selected rows stand for their whole batch). `loss_term` adds a term computed from the
        model's outputs to the loss before the backward (see LossTerm); the returned loss is the model's own.

        `ascent`: a rule's ascent loss (BiSAM's lower bound, methods/bisam.py), called as
        `ascent(logits, labels) -> (sum over the scored examples, their count)` on the model's logits and the
        batch's labels, aligned position by position (a causal LM's shifted). The pass then backpropagates that
        sum over the micro-batch's scored examples, divided by their number (and by the accumulation steps, as a
        mean loss), instead of the training loss; it still returns the training loss, for the logs.

        `last` marks the last backward of a pass (the gradient is read after it): a layout whose engine reduces
        gradients at an accumulation boundary (DeepSpeed) closes the pass there.
        """

    def forward(self, batch: Batch, clean: bool = True) -> Any:
        """The model's outputs on `batch` (a mapping with `logits`, or a tuple), without gradients. The per-pass
        metrics are left alone; `clean=False` keeps BatchNorm statistics as they were."""

    def loss_scale(self) -> float:
        """The mixed-precision loss scale `.grad` is multiplied by (1.0 without a GradScaler)."""


@dataclass
class StepResult:
    loss: torch.Tensor  # the clean loss, as Trainer's `loss` log reports it
    skip_update: bool = False  # SAMPa's first step computes g_0 only
    metrics: dict[str, Any] = field(default_factory=dict)


class SharpnessMethod:
    """Base class: a subclass implements `step` and, if it keeps state between steps, `state_dict` and
    `load_state_dict`. The class attributes say what the method needs of its host and layout."""

    name = ""  # set by registry.register_method
    schedulable = False  # interval/start/stop may make some steps the base optimizer's own (ScheduleOptions)
    skips_first_update = False  # the first step computes state only: the LR schedule waits too (SAMPa)
    times_optimizer_step = False  # the host times the base optimizer's step into `last_step_seconds`
    two_roles = False  # the two passes may run on two halves of the processes (TwoRoleMethod)
    clean_role = 0  # the role whose pass runs at unperturbed weights: BatchNorm statistics come from it
    slices_batches = False  # cuts a step's batch into samples (a plain loop must hand in a BatchClosure)
    extra_copies = 1  # copies of the trainable parameters kept beyond the base optimizer's, one process (memory)
    perturbs = True  # forms perturbations with the ascent rule (False: a loss transform such as SAF)
    # the ascent rules (rules.py) this method runs: those that only shape e from the gradient the method hands
    # `perturb_`; VaSSO (its average must be fed the schedule's ascent gradient once a step) and BiSAM (its ascent
    # passes compute another loss) need a schedule that does so
    rules = ("sam", "asam", "sam_on")
    needs_outputs = False  # reads the model's outputs of a pass (a plain loop's loss_fn must return them)
    needs_epoch = False  # reads progress.epoch (a plain loop: steps_per_epoch or set_epoch)
    needs_total_steps = False  # reads progress.total_steps (a plain loop: total_steps)
    needs_model = False  # reads the model (its buffers, its train/eval mode)

    def __init__(self, config: SharpnessConfig, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0,
                 param_names: dict[int, str] | None = None, layout: Layout | None = None,
                 model: torch.nn.Module | None = None):
        """`model` (or at least `param_names`, id(param) -> name) tells the rule what it needs of the parameters:
        ASAM's T by name, SAM-ON's normalization layers by module type."""
        self.config = config
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.layout = layout or Layout()
        self.model = model
        self.params = trainable_params(optimizer)
        info = ParamInfo.of(self.params, model, param_names)
        self.rule = AscentRule(config, self.layout, info.names, info.in_norm_layer) if self.perturbs else None
        self.last_step_seconds = 0.0
        self.progress = Progress()  # set by the host before every step
        if self.needs_model and model is None:
            raise SharpnessConfigError(f"--optim {self.name} needs the model (its buffers and train/eval mode): "
                                       f"SharpnessOptimizer(base, {self.name!r}, ..., model=model)")

    @classmethod
    def check(cls, config, layout: Layout, samples_per_rank: int | None = None) -> None:
        """Refuse, before training, what this method cannot do in `layout` (raise SharpnessConfigError).
        `samples_per_rank`: one step's samples on each rank, where the host knows it."""

    @classmethod
    def copies(cls, config) -> float:
        """Copies of the trainable parameters this configuration keeps beyond the base optimizer's, in one process
        (the memory meter's target): the method's own, plus the rule's state (VaSSO's average)."""
        return cls.extra_copies + (1 if getattr(config, "rule", "sam") == "vasso" else 0)

    @classmethod
    def example_id_column(cls, config) -> str | None:
        """The batch column holding a stable, unique id per training example that the method reads itself (SAF's
        per-example memory), or None. The host keeps it through Trainer's column removal and takes it out of the
        batch before the model's forward."""
        return None

    def rebind_params(self) -> None:
        """Point `self.params` at the parameters the base optimizer holds now (accelerate's FSDP2 preparation
        swaps them for sharded ones after the method was built). The order is kept, so everything indexed like
        `self.params` (state, the rule's names) stays valid."""
        current = trainable_params(self.optimizer)
        if len(current) != len(self.params):
            raise RuntimeError(f"sam_hf: the optimizer now holds {len(current)} trainable parameters, the method was "
                               f"built with {len(self.params)}")
        if any(a is not b for a, b in zip(current, self.params)):
            self.params = current

    def bind(self, params, names=None, in_norm_layer=None) -> None:
        """Run on `params` instead of the base optimizer's parameters: a layout's own tensors (DeepSpeed ZeRO's
        slices of its fp32 partitions), with their parameters' names (ASAM's T) and whether each belongs to a
        normalization layer (SAM-ON). State indexed like `self.params` must be empty or follow the same order."""
        self.params = list(params)
        if self.rule is not None:
            old, self.rule = self.rule, AscentRule(self.config, self.layout, names, in_norm_layer)
            self.rule.d, self.rule._skip = old.d, old._skip  # VaSSO's state follows the same order

    def perturb_(self, directions, scale: float = 1.0, keep_x: bool = False):
        """The rule's `perturb_` over this method's parameters: (backup or None, applied, norm)."""
        return self.rule.perturb_(self.params, directions, scale, keep_x)

    @property
    def device(self) -> torch.device:
        """Where the trainable weights (and so the method's state) live."""
        return self.params[0].device if self.params else torch.device("cpu")

    def synchronize(self) -> None:
        """Wait for this rank's queued GPU work, so a timing counts it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, batches: list[Batch], passes: GradientPasses) -> StepResult:
        raise NotImplementedError

    def prepare_checkpoint(self) -> None:
        """Every rank, before the state is saved (collectives allowed): gather what `state_dict` needs so that a
        run on another number of processes can resume it (SAMPa's held batch, from every data shard)."""

    def state_dict(self) -> dict[str, Any]:
        return self.rule_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_rule_state(state)

    def rule_state(self) -> dict[str, Any]:
        """The ascent rule's state (VaSSO's average) under the key "rule", or nothing for a stateless rule."""
        state = self.rule.state_dict() if self.rule is not None else {}
        return {"rule": state} if state else {}

    def load_rule_state(self, state: dict[str, Any]) -> None:
        if self.rule is not None:
            self.rule.load_state_dict(state.get("rule") or {}, self.device)


class TwoRoleMethod(SharpnessMethod):
    """A method whose step needs two independent gradients, so role 0 and role 1 may compute them at once.

    The role-parallel layout (layouts/roles.py) runs one step as: this rank's `role_pass(role, ...)`; the
    exchange, which gives every rank both gradients (the other role's received into `receive_buffers()`, the
    method state this rank has spent); then `finish(g0, g1, ...)` on every rank, identical everywhere. In one
    process (or data parallel, `parallel=off`) `step` runs both passes in turn and calls `finish` itself.
    """

    two_roles = True
    role_names: tuple[str, str] = ("first pass", "second pass")
    metrics_role = 0  # the role whose pass is the one that counts for the host's per-pass metrics in one process
    clean_role = 1  # the role whose pass runs at unperturbed weights: BatchNorm statistics come from it
    roles_hint = "an even number of processes"  # what parallel=auto needs for role mode, for the warning
    EXTRA_KEYS: tuple[str, ...] = ()  # the per-role floats `role_pass` returns, summed over the two roles

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._spent = None  # role mode: state buffers this rank no longer needs, to receive the other gradient

    @classmethod
    def roles_by_default(cls, world_size: int) -> bool:
        """Whether `parallel=auto` puts the two passes on two halves of `world_size` processes."""
        return world_size % 2 == 0

    @classmethod
    def check(cls, config, layout, samples_per_rank=None) -> None:
        if config.exchange_dtype != "fp32" and not layout.roles:
            raise SharpnessConfigError(
                f"optim_args: exchange_dtype={config.exchange_dtype!r} applies to the role exchange (two roles on 2 "
                f"or more processes, parallel=auto/on); this run is {layout.describe()}, so it would be ignored: "
                "drop exchange_dtype")

    def spend(self, buffers) -> None:
        """State this rank has used up this step: in role mode its buffers receive the other role's gradient."""
        if self.layout.roles and buffers is not None:
            self._spent = buffers

    def receive_buffers(self):
        """The spent state's buffers, handed to the exchange to receive the other role's gradient into."""
        out, self._spent = self._spent, None
        return out

    def role_pass(self, role: int, batches, passes) -> dict:
        """Run role `role`'s pass, leaving its gradient in `.grad`; returns the floats named in EXTRA_KEYS."""
        raise NotImplementedError

    def finish(self, g0, g1, batches, extras: dict, scale: float) -> StepResult:
        """Combine role 0's and role 1's unscaled fp32 gradients into `.grad` (scaled by `scale`); keep state."""
        raise NotImplementedError

    # ---- side gradients: more than one gradient from role 1 (SAMPa with BiSAM or micro-batches) ----------------
    side_averaged = True  # the role's k ranks average each side gradient (False: each rank's is its own)

    def side_count(self, batches) -> int:
        """How many more gradient lists role 1 sends role 0 after the exchange this step (the same on every rank)."""
        return 0

    def side_gradients(self) -> list:
        """Role 1: the side gradient lists, unscaled fp32, given away."""
        return []

    def receive_side(self, gradients: list) -> None:
        """Every rank: the side gradient lists, in order, before `finish`."""


def run_pieces(passes: GradientPasses, pieces: list[Piece], clean: bool = True, ascent=None) -> torch.Tensor:
    """One pass over sample ranges (the gradient is read after it); `ascent`: the rule's ascent loss instead of
    the training loss."""
    kw = {} if ascent is None else {"ascent": ascent}
    last = len(pieces) - 1
    return sum(passes.backward(p.batch, clean=clean, last=i == last, **kw) if p.parent is None else
               passes.backward(p.batch, p.fraction, clean=clean, part_of=p.parent, last=i == last, **kw)
               for i, p in enumerate(pieces))


def run_batches(passes: GradientPasses, batches: list[Batch], clean: bool = True, ascent=None) -> torch.Tensor:
    """One pass over whole micro-batches (the gradient is read after it); `ascent`: the rule's ascent loss instead
    of the training loss."""
    kw = {} if ascent is None else {"ascent": ascent}
    last = len(batches) - 1
    return sum(passes.backward(batch, clean=clean, last=i == last, **kw) for i, batch in enumerate(batches))


class Randomness:
    """The random state at construction, to run a second pass with it: BiSAM's lower bound at SAMPa's lookahead
    point is a second pass over the batch of the first, and drawing the same dropout masks makes the two passes
    what one forward with two backward passes would be."""

    def __init__(self, device: torch.device):
        self.devices = [device.index or 0] if device.type == "cuda" else []
        self.state = self._get()

    def _get(self):
        return torch.random.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices]

    def _set(self, state) -> None:
        torch.random.set_rng_state(state[0])
        for d, s in zip(self.devices, state[1]):
            torch.cuda.set_rng_state(s, d)

    @contextlib.contextmanager
    def again(self):
        """Run the block from the recorded state; afterwards the state is what it was before the block."""
        now = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self._set(now)
