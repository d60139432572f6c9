"""Sharpness, measured: the Hessian's top eigenvalues and trace, offline, in the training loop, or for a saved model.

The quantity. x are the trainable parameters (`requires_grad`; with PEFT the
adapters only), S a fixed sample split into batches B_1..B_m of sizes n_b,
N = sum_b n_b, and f(x, B_b) the model's mean loss on B_b. The measured loss
and its Hessian are

    F(x) = sum_b (n_b / N) f(x, B_b)          H = grad^2 F(x)  (n x n, symmetric)

H is never formed. A Hessian-vector product is a double backward (Pearlmutter):

    H v = grad_x < grad_x F(x), v >

one forward and two backward passes over S per product (about 2 x a training
forward-backward), at the memory of one batch's double backward: the graph is
rebuilt batch by batch for each product.

* lambda_max and the top k eigenvalues (largest algebraic, so negative
  curvature shows as it is): implicitly restarted Lanczos, ARPACK through
  `scipy.sparse.linalg.eigsh(LinearOperator(H), k, which="LA")`, from a seeded
  start vector. A measurement costs about as many products as Lanczos
  iterations (typically 20-60; ARPACK keeps `ncv` float64 vectors of length n
  on the CPU: 20 x 8 bytes per parameter by default).
* trace(H): Hutchinson, tr H = E[z^T H z] for Rademacher z (entries +-1), the
  mean over `trace_samples` probes from a seeded generator, with its standard
  error. Each batch's gradient graph serves all probes, so a probe costs one
  second backward per batch.

Measuring changes nothing: the model runs in eval mode (dropout off, BatchNorm
on its running statistics, deterministic), and train/eval flags, RNG states
(torch CPU and CUDA, `random`, numpy), BatchNorm statistics and every
parameter's `.grad` are put back exactly afterwards. Attention runs on the math
kernel of `scaled_dot_product_attention`, the one with a double backward.

On several processes (torch.distributed initialised) each rank passes its own
shard of S: N is summed over the ranks and every product is all-reduced, so
the result is that of S in one process. Rank 0 drives ARPACK and the probes and
sends each vector to the others (so every rank applies H to the same vector,
whatever its BLAS threads do), then sends the results: every rank returns the
same numbers.

`SharpnessCallback` logs these figures during training for any optimizer;
`sam-hf sharpness MODEL_DIR --train_file F` measures a saved text classifier.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import random
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

LossFn = Callable[[nn.Module, object], torch.Tensor]


# ---- the loss -------------------------------------------------------------------------------------------------
def loss_of(outputs) -> torch.Tensor:
    """The loss in a model's outputs, as Trainer reads it: `outputs["loss"]` for dict-like outputs
    (ModelOutput), the first element of a tuple, or the tensor itself."""
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)):
        loss = outputs[0] if outputs else None
    elif torch.is_tensor(outputs):
        loss = outputs
    else:
        loss = getattr(outputs, "loss", None)
    if loss is None or not torch.is_tensor(loss) or loss.numel() != 1:
        raise ValueError("measure_sharpness: the model returned no scalar loss for a batch; give the batches their "
                         "labels, or pass loss_fn(model, batch) -> scalar")
    return loss.reshape(())


def model_loss(model: nn.Module, batch) -> torch.Tensor:
    """The default loss: the model's own mean loss on the batch (`model(**batch)`)."""
    if isinstance(batch, Mapping):
        return loss_of(model(**batch))
    if isinstance(batch, (tuple, list)):
        return loss_of(model(*batch))
    return loss_of(model(batch))


def batch_size(batch) -> int:
    """Examples in a batch: the length of `labels` if present, else of the first tensor found."""
    if isinstance(batch, Mapping):
        values = [batch["labels"]] if torch.is_tensor(batch.get("labels")) else list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        values = [batch]
    for value in values:
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, (Mapping, tuple, list)) and value:
            return batch_size(value)
    raise ValueError("measure_sharpness: cannot tell how many examples a batch holds (no tensor with a batch "
                     "dimension in it); batches must be dicts, tuples or tensors of batched tensors")


def _to_device(batch, device: torch.device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ---- what measuring must leave as it was --------------------------------------------------------------------------
@contextlib.contextmanager
def kept_rng():
    """Leave the RNG states (torch CPU and CUDA, `random`, numpy) as they were before the body."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    cpu, python, numpy = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        random.setstate(python)
        np.random.set_state(numpy)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run the body in eval mode; afterwards restore every module's train/eval flag, the RNG states, normalisation
    running statistics and each parameter's `.grad` (same tensor, same values), whatever the body did.

    Under Trainer's mixed precision accelerate has replaced `model.forward` by an autocast wrapper (keeping the
    original as `_original_forward`): the body runs the original, so products are in the parameters' precision
    (fp16 second derivatives would overflow), and the wrapper is put back."""
    modes = [(m, m.training) for m in model.modules()]
    stats = [(b, b.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             for b in m.buffers(recurse=False) if b is not None]
    grads = [(p, p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    autocast_forward = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    model.eval()
    if autocast_forward is not None:
        model.forward = model._original_forward
    try:
        with kept_rng():
            yield
    finally:
        if autocast_forward is not None:
            model.forward = autocast_forward
        with torch.no_grad():
            for b, saved in stats:
                b.copy_(saved)
            for p, grad, saved in grads:
                if grad is not None:
                    grad.copy_(saved)
                p.grad = grad
        for m, training in modes:
            m.training = training


def _math_attention():
    """The math kernel of scaled_dot_product_attention: the fused ones have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


# ---- the operator ---------------------------------------------------------------------------------------------
class _Group:
    """The processes that share the sample: one (no torch.distributed), or a process group driven by its rank 0."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        self.src = dist.get_global_rank(group, 0) if self.world > 1 and group is not None else 0
        # gloo reduces CPU tensors; nccl the device's own
        self.staging = device if self.world > 1 and "nccl" in str(dist.get_backend(group)) else torch.device("cpu")

    @property
    def driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world == 1:
            return t
        staged = t.to(self.staging)
        dist.all_reduce(staged, op=op or dist.ReduceOp.SUM, group=self.group)
        return staged.to(t.device)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        staged = t.to(self.staging)
        dist.broadcast(staged, src=self.src, group=self.group)
        return staged.to(t.device)


class HessianOperator:
    """v -> H v for the Hessian of the size-weighted mean loss over `batches` (this rank's shard), all-reduced."""

    GO, DONE, FAILED = 1.0, 0.0, -1.0  # headers of the vectors rank 0 sends

    def __init__(self, model: nn.Module, batches: list, loss_fn: LossFn, group=None):
        self.model, self.loss_fn = model, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("measure_sharpness: the model has no trainable parameters (requires_grad)")
        self.device = self.params[0].device
        self.batches = [_to_device(b, self.device) for b in batches]
        self.n = sum(p.numel() for p in self.params)
        self.group = _Group(group, self.device)
        sizes = [batch_size(b) for b in self.batches]
        total = self.group.all_reduce(torch.tensor([float(sum(sizes))], dtype=torch.float64))
        widest = self.group.all_reduce(torch.tensor([float(self.n), -float(self.n)], dtype=torch.float64),
                                       dist.ReduceOp.MAX if self.group.world > 1 else None)
        if widest[0] != -widest[1]:
            raise ValueError(f"measure_sharpness: the ranks hold different numbers of trainable parameters "
                             f"({int(-widest[1])} to {int(widest[0])}); every rank must pass the same model")
        self.num_samples = int(total.item())
        if self.num_samples == 0:
            raise ValueError("measure_sharpness: no examples in the batches (on any rank)")
        self.weights = [s / self.num_samples for s in sizes]  # n_b / N, N over all ranks
        self.products = 0

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(v[start:start + p.numel()].view_as(p).to(p.device, p.dtype))
            start += p.numel()
        return out

    def _gradients(self, batch, weight: float):
        """(n_b/N) grad f(x, B_b) per parameter, with its graph (for a second backward)."""
        loss = self.loss_fn(self.model, batch) * weight
        return torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

    @staticmethod
    def _dot(xs, ys) -> torch.Tensor | None:
        terms = [(x * y).sum() for x, y in zip(xs, ys) if x is not None and y is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def _local(self, v: torch.Tensor) -> torch.Tensor:
        """sum over this rank's batches of (n_b/N) H_b v, as one float64 vector."""
        out = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        vs = self._split(v)
        for batch, weight in zip(self.batches, self.weights):
            with torch.enable_grad():
                dot = self._dot(self._gradients(batch, weight), vs)
                if dot is None or not dot.requires_grad:  # the loss is at most linear in the parameters: H v = 0
                    continue
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            start = 0
            for p, h in zip(self.params, hv):
                if h is not None:
                    out[start:start + p.numel()] += h.detach().reshape(-1).to(self.device, torch.float64)
                start += p.numel()
        return out

    def hutchinson(self, probes: int, seed: int) -> list[float]:
        """z_t^T H z_t for `probes` Rademacher vectors z_t, on every rank at once (the same z_t everywhere).

        Batches outside, probes inside: each batch's gradient graph is built once and serves every probe, so a
        probe costs one second backward per batch; the T quadratic forms are all-reduced in one go."""
        forms = torch.zeros(probes, dtype=torch.float64)
        for batch, weight in zip(self.batches, self.weights):
            draw = torch.Generator().manual_seed(seed)  # the same probes for every batch and every rank
            with torch.enable_grad():
                grads = self._gradients(batch, weight)
                for t in range(probes):
                    zs = self._split(torch.randint(0, 2, (self.n,), generator=draw).to(torch.float64) * 2 - 1)
                    dot = self._dot(grads, zs)
                    if dot is None or not dot.requires_grad:
                        continue
                    hz = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
                    form = self._dot(hz, zs)
                    if form is not None:
                        forms[t] += float(form)
            del grads
        self.products += probes
        return self.group.all_reduce(forms).tolist()

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.group.all_reduce(self._local(v.to(self.device)))

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """On rank 0: send v to the other ranks, return H v (all-reduced)."""
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
        if self.group.world > 1:
            self.group.broadcast(torch.cat([torch.tensor([self.GO], dtype=torch.float64), v]))
        return self._apply(v).cpu().numpy()

    def serve(self) -> None:
        """On the other ranks: apply H to the vectors rank 0 sends, until it says done."""
        while True:
            message = self.group.broadcast(torch.empty(self.n + 1, dtype=torch.float64))
            if message[0] == self.DONE:
                return
            if message[0] == self.FAILED:
                raise RuntimeError("measure_sharpness failed on rank 0 (see its error)")
            self._apply(message[1:])

    def stop(self, ok: bool) -> None:
        if self.group.world > 1:
            self.group.broadcast(torch.full((self.n + 1,), self.DONE if ok else self.FAILED, dtype=torch.float64))


def _check_int(name: str, value, low: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r}: {hint}")
    return int(value)


def _top_eigenvalues(op: HessianOperator, top_k: int, seed: int, tol: float, max_iter, ncv) -> list[float]:
    """ARPACK's implicitly restarted Lanczos on H (on rank 0, which sends the vectors), largest algebraic first."""
    try:
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
    except ImportError as err:
        op.stop(ok=False)
        raise ImportError("measure_sharpness needs scipy (its ARPACK eigensolver): pip install scipy") from err
    ok = False
    try:
        hessian = LinearOperator((op.n, op.n), matvec=op.matvec, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(op.n)
        try:
            values = eigsh(hessian, k=top_k, which="LA", v0=v0, tol=tol, maxiter=max_iter, ncv=ncv,
                           return_eigenvectors=False)
        except ArpackNoConvergence as err:
            if len(err.eigenvalues) < top_k:
                raise RuntimeError(f"measure_sharpness: Lanczos did not converge after {op.products} "
                                   f"Hessian-vector products; raise max_iter (now {max_iter}) or tol (now {tol}), "
                                   "or lower top_k") from err
            values = err.eigenvalues
        ok = True
        return sorted((float(v) for v in values), reverse=True)[:top_k]
    finally:
        op.stop(ok)


def measure_sharpness(model: nn.Module, batches, *, loss_fn: LossFn | None = None, top_k: int = 1,
                      trace_samples: int = 0, seed: int = 0, tol: float = 1e-4, max_iter: int | None = None,
                      ncv: int | None = None, group=None) -> dict:
    """The top eigenvalues and trace of the Hessian of the mean loss over `batches` (see the module docstring).

    Args:
        model: any `nn.Module`; the Hessian is taken w.r.t. its parameters with `requires_grad`.
        batches: an iterable of batches (dicts of tensors as Trainer feeds them, tuples, or tensors), or one
            batch; each is weighted by its number of examples. On several processes: this rank's shard.
        loss_fn: `loss_fn(model, batch) -> scalar`, the batch's mean loss; default the model's own loss
            (`model(**batch)["loss"]`).
        top_k: how many of the largest (algebraic) eigenvalues; `lambda_max` is the first.
        trace_samples: Rademacher probes for the Hutchinson trace; 0 skips it (`trace` is None).
        seed: seeds the Lanczos start vector and the probes (the same seed gives the same figures).
        tol, max_iter, ncv: passed to `scipy.sparse.linalg.eigsh` (relative accuracy of the eigenvalues, restarts,
            Lanczos vectors kept).
        group: the process group sharing the sample (default: all processes, when torch.distributed is up).

    Returns a dict: `lambda_max`, `top_eigenvalues` (descending), `trace` (or None) and `trace_stderr`,
    `num_samples` (over all ranks), `num_parameters`, `hessian_vector_products` (Lanczos' products, each a
    forward and a double backward over the sample, plus one per trace probe, each a second backward per batch)
    and `seconds`. Every rank gets the same dict.
    """
    top_k = _check_int("top_k", top_k, 1, "the number of top eigenvalues must be an integer >= 1")
    trace_samples = _check_int("trace_samples", trace_samples, 0, "the Hutchinson probes must be an integer >= 0 "
                                                                  "(0: no trace)")
    if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"tol={tol!r}: the eigenvalues' relative accuracy must be in [0, 1) (0: machine precision)")
    if isinstance(batches, Mapping) or torch.is_tensor(batches):
        batches = [batches]
    start = time.perf_counter()
    with preserved_state(model), _math_attention():
        op = HessianOperator(model, list(batches), loss_fn or model_loss, group)
        if top_k >= op.n:
            raise ValueError(f"top_k={top_k}: must be smaller than the {op.n} trainable parameters")
        if op.group.driver:
            values = _top_eigenvalues(op, top_k, seed, tol, max_iter, ncv)
        else:
            op.serve()
        forms = op.hutchinson(trace_samples, seed) if trace_samples else []
        if op.group.driver:
            trace = float(np.mean(forms)) if forms else math.nan
            stderr = float(np.std(forms, ddof=1) / math.sqrt(len(forms))) if len(forms) > 1 else math.nan
            figures = torch.tensor([*values, trace, stderr, op.products, time.perf_counter() - start],
                                   dtype=torch.float64)
        else:
            figures = torch.empty(top_k + 4, dtype=torch.float64)
        figures = op.group.broadcast(figures).tolist()  # every rank returns rank 0's figures (and time)
    values, (trace, stderr, products, seconds) = figures[:top_k], figures[top_k:]
    return {"lambda_max": values[0], "top_eigenvalues": values,
            "trace": None if trace_samples == 0 else trace,
            "trace_stderr": None if trace_samples < 2 else stderr,
            "num_samples": op.num_samples, "num_parameters": op.n,
            "hessian_vector_products": int(products), "seconds": seconds}


# ---- in the training loop ------------------------------------------------------------------------------------
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
    them) in batches of `batch_size` (default: `per_device_train_batch_size`), and kept: every measurement of
    the run uses the same examples. On several processes each rank holds every world_size-th of them.
    The measurement changes nothing in training (see `measure_sharpness`): a run ends with the same weights,
    bitwise, with or without this callback. Cost per measurement: about 2 x (Lanczos iterations, typically
    20-60) forward-backward passes over the sample, plus about one backward pass over it per trace probe.

    The callback finds its Trainer through the model (`import sam_hf` registers every Trainer built after it),
    so it works passed in `Trainer(callbacks=[...])` or added with `trainer.add_callback`.
    """

    def __init__(self, every: int, samples: int = 256, top_k: int = 1, trace_samples: int = 0, seed: int = 0,
                 at_end: bool = True, batch_size: int | None = None, loss_fn: LossFn | None = None,
                 tol: float = 1e-4):
        self.every = _check_int("every", every, 1, "measure every N optimizer steps: an integer N >= 1")
        self.samples = _check_int("samples", samples, 1, "the sample's size: an integer >= 1 (e.g. 256)")
        self.top_k = _check_int("top_k", top_k, 1, "the number of top eigenvalues: an integer >= 1")
        self.trace_samples = _check_int("trace_samples", trace_samples, 0,
                                        "Hutchinson probes for the trace: an integer >= 0 (0: no trace)")
        self.seed = _check_int("seed", seed, 0, "the sample's seed: an integer >= 0")
        self.batch_size = None if batch_size is None else _check_int(
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
        from .trainer.integration import trainer_of

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


# ---- for a saved model: sam-hf sharpness ---------------------------------------------------------------------
# GLUE's text columns (the `glue` configs of `datasets`), first match wins
TEXT_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                ("question", "sentence"), ("sentence", None), ("text", None))

DESCRIPTION = """\
Measure the Hessian sharpness of a saved text classifier on a fixed sample of its training data:
lambda_max (and the top K eigenvalues) by Lanczos, the trace by Hutchinson, printed and written as JSON.

MODEL_DIR: a folder written by save_pretrained (e.g. a Trainer's output_dir) holding a sequence-
classification model (AutoModelForSequenceClassification) and its tokenizer (AutoTokenizer). The model is
loaded in float32 and measured in eval mode, with respect to all its parameters.

--train_file: GLUE-style data, as JSON lines (.jsonl, or .json holding lines or one list) or CSV/TSV (.csv,
.tsv), with the text in `sentence`, or a pair in `sentence1`/`sentence2` (also premise/hypothesis,
question1/question2, question/sentence, or `text`), and a `label` column: class ids, or label names from the
model's config (label2id), or floats for a regression model (num_labels=1). Other models and tasks: call
sam_hf.measure_sharpness(model, batches) from Python.

Cost: about 2 x (Lanczos iterations, typically 20-60) forward-backward passes over the sample for the
eigenvalues, plus about one backward pass over it per trace probe."""


def read_rows(path: str) -> list[dict]:
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = file.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix in (".csv", ".tsv"):
        with file.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"--train_file {path}: expected JSON lines (.jsonl/.json) or CSV/TSV (.csv/.tsv)")


def text_columns(row: dict) -> tuple[str, str | None]:
    for first, second in TEXT_COLUMNS:
        if first in row and (second is None or second in row):
            return first, second
    raise ValueError(f"--train_file: no text columns found among {sorted(row)}; expected sentence, "
                     "sentence1+sentence2, premise+hypothesis, question1+question2, question+sentence or text")


def label_ids(values: list, config) -> list:
    if config.num_labels == 1:  # regression
        return [float(v) for v in values]
    names = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    out = []
    for value in values:
        if isinstance(value, (int, float)) or str(value).strip().lstrip("-").isdigit():
            out.append(int(float(value)))
        elif str(value) in names:
            out.append(names[str(value)])
        else:
            raise ValueError(f"--train_file: label {value!r} is neither a class id nor one of the model's label "
                             f"names {sorted(names)}")
        if not 0 <= out[-1] < config.num_labels:
            raise ValueError(f"--train_file: label {value!r} is outside the model's {config.num_labels} classes")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam-hf sharpness", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the saved model and tokenizer")
    parser.add_argument("--train_file", required=True, help="JSON lines or CSV/TSV with text columns and `label`")
    parser.add_argument("--samples", type=int, default=256, help="examples in the sample, picked with --seed "
                                                                 "(default 256; all rows if fewer)")
    parser.add_argument("--top_k", type=int, default=1, help="top eigenvalues to compute (default 1)")
    parser.add_argument("--trace_samples", type=int, default=0, help="Hutchinson probes for the trace (0: none)")
    parser.add_argument("--batch_size", type=int, default=32, help="examples per forward pass (default 32)")
    parser.add_argument("--max_seq_length", type=int, default=128, help="tokens per example, truncated (128)")
    parser.add_argument("--seed", type=int, default=0, help="picks the sample, the Lanczos start and the probes")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative accuracy of the eigenvalues (1e-4)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", default=None, help="the JSON file to write (default MODEL_DIR/sharpness.json)")
    args = parser.parse_args(argv)
    for name, low in (("samples", 1), ("top_k", 1), ("trace_samples", 0), ("batch_size", 1),
                      ("max_seq_length", 1), ("seed", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name} {getattr(args, name)}: must be >= {low}")
    if not Path(args.model_dir, "config.json").is_file():
        parser.error(f"MODEL_DIR {args.model_dir}: no config.json there (a folder written by save_pretrained)")
    if not Path(args.train_file).is_file():
        parser.error(f"--train_file {args.train_file}: no such file")

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, dtype=torch.float32).to(device)
    try:
        rows = read_rows(args.train_file)
        if not rows:
            raise ValueError(f"--train_file {args.train_file}: no rows")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))
        rows = [rows[i] for i in sorted(order[:args.samples].tolist())]
        first, second = text_columns(rows[0])
        if any("label" not in row for row in rows):
            raise ValueError(f"--train_file {args.train_file}: every row needs a `label`")
        labels = label_ids([row["label"] for row in rows], model.config)
    except (ValueError, json.JSONDecodeError) as err:
        print(f"sam-hf sharpness: {err}", file=sys.stderr)
        return 2
    texts = [[str(row[first]) for row in rows]] + ([[str(row[second]) for row in rows]] if second else [])
    encoded = tokenizer(*texts, truncation=True, max_length=args.max_seq_length)
    features = [{**{k: v[i] for k, v in encoded.items()}, "labels": labels[i]} for i in range(len(rows))]
    collate = DataCollatorWithPadding(tokenizer)
    batches = [collate(features[i:i + args.batch_size]) for i in range(0, len(features), args.batch_size)]
    result = measure_sharpness(model, batches, top_k=args.top_k, trace_samples=args.trace_samples,
                               seed=args.seed, tol=args.tol)

    print(f"lambda_max        {result['lambda_max']:.6g}")
    if args.top_k > 1:
        print(f"top {args.top_k} eigenvalues  " + ", ".join(f"{v:.6g}" for v in result["top_eigenvalues"]))
    if result["trace"] is not None:
        spread = f" +- {result['trace_stderr']:.3g}" if result["trace_stderr"] is not None else ""
        print(f"trace             {result['trace']:.6g}{spread} ({args.trace_samples} Rademacher probes)")
    print(f"{result['num_samples']} examples, {result['num_parameters']:,} parameters, "
          f"{result['hessian_vector_products']} Hessian-vector products, {result['seconds']:.1f} s")
    output = Path(args.output or Path(args.model_dir, "sharpness.json"))
    record = {"model_dir": str(args.model_dir), "train_file": str(args.train_file), "seed": args.seed,
              "top_k": args.top_k, "trace_samples": args.trace_samples, "text_columns": [first, second], **result}
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
