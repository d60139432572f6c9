"""`sam-hf demo`: label noise on scikit-learn's digits, where sharpness-aware training visibly helps; offline.

40% of the training labels are replaced by a wrong class (the SAMPa paper's
§5.4 protocol), the test labels stay clean, and a small CNN with BatchNorm is
trained from scratch with SGD (momentum 0.9, the paper's base optimizer) and
with SAM, SAMPa-0.2, mSAM and Asynchronous SAM around it: the same initial
weights, batches and corrupted labels for every method (`sam_hf.label_noise`
holds the task, its settings and where they come from). Plain SGD fits the
wrong labels and loses test accuracy; the sharpness-aware methods fit fewer
of them and end in flatter minima.

The demo prints a table (test accuracy, share of the corrupted labels the
model memorized, lambda_max of the final model, time per step, speed-up over
SAM) and writes a PNG of test accuracy and memorization per epoch and the
final lambda_max, a markdown report and the raw numbers (results.json) into
--output_dir. lambda_max is the largest eigenvalue of the Hessian of the
training loss of the final model on a fixed sample of 256 (noisy) training
examples, the same for every method (`sam_hf.sharpness.measure_sharpness`);
it is measured after training and left out of the time per step.

Everything runs on the CPU, one thread per process, so a process stands for
one device. SAMPa's point is that its two gradient passes are independent,
so the `sampa-2proc` row runs them on two processes at once (torchrun); it
is skipped, with the reason printed, when fewer than 2 CPU cores are
available or the launch fails. The same task over 5 noise rates, 5 seeds and
every method is the repository's `python -m studies.vision_noise`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

from .distributed.placement import cpu_cores
from .label_noise import METHODS as TASK_METHODS
from .label_noise import DigitsRun, method_optim, train_digits, train_digits_torchrun

# name -> (task method, extra optim_args, processes)
METHODS = {name: (name, "", 1) for name in TASK_METHODS}
METHODS["sampa-2proc"] = ("sampa", "parallel=on", 2)
DEFAULT_METHODS = ("sgd", "sam", "sampa", "msam", "asyncsam", "sampa-2proc")

FULL = DigitsRun(noise=0.4, seed=1, epochs=20)  # 240 steps of batch 128; one cell of studies/vision_noise.py
TINY = DigitsRun(noise=0.4, seed=1, epochs=2, batch=32, width=4, sharpness_samples=16, tiny=True)


def label_of(method: str) -> str:
    task, _, procs = METHODS[method]
    label = TASK_METHODS[task][0]
    return f"{label}, 2 processes" if procs == 2 else label


def parse_args(argv):
    p = argparse.ArgumentParser(prog="sam-hf demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="demo_out")
    p.add_argument("--noise", type=float, default=None, help="label noise in percent (default 40)")
    p.add_argument("--epochs", type=float, default=None, help="epochs per method (default 20, tiny 2)")
    p.add_argument("--tiny", action="store_true", help="a very small model and few steps (for tests)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=None, help="corrupted labels, initial weights, batches (default 1)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.noise is not None and not 0 <= args.noise <= 100:
        p.error(f"--noise {args.noise}: a percentage from 0 to 100")
    run = TINY if args.tiny else FULL
    changes = {"noise": None if args.noise is None else args.noise / 100, "epochs": args.epochs, "seed": args.seed}
    args.run = replace(run, **{k: v for k, v in changes.items() if v is not None})
    return args


# ---------------------------------------------------------------- one method


def train_one(method: str, args, output_dir: Path) -> dict:
    """Train one method in this process."""
    task, extra, _ = METHODS[method]
    result = train_digits(replace(args.run, method=task, extra_optim_args=extra), output_dir / "runs" / method)
    result.update(method=method, label=label_of(method))
    return result


def run_two_processes(method: str, args, output_dir: Path) -> tuple[dict | None, str]:
    """Run one method under torchrun with 2 processes; (result, why-skipped)."""
    if cpu_cores() < 2:
        return None, f"needs 2 CPU cores, this machine has {cpu_cores()}"
    task, extra, procs = METHODS[method]
    try:
        result = train_digits_torchrun(replace(args.run, method=task, extra_optim_args=extra),
                                       output_dir / "runs" / method, processes=procs)
    except RuntimeError as err:
        return None, str(err)
    result.update(method=method, label=label_of(method))
    return result, ""


# ---------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    sam = next((r for r in results if r["method"] == "sam"), None)
    rows = ["| method | processes | test accuracy | memorized | final λ_max | time per step (ms) | speed-up vs SAM |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        speedup = f"{sam['sec_per_step'] / r['sec_per_step']:.2f}x" if sam else "n/a"
        rows.append(f"| {r['label']} | {r['processes']} | {r['test_accuracy']:.3f} | {r['memorized']:.3f} | "
                    f"{r['lambda_max']:.1f} | {1000 * r['sec_per_step']:.1f} | {speedup} |")
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
    """The same training losses and per-epoch figures (test accuracy, memorized) within `rtol`, at the same
    steps and epochs."""
    def close(x, y):
        return len(x) == len(y) and all(
            len(p) == len(q) and p[0] == q[0]
            and all(abs(u - v) <= rtol * max(abs(u), abs(v)) for u, v in zip(p[1:], q[1:]))
            for p, q in zip(x, y))

    return bool(a.get("loss_curve")) and close(a["loss_curve"], b.get("loss_curve", [])) and close(
        a.get("curve", []), b.get("curve", []))


def plot(results: list[dict], path: Path, run: DigitsRun) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (acc, mem, sharp) = plt.subplots(1, 3, figsize=(15.0, 4.2))
    for r, style in zip(results, curve_styles(results)):
        epochs = [c[0] for c in r["curve"]]
        line, = acc.plot(epochs, [100 * c[1] for c in r["curve"]], **style)
        mem.plot(epochs, [100 * c[2] for c in r["curve"]], color=line.get_color(), **style)
        many = r.get("processes", 1) > 1
        sharp.bar(r["label"], r["lambda_max"], color="none" if many else line.get_color(),
                  edgecolor=line.get_color(), hatch="//" if many else None)
    acc.set_xlabel("epoch")
    acc.set_ylabel("test accuracy (%), clean labels")
    acc.set_title(f"small CNN on digits, {run.noise:.0%} of training labels wrong", fontsize="medium")
    acc.legend(fontsize="small")
    mem.set_xlabel("epoch")
    mem.set_ylabel("wrong training labels fitted (%)")
    mem.set_title("memorized noise", fontsize="medium")
    sharp.set_ylabel("λ_max of the final model")
    sharp.set_title(f"sharpness on {run.sharpness_samples} training examples", fontsize="medium")
    sharp.tick_params(axis="x", labelrotation=30, labelsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], skipped: dict[str, str], args, seconds: float) -> str:
    import torch
    import transformers

    r = args.run
    rhos = sorted({res["rho"] for res in results if res["rho"]})
    lines = [
        "# sam_hf demo: label noise on scikit-learn's digits", "",
        "Command: `" + " ".join(["sam-hf demo", *args.argv]) + "`", "",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {cpu_cores()} CPU "
        f"cores; torch {torch.__version__}, transformers {transformers.__version__}. Total time {seconds:.0f} s; "
        f"load average {args.load_before:.1f} before the runs, {_load():.1f} after (timings mean most on an "
        "otherwise idle machine).", "",
        f"Task: scikit-learn's `load_digits` (real 8x8 handwritten digits), a fixed 80/20 split; "
        f"{r.noise:.0%} of the {results[0]['train_examples'] if results else ''} training labels "
        f"({results[0]['corrupted'] if results else ''}) replaced by a uniformly drawn wrong class with seed "
        f"{r.seed} (SAMPa §5.4), test labels clean. Model: a CNN with BatchNorm (width {r.width}), from "
        f"scratch. Every method: {r.epochs:g} epochs, batch {r.batch}, SGD momentum 0.9 as the base optimizer, lr "
        f"{r.learning_rate} cosine, weight decay {r.weight_decay}, label smoothing {r.label_smoothing}, "
        f"ρ = {', '.join(f'{x:g}' for x in rhos)} for every sharpness-aware method (SAMPa §5.4), the same "
        "initial weights, batches and labels. Settings and their sources: `sam_hf/label_noise.py`.", "",
        table(results), "",
        "Test accuracy is the final model's on the clean test labels. Memorized is the share of the corrupted "
        "training examples the final model predicts as their wrong label. Final λ_max is the largest eigenvalue "
        "of the Hessian of the training loss (on the noisy labels) of the final model, on a fixed sample of "
        f"{r.sharpness_samples} training examples, the same for every method (eval mode, "
        "`sam_hf.sharpness.measure_sharpness`, measured after training: "
        + ", ".join(f"{res['sharpness_seconds']:.1f} s ({res['label']})" for res in results) + ").", "",
        "Time per step is the median wall time of an optimizer step after 3 warm-up steps. Every process runs "
        "one thread, so it stands for one device: the 1-process rows use one core, the 2-process row two, as "
        "the papers compare one GPU with two. At this size fixed per-step costs weigh far more than for a real "
        "model, so the speed-ups say little about large-model training; see the benchmarks for that. "
        "Asynchronous SAM's speed-up also needs a second device; its accuracy does not.", "",
        "![test accuracy, memorization and λ_max](curves.png)", "",
        "One seed, one noise rate. `python -m studies.vision_noise` in the repository runs this task at 0-80% "
        "noise over 5 seeds for every method (studies/results/vision).", "",
    ]
    if skipped:
        lines += ["Skipped:", ""] + [f"- {label_of(m)}: {why.splitlines()[0]}" for m, why in skipped.items()] + [""]
    return "\n".join(lines)


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
    start, args.load_before = time.perf_counter(), _load()
    results, skipped = [], {}
    for method in args.methods:
        label = label_of(method)
        _, optim, optim_args = method_optim(METHODS[method][0], args.run.noise, METHODS[method][1])
        print(f"[demo] {label}: {args.run.epochs:g} epochs, --optim {optim} --optim_args \"{optim_args}\" ...",
              flush=True)
        if METHODS[method][2] == 1:
            result = train_one(method, args, output_dir)
        else:
            result, why = run_two_processes(method, args, output_dir)
            if result is None:
                skipped[method] = why
                print(f"[demo] {label}: skipped, {why}", flush=True)
                continue
        results.append(result)
        print(f"[demo] {label}: test accuracy {result['test_accuracy']:.3f}, memorized {result['memorized']:.3f}, "
              f"final lambda_max {result['lambda_max']:.1f}, {1000 * result['sec_per_step']:.1f} ms/step", flush=True)

    seconds = time.perf_counter() - start
    print("\n" + table(results) + "\n")
    plot(results, output_dir / "curves.png", args.run)
    (output_dir / "report.md").write_text(report(results, skipped, args, seconds))
    (output_dir / "results.json").write_text(json.dumps({"results": results, "skipped": skipped,
                                                         "seconds": seconds}, indent=1))
    print(f"[demo] wrote {output_dir / 'report.md'}, {output_dir / 'curves.png'} and results.json "
          f"({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
