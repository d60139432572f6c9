"""`sam-hf demo`: a small ViT on scikit-learn's digits with AdamW, SAM and SAMPa, offline.

Every method trains the same model from the same initialisation on the same
batches for the same number of steps. The demo prints a table (accuracy,
time per step, speed-up over SAM, sharpness of the final model) and writes a
PNG of the loss and sharpness curves, a markdown report and the raw numbers
(results.json) into --output_dir.

Sharpness is the largest eigenvalue lambda_max of the Hessian of the training
loss, measured by `sam_hf.SharpnessCallback` on a fixed sample of training
examples (the same examples for every method, drawn with seed 0) every
`sharpness_every` steps and at the end. The measurement changes nothing in
training (same weights, bitwise) and is left out of the time per step.

Everything runs on the CPU, one thread per process, so a process stands for
one device. SAMPa's point is that its two gradient passes are independent,
so the `sampa-2proc` row runs them on two processes at once (torchrun); it
is skipped, with the reason printed, when fewer than 2 CPU cores are
available or the launch fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .distributed.placement import cpu_cores

# name -> (label, optim, optim_args, processes). SAMPa-0.2 uses twice SAM's rho, as in the paper.
METHODS = {
    "adamw": ("AdamW", "adamw_torch", None, 1),
    "sam": ("SAM", "sam", "rho=0.05", 1),
    "sampa": ("SAMPa-0.2", "sampa", "rho=0.1,lam=0.2,parallel=off", 1),
    "sampa-2proc": ("SAMPa-0.2, 2 processes", "sampa", "rho=0.1,lam=0.2,parallel=on", 2),
    # not run by default (--methods ...,msam): mSAM, 4 micro-batches of 24, SAM's rho
    "msam": ("mSAM (m=4)", "msam", "rho=0.05,micro_batches=4", 1),
}
DEFAULT_METHODS = ("adamw", "sam", "sampa", "sampa-2proc")


@dataclass
class Size:
    # Big enough that a gradient pass outweighs the fixed per-step costs on a CPU
    # core, small enough for all four runs to finish in a few minutes on 2 cores.
    patch: int = 2  # 8x8 digits in 2x2 patches: 16 tokens
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    batch: int = 96
    max_steps: int = 300
    logging_steps: int = 10
    learning_rate: float = 3e-3
    # lambda_max on a fixed sample of this many training examples, every this many steps and at the end.
    # One measurement is about 21 Hessian-vector products over the sample (Lanczos), about 3 s here on a
    # CPU core, most of it fixed per-product cost (32 examples take not much less): 3 points per method
    # add under a third to the demo's time (4 points, every 75 steps, added 39%).
    sharpness_samples: int = 64
    sharpness_every: int = 100  # 0: no measurement


TINY = Size(patch=4, hidden=16, layers=1, heads=2, batch=32, max_steps=6, logging_steps=1,
            sharpness_samples=16, sharpness_every=3)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="sam-hf demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="demo_out")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps per method (default 300, tiny 6)")
    p.add_argument("--tiny", action="store_true", help="a very small model and few steps (for tests)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one method inside torchrun
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.size = TINY if args.tiny else Size()
    if args.max_steps is not None:
        args.size = replace(args.size, max_steps=args.max_steps)
    return args


# ---------------------------------------------------------------- data and model


def digits(seed: int, tiny: bool):
    """scikit-learn's 8x8 digits scaled to [-1, 1]; 80% train, 20% held out (fixed split)."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # pixels are 0..16
    y = torch.tensor(data.target)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    if tiny:
        train, test = train[:256], test[:64]
    return _Digits(x[train], y[train]), _Digits(x[test], y[test])


class _Digits:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def vit(size: Size):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=8, patch_size=size.patch, num_channels=1, hidden_size=size.hidden,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       intermediate_size=2 * size.hidden, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=10)
    return ViTForImageClassification(config)


def accuracy(eval_pred):
    from sam_hf.recipes.metrics import accuracy as accuracy_of

    logits, labels = eval_pred
    return {"accuracy": accuracy_of(logits.argmax(-1), labels)}


# ---------------------------------------------------------------- one method


def train_one(method: str, args, output_dir: Path) -> dict | None:
    """Train one method in this process; returns its results (None on non-zero ranks)."""
    import torch
    from transformers import PrinterCallback, TrainingArguments, set_seed

    import sam_hf
    from sam_hf.bench import step_timer

    # One thread per process, so a process stands for one device: SAM and AdamW get
    # one core, the 2-process SAMPa two (as in the paper: one GPU vs two). It also
    # keeps timings stable on a busy machine, where extra threads oversubscribe.
    torch.set_num_threads(1)
    label, optim, optim_args, _ = METHODS[method]
    size = args.size
    timer = step_timer()
    callbacks = [timer]  # first: its step ends before a measurement starts, so the time per step leaves it out
    if size.sharpness_every:  # the same examples for every method (seed 0 picks them from the same training set)
        callbacks.append(sam_hf.SharpnessCallback(every=size.sharpness_every, samples=size.sharpness_samples, seed=0))
    set_seed(args.seed)
    train, test = digits(args.seed, args.tiny)
    model = vit(size)  # same seed, so every method starts from the same weights
    training_args = TrainingArguments(
        output_dir=str(output_dir / "runs" / method), max_steps=size.max_steps, seed=args.seed,
        per_device_train_batch_size=size.batch, per_device_eval_batch_size=256,
        learning_rate=size.learning_rate, warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0,
        optim=optim, optim_args=optim_args, logging_steps=size.logging_steps, eval_strategy="no",
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, use_cpu=True, ddp_backend="gloo" if args.worker else None,
    )
    trainer = sam_hf.SharpnessTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                                      compute_metrics=accuracy, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the demo prints its own summary
    trainer.train()
    metrics = trainer.evaluate()
    if not trainer.is_world_process_zero():
        return None
    steady = sorted(timer.times[min(3, len(timer.times) - 1):])  # skip warm-up steps
    measured = [e for e in trainer.state.log_history if "sharpness/lambda_max" in e]
    return {
        "method": method, "label": label, "optim": optim, "optim_args": optim_args,
        "processes": training_args.world_size,
        "steps": trainer.state.global_step, "eval_accuracy": metrics["eval_accuracy"],
        "sec_per_step": steady[len(steady) // 2],  # median: robust to the odd slow step
        "loss_curve": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
        # lambda_max of the final model (measured at the last step), and its curve over training
        "lambda_max": measured[-1]["sharpness/lambda_max"] if measured else float("nan"),
        "sharpness_curve": [(e["step"], e["sharpness/lambda_max"]) for e in measured],
        "sharpness_seconds": sum(e["sharpness/seconds"] for e in measured),
    }


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_two_processes(method: str, args, output_dir: Path) -> tuple[dict | None, str]:
    """Run one method under torchrun with 2 processes; (result, why-skipped)."""
    if cpu_cores() < 2:
        return None, f"needs 2 CPU cores, this machine has {cpu_cores()}"
    result_file, error_file = output_dir / f"{method}.json", output_dir / f"{method}.error"
    result_file.unlink(missing_ok=True)
    error_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sam_hf.demo", "--worker", method, "--output_dir", str(output_dir),
           "--seed", str(args.seed), "--max_steps", str(args.size.max_steps)] + (["--tiny"] if args.tiny else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, "torchrun did not finish within 300 s"
    if proc.returncode != 0 or not result_file.is_file():
        if error_file.is_file():
            return None, error_file.read_text()
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        return None, f"torchrun exited with code {proc.returncode}:\n{tail}"
    return json.loads(result_file.read_text()), ""


# ---------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    sam = next((r for r in results if r["method"] == "sam"), None)
    rows = ["| method | processes | eval accuracy | time per step (ms) | speed-up vs SAM | final λ_max |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        speedup = f"{sam['sec_per_step'] / r['sec_per_step']:.2f}x" if sam else "n/a"
        rows.append(f"| {r['label']} | {r['processes']} | {r['eval_accuracy']:.3f} | "
                    f"{1000 * r['sec_per_step']:.1f} | {speedup} | {r['lambda_max']:.1f} |")
    return "\n".join(rows)


def curve_styles(results: list[dict]) -> list[dict]:
    """matplotlib keywords per result, so that no curve hides another: multi-process runs are dashed with hollow
    markers, drawn over the 1-process ones, and a run whose curves equal an earlier run's says so in the legend
    (2-process SAMPa equals 1-process SAMPa up to round-off, by design)."""
    styles = []
    for i, r in enumerate(results):
        label = r["label"]
        same = [o["label"] for o in results[:i] if _same_curves(o, r)]
        if same:
            label += f" (same curves as {same[0]})"
        many = r.get("processes", 1) > 1
        styles.append({"label": label, "linestyle": "--" if many else "-", "marker": "o" if many else ".",
                       "markerfacecolor": "none" if many else None, "zorder": 3 if many else 2})
    return styles


def _same_curves(a: dict, b: dict, rtol: float = 1e-3) -> bool:
    def close(x, y):
        return len(x) == len(y) and all(s == t and abs(u - v) <= rtol * max(abs(u), abs(v)) for (s, u), (t, v)
                                        in zip(x, y))

    return bool(a["loss_curve"]) and close(a["loss_curve"], b["loss_curve"]) and close(
        a["sharpness_curve"], b["sharpness_curve"])


def plot(results: list[dict], path: Path, samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax, sharp) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    for r, style in zip(results, curve_styles(results)):
        steps, losses = zip(*r["loss_curve"]) if r["loss_curve"] else ((), ())
        dense = {"markevery": max(1, len(steps) // 12)} if len(steps) >= 20 else {}  # markers, not a thick band
        line, = ax.plot(steps, losses, **style, **dense)
        steps, values = zip(*r["sharpness_curve"]) if r["sharpness_curve"] else ((), ())
        sharp.plot(steps, values, **{**style, "marker": "o"}, color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("ViT on scikit-learn digits: training loss")
    ax.legend(fontsize="small")
    sharp.set_xlabel("optimizer step")
    sharp.set_ylabel("λ_max of the training-loss Hessian")
    sharp.set_yscale("log")
    sharp.set_title(f"sharpness on a fixed sample of {samples} training examples", fontsize="medium")
    sharp.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], skipped: dict[str, str], args, seconds: float) -> str:
    import torch
    import transformers

    size = args.size
    lines = [
        "# sam_hf demo: ViT on scikit-learn digits", "",
        "Command: `" + " ".join(["sam-hf demo", *args.argv]) + "`", "",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {cpu_cores()} CPU "
        "cores; "
        f"torch {torch.__version__}, transformers {transformers.__version__}. Total time {seconds:.0f} s; "
        f"load average {args.load_before:.1f} before the runs, {_load():.1f} after (timings mean most on an "
        "otherwise idle machine).", "",
        f"Model: ViT from config, 8x8 grey images in {size.patch}x{size.patch} patches, hidden {size.hidden}, "
        f"{size.layers} layers, {size.heads} heads, trained from scratch. Data: scikit-learn's `load_digits` "
        f"(real 8x8 handwritten digits), 80% train / 20% held out. Every method: {size.max_steps} steps, batch "
        f"{size.batch}, AdamW base with peak lr {size.learning_rate} (10% warm-up, linear decay), weight decay "
        f"0.01, clipping at 1, seed {args.seed}, same initial weights and batches.", "",
        table(results), "",
        "Time per step is the median wall time of an optimizer step after 3 warm-up steps (logging and "
        "evaluation excluded). Every process runs one thread, so it stands for one device: the 1-process "
        "rows use one core, the 2-process row two, as the papers compare one GPU with two. At this size "
        "fixed per-step costs (Python, data loading, inter-process exchange) weigh far more than for a "
        "real model, so the speed-ups say little about large-model training; see the benchmarks for that.", "",
        f"Final λ_max is the largest eigenvalue of the Hessian of the training loss of the final model, on a "
        f"fixed sample of {size.sharpness_samples} training examples (drawn with seed 0, the same for every "
        f"method), measured in eval mode by `sam_hf.SharpnessCallback(every={size.sharpness_every}, "
        f"samples={size.sharpness_samples})` (Lanczos on Hessian-vector products); the right-hand plot shows it "
        f"every {size.sharpness_every} steps. Measuring took "
        + ", ".join(f"{r['sharpness_seconds']:.1f} s ({r['label']})" for r in results)
        + " of the total time; it changes nothing in training and is not in the time per step.", "",
        "![training loss and sharpness](curves.png)", "",
    ]
    if skipped:
        lines += ["Skipped:", ""] + [f"- {METHODS[m][0]}: {why.splitlines()[0]}" for m, why in skipped.items()] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
    if args.worker:  # inside torchrun: rank 0 writes the result (or any rank the error) for the parent
        try:
            result = train_one(args.worker, args, output_dir)
        except Exception as err:
            (output_dir / f"{args.worker}.error").write_text(f"{type(err).__name__}: {err}")
            raise
        if result is not None:
            (output_dir / f"{args.worker}.json").write_text(json.dumps(result))
        return 0

    start, args.load_before = time.perf_counter(), _load()
    results, skipped = [], {}
    for method in args.methods:
        label = METHODS[method][0]
        print(f"[demo] {label}: training {args.size.max_steps} steps ...", flush=True)
        if METHODS[method][3] == 1:
            result = train_one(method, args, output_dir)
        else:
            result, why = run_two_processes(method, args, output_dir)
            if result is None:
                skipped[method] = why
                print(f"[demo] {label}: skipped, {why}", flush=True)
                continue
        results.append(result)
        print(f"[demo] {label}: accuracy {result['eval_accuracy']:.3f}, "
              f"{1000 * result['sec_per_step']:.1f} ms/step, final lambda_max {result['lambda_max']:.1f} "
              f"({result['sharpness_seconds']:.1f} s measuring)", flush=True)

    seconds = time.perf_counter() - start
    print("\n" + table(results) + "\n")
    plot(results, output_dir / "curves.png", args.size.sharpness_samples)
    (output_dir / "report.md").write_text(report(results, skipped, args, seconds))
    settings = {"sharpness_samples": args.size.sharpness_samples, "sharpness_every": args.size.sharpness_every,
                "sharpness_seed": 0, "seconds": seconds}
    (output_dir / "results.json").write_text(json.dumps({"results": results, "skipped": skipped, **settings},
                                                        indent=1))
    print(f"[demo] wrote {output_dir / 'report.md'}, {output_dir / 'curves.png'} and results.json "
          f"({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
