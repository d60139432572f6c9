"""SharpnessCallback: the Hessian's lambda_max (and trace) of the training loss, logged during training.

A TrainerCallback gets the model but not the Trainer, and logging goes through `Trainer.log`. So the Trainers
are remembered under their models, weakly: `remember_trainer(trainer)` (which `import sam_hf`'s Trainer patch
calls for every Trainer built) and `trainer_of(model)`.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from transformers import TrainerCallback

from .batches import LossFn, by_length
from .hessian import check_int, measure_sharpness
from .state import kept_rng

_trainers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> weakref to its Trainer


def remember_trainer(trainer) -> None:
    """Record `trainer` as the Trainer of its model (the last one built wins; neither is kept alive)."""
    if getattr(trainer, "model", None) is not None:
        _trainers[trainer.model] = weakref.ref(trainer)


def trainer_of(model):
    """The last Trainer remembered for `model` (and still alive), or None."""
    ref = _trainers.get(model) if model is not None else None
    return ref() if ref is not None else None


class SharpnessCallback(TrainerCallback):
    """Measures the Hessian's λ_max (and optionally more eigenvalues and the trace) of the training loss every
    `every` optimizer steps, on a fixed sample, and logs it through `Trainer.log`; works with any optimizer.

    Logged keys: `sharpness/lambda_max`, `sharpness/lambda_2` .. `sharpness/lambda_{top_k}`, `sharpness/trace`
    (with `trace_samples`), `sharpness/seconds` (the measurement's wall time) and `sharpness/total_seconds` (all
    measurements of this `train()` so far). They reach the progress bar, TensorBoard, W&B and
    `trainer_state.json` as any logged metric does.

    Reading Trainer's speed figures: `train_runtime`, `train_steps_per_second` and `train_samples_per_second`
    include the measurements made during training (Trainer times the whole loop, callbacks included), not the
    one at the end (it runs after Trainer took its figures). Training alone ran `train_runtime - T` seconds, T the
    last `sharpness/total_seconds` logged before the end: steps per second = global_step / (train_runtime - T).

    The sample: `samples` examples of `trainer.train_dataset` picked with `seed` (an iterable dataset: its first
    `samples`), collated once by the Trainer's own data collator (unused columns removed as Trainer removes
    them) in batches of `batch_size` (default: `per_device_train_batch_size`), text sorted by length first so
    the batches pad little, and kept: every measurement of the run uses the same examples. On several processes
    each rank holds every world_size-th of them. The measurement changes nothing in training (see
    `measure_sharpness`): a run ends with the same weights, bitwise, with or without this callback. Cost per
    measurement: a forward and a backward over the sample to build the gradient graphs, then one backward
    through them per Lanczos iteration (lambda_max alone: 8 to about 16) and per trace probe.

    The callback finds its Trainer through the model (`remember_trainer`: `import sam_hf` registers every
    Trainer built after it), so it works passed in `Trainer(callbacks=[...])` or added with `trainer.add_callback`.
    """

    def __init__(self, every: int, samples: int = 256, top_k: int = 1, trace_samples: int = 0, seed: int = 0,
                 at_end: bool = True, batch_size: int | None = None, loss_fn: LossFn | None = None,
                 tol: float = 1e-3):
        self.every = check_int("every", every, 1, "measure every N optimizer steps: an integer N >= 1")
        self.samples = check_int("samples", samples, 1, "the sample's size: an integer >= 1 (e.g. 256)")
        self.top_k = check_int("top_k", top_k, 1, "the number of top eigenvalues: an integer >= 1")
        self.trace_samples = check_int("trace_samples", trace_samples, 0,
                                        "Hutchinson probes for the trace: an integer >= 0 (0: no trace)")
        self.seed = check_int("seed", seed, 0, "the sample's seed: an integer >= 0")
        self.batch_size = None if batch_size is None else check_int(
            "batch_size", batch_size, 1, "examples per batch of the sample: an integer >= 1, or None")
        if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
            raise ValueError(f"tol={tol!r}: the eigenvalues' relative accuracy must be in [0, 1)")
        self.at_end, self.loss_fn, self.tol = bool(at_end), loss_fn, float(tol)
        self.indices: list[int] | None = None  # the sample: indices into the train dataset
        self._batches: list | None = None
        self._sample_of = None  # weakref to the Trainer the sample was built for
        self._measured_at: int | None = None
        self._total_seconds = 0.0  # measurements of the current train()

    def _trainer(self, model):
        trainer = trainer_of(model)
        if trainer is None:
            raise RuntimeError("SharpnessCallback cannot find the Trainer training this model: import sam_hf "
                               "before building the Trainer (its Trainer patch registers each one)")
        return trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self._trainer(model)
        if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError("SharpnessCallback measures the whole parameter vector on every rank; FSDP and "
                             "DeepSpeed shard or wrap it: drop the callback, or train with DDP (torchrun)")
        if self._sample_of is None or self._sample_of() is not trainer:
            with kept_rng():  # a collator may draw random numbers (MLM masking): training must not see it
                self._batches = self._build_sample(trainer)
            self._sample_of = weakref.ref(trainer)
        self._measured_at = None
        self._total_seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._measure(self._trainer(model), state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.at_end and self._measured_at != state.global_step:
            self._measure(self._trainer(model), state.global_step)

    def _build_sample(self, trainer) -> list:
        dataset, collator = trainer.train_dataset, trainer.data_collator
        if dataset is None:
            raise ValueError("SharpnessCallback measures on training examples: the Trainer has no train_dataset")
        try:
            import datasets
        except ImportError:
            datasets = None
        # what Trainer's own dataloader does: a datasets.Dataset loses its unused columns, anything else gets a
        # collator that drops them
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = trainer._remove_unused_columns(dataset, description="sharpness")
        else:
            collator = trainer._get_collator_with_removed_columns(collator, description="sharpness")
        rank, world = trainer.args.process_index, trainer.args.world_size
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            examples = list(itertools.islice(iter(dataset), self.samples))
            self.indices = list(range(len(examples)))
            mine = examples[rank::world]
        else:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
            self.indices = sorted(order[:self.samples].tolist())
            mine = [dataset[i] for i in self.indices[rank::world]]
        if not self.indices:
            raise ValueError("SharpnessCallback: the train dataset has no examples to measure on")
        size = self.batch_size or trainer.args.per_device_train_batch_size
        mine = by_length(mine)  # text of varied lengths: batches that pad little
        return [trainer._prepare_inputs(collator(mine[i:i + size])) for i in range(0, len(mine), size)]

    def _measure(self, trainer, step: int) -> None:
        result = measure_sharpness(trainer.model, self._batches, loss_fn=self.loss_fn, top_k=self.top_k,
                                   trace_samples=self.trace_samples, seed=self.seed, tol=self.tol)
        logs = {"sharpness/lambda_max": result["lambda_max"]}
        logs.update({f"sharpness/lambda_{i}": v for i, v in enumerate(result["top_eigenvalues"][1:], start=2)})
        if result["trace"] is not None:
            logs["sharpness/trace"] = result["trace"]
        logs["sharpness/seconds"] = round(result["seconds"], 3)
        self._total_seconds += result["seconds"]
        logs["sharpness/total_seconds"] = round(self._total_seconds, 3)
        self._measured_at = step
        should_log = trainer.control.should_log
        trainer.log(logs)
        # Trainer's on_log resets should_log, which DefaultFlowCallback may just have set for this step's loss
        trainer.control.should_log = should_log
