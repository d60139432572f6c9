"""The Hessian operator v -> H v of the mean loss over a sample, and `measure_sharpness` on top of it.

The quantity. x are the trainable parameters (`requires_grad`; with PEFT the
adapters only), S a fixed sample split into batches B_1..B_m of sizes n_b,
N = sum_b n_b, and f(x, B_b) the model's mean loss on B_b. The measured loss
and its Hessian are

    F(x) = sum_b (n_b / N) f(x, B_b)          H = grad^2 F(x)  (n x n, symmetric)

H is never formed. A Hessian-vector product is reverse-over-reverse
(Pearlmutter): with g_b = (n_b / N) grad_x f(x, B_b) built with its graph,

    H v = sum_b grad_x < g_b, v >

Each batch's g_b and its graph are built once (a forward and a backward with
create_graph) and kept while they fit in memory (HessianOperator), so a
product is one backward through each kept graph; a graph that does not fit is
rebuilt for every product. Forward-over-reverse (torch.func.jvp over grad, as
curvlinops does it) was measured slower on a CPU than either
(benchmarks/sharpness_speed.py).

* lambda_max and the top k eigenvalues (largest algebraic, so negative
  curvature shows as it is): implicitly restarted Lanczos, ARPACK through
  `scipy.sparse.linalg.eigsh(LinearOperator(H), k, which="LA")`, from a seeded
  start vector. ARPACK stops when each wanted Ritz value theta has a residual
  |H y - theta y| <= tol |theta|, which puts an eigenvalue of H within
  tol |theta| of theta: tol (default 1e-3) bounds the relative error. For
  lambda_max alone ARPACK keeps ncv = 7 vectors (`default_ncv`): it checks
  convergence after 8 products, then every 4.
* trace(H): Hutchinson, tr H = E[z^T H z] for Rademacher z (entries +-1), the
  mean over `trace_samples` probes from a seeded generator, with its standard
  error. Each batch's gradient graph serves all probes, so a probe costs one
  second backward per batch.

Measuring changes nothing (state.py): the model runs in eval mode, and the
train/eval flags, RNG states, BatchNorm statistics and every parameter's
`.grad` are put back exactly afterwards.

On several processes (torch.distributed initialised) each rank passes its own
shard of S: N is summed over the ranks and every product is all-reduced, so
the result is that of S in one process. Rank 0 drives ARPACK and the probes and
sends each vector to the others (so every rank applies H to the same vector,
whatever its BLAS threads do), then sends the results: every rank returns the
same numbers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..tensors import to_device
from .batches import LossFn, count_examples, model_loss
from .group import Group
from .state import math_attention, preserved_state


def available_memory(device: torch.device) -> int:
    """Bytes free now: the accelerator's free memory, or the host's MemAvailable (0 if it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return 0


class GraphSize:
    """While active, counts the bytes of what autograd saves for backward (each storage once, parameters not):
    what keeping a gradient graph holds on to."""

    def __init__(self, exclude):
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return t

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


class HessianOperator:
    """v -> H v for the Hessian of the size-weighted mean loss over `batches` (this rank's shard), all-reduced.

    Each batch's gradient (n_b/N) grad f(x, B_b) is built with its graph (create_graph) once and kept while the
    kept graphs fit in `graph_memory` bytes (default: half the memory available when the first one is built,
    shared by the processes of one host); a product is then one backward through it per batch,
    H_b v = grad_x <g_b, v>, instead of a forward and two backwards. Graphs that do not fit are rebuilt for
    every product (the memory of one batch's double backward). Either way the products are the same numbers."""

    GO, DONE, FAILED = 1.0, 0.0, -1.0  # headers of the vectors rank 0 sends

    def __init__(self, model: nn.Module, batches: list, loss_fn: LossFn, group=None, graph_memory: int | None = None):
        self.model, self.loss_fn = model, loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("measure_sharpness: the model has no trainable parameters (requires_grad)")
        self.device = self.params[0].device
        self.batches = [to_device(b, self.device) for b in batches]
        self.n = sum(p.numel() for p in self.params)
        self.group = Group(group, self.device)
        sizes = [count_examples(b) for b in self.batches]
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
        self.graph_memory = graph_memory  # None: set when the first graph is built
        self.graphs: list[tuple | None] = [None] * len(self.batches)
        self.graph_bytes = [0] * len(self.batches)  # each batch's graph, as measured when built
        self.kept_bytes = 0

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for p in self.params:
            out.append(v[start:start + p.numel()].view_as(p).to(p.device, p.dtype))
            start += p.numel()
        return out

    def _build(self, index: int) -> tuple:
        loss = self.loss_fn(self.model, self.batches[index]) * self.weights[index]
        return torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

    def _gradients(self, index: int) -> tuple[tuple, bool]:
        """(n_b/N) grad f(x, B_b) per parameter with its graph (for second backwards), and whether it is kept."""
        if self.graphs[index] is not None:
            return self.graphs[index], True
        if self.graph_memory is None:  # after ARPACK has taken its vectors
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
            self.graph_memory = available_memory(self.device) // (2 * local)
        size = GraphSize(self.params)
        with size():
            grads = self._build(index)
        size.bytes += sum(g.untyped_storage().nbytes() for g in grads if g is not None)
        self.graph_bytes[index] = size.bytes
        if self.kept_bytes + size.bytes <= self.graph_memory:
            self.graphs[index] = grads
            self.kept_bytes += size.bytes
            return grads, True
        return grads, False

    def _hvp(self, grads: tuple, vs: list[torch.Tensor], retain: bool) -> tuple | None:
        """grad_x <g, v> for g = grads (with their graph): H_b v per parameter, or None where H_b = 0."""
        pairs = [(g, u) for g, u in zip(grads, vs) if g is not None and g.requires_grad]
        if not pairs:  # the loss is at most linear in the parameters: H v = 0
            return None
        outputs, directions = zip(*pairs)
        return torch.autograd.grad(outputs, self.params, grad_outputs=directions, retain_graph=retain,
                                   allow_unused=True)

    def _local(self, v: torch.Tensor) -> torch.Tensor:
        """sum over this rank's batches of (n_b/N) H_b v, as one float64 vector."""
        out = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        vs = self._split(v)
        for index in range(len(self.batches)):
            with torch.enable_grad():
                grads, kept = self._gradients(index)
                hv = self._hvp(grads, vs, retain=kept)
            del grads
            if hv is None:
                continue
            start = 0
            for p, h in zip(self.params, hv):
                if h is not None:
                    out[start:start + p.numel()] += h.detach().reshape(-1).to(self.device, torch.float64)
                start += p.numel()
        return out

    def hutchinson(self, probes: int, seed: int) -> list[float]:
        """z_t^T H z_t for `probes` Rademacher vectors z_t, on every rank at once (the same z_t everywhere).

        Batches outside, probes inside: each batch's gradient graph (kept from Lanczos, or built once here) serves
        every probe, so a probe costs one second backward per batch; the T quadratic forms are all-reduced in one
        go."""
        forms = torch.zeros(probes, dtype=torch.float64)
        for index in range(len(self.batches)):
            draw = torch.Generator().manual_seed(seed)  # the same probes for every batch and every rank
            with torch.enable_grad():
                grads, _ = self._gradients(index)
                for t in range(probes):
                    zs = self._split(torch.randint(0, 2, (self.n,), generator=draw).to(torch.float64) * 2 - 1)
                    hz = self._hvp(grads, zs, retain=True)
                    if hz is None:
                        continue
                    terms = [(h * z).sum() for h, z in zip(hz, zs) if h is not None]
                    if terms:
                        forms[t] += float(sum(terms[1:], terms[0]))
            del grads
        self.products += probes
        return self.group.all_reduce(forms).tolist()

    def release(self) -> None:
        """Drop the kept graphs (their memory)."""
        self.graphs = [None] * len(self.batches)
        self.kept_bytes = 0

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


def check_int(name: str, value, low: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r}: {hint}")
    return int(value)


def default_ncv(top_k: int, n: int) -> int:
    """Lanczos vectors ARPACK keeps (`ncv`) when none is given: 7 for lambda_max alone, scipy's own default
    (max(2 top_k + 1, 20)) for more, never more than n.

    ARPACK checks convergence once per restart cycle: after its first ncv + 1 products, then (top_k = 1, ncv >= 6)
    every ncv - ncv // 2, restarting from the best ncv // 2 Ritz vectors. scipy's ncv = 20 makes 21 products the
    least a lambda_max costs. The top eigenvalue of a network's Hessian is usually well separated and converges
    to tol = 1e-3 within about 8 Lanczos steps (all-MiniLM-L6-v2 on 64 SST-2 sentences: 8, residual 4e-4), and
    on model spectra (benchmarks/lanczos_ncv.py: an outlier over a decaying bulk, lambda_2/lambda_1 from 0.22 to
    0.93) ncv = 7 took 8-12 products (scipy's 20: 21), at most 3 more than the best ncv from 4 to 20. It checks
    at 8, 12, 16, ... products and holds 7 float64 vectors of length n."""
    return min(n, 7 if top_k == 1 else max(2 * top_k + 1, 20))


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
            values = eigsh(hessian, k=top_k, which="LA", v0=v0, tol=tol, maxiter=max_iter,
                           ncv=ncv or default_ncv(top_k, op.n), return_eigenvectors=False)
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
                      trace_samples: int = 0, seed: int = 0, tol: float = 1e-3, max_iter: int | None = None,
                      ncv: int | None = None, group=None, graph_memory: int | None = None) -> dict:
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
        graph_memory: bytes the kept gradient graphs may hold (see `HessianOperator`); default half the
            available memory; 0 rebuilds each batch's graph for every product (the memory of one batch).

    Returns a dict: `lambda_max`, `top_eigenvalues` (descending), `trace` (or None) and `trace_stderr`,
    `num_samples` (over all ranks), `num_parameters`, `hessian_vector_products` (Lanczos' products plus one
    per trace probe, each a backward through every batch's gradient graph, which the first product builds)
    and `seconds`. Every rank gets the same dict.
    """
    top_k = check_int("top_k", top_k, 1, "the number of top eigenvalues must be an integer >= 1")
    trace_samples = check_int("trace_samples", trace_samples, 0, "the Hutchinson probes must be an integer >= 0 "
                                                                  "(0: no trace)")
    if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"tol={tol!r}: the eigenvalues' relative accuracy must be in [0, 1) (0: machine precision)")
    if isinstance(batches, Mapping) or torch.is_tensor(batches):
        batches = [batches]
    start = time.perf_counter()
    with preserved_state(model), math_attention():
        op = HessianOperator(model, list(batches), loss_fn or model_loss, group, graph_memory)
        if top_k >= op.n:
            raise ValueError(f"top_k={top_k}: must be smaller than the {op.n} trainable parameters")
        try:
            if op.group.driver:
                values = _top_eigenvalues(op, top_k, seed, tol, max_iter, ncv)
            else:
                op.serve()
            forms = op.hutchinson(trace_samples, seed) if trace_samples else []
        finally:
            op.release()
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
