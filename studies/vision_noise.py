"""Label noise from scratch, the SAMPa paper's Table 7 on a CPU: a small CNN on scikit-learn's digits.

Every method of `sam_hf.label_noise.METHODS` (SGD, SAM, SAMPa-0, SAMPa-0.2, mSAM, Asynchronous SAM, and
SAMPa-0.2 with twice SAM's rho, §5.1's setting, as an ablation) at noise rates 0-80%, over seeds; the
task, settings and the noise protocol are in `sam_hf/label_noise.py` (SAMPa §5.4 and §5.1). A seed fixes
the corrupted labels, the initial weights and the batch order, the same for every method. Each run reports
the test accuracy of its final model, lambda_max of the final model on a fixed sample of 256 (noisy)
training examples, and how many corrupted labels it memorized.

    python -m studies.vision_noise                       # the whole grid, 2 runs at once, resumable
    python -m studies.vision_noise --jobs 1 --seeds 1 --noise 40 --methods sgd,sam   # one cell
    python -m studies.vision_noise --report_only         # tables and plot from the finished runs

Writes OUT/runs/<method>-noise<NN>-seed<k>.json per run, and OUT/vision_noise.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import report, runner
from .summary import cell, grid_table, group, markdown, paired_differences, summarize

HERE = Path(__file__).resolve().parent
METHOD_ORDER = ("sgd", "sam", "sampa0", "sampa", "msam", "asyncsam", "sampa2rho")
LABELS = {"sgd": "SGD", "sam": "SAM", "sampa0": "SAMPa-0", "sampa": "SAMPa-0.2", "msam": "mSAM (m=4)",
          "asyncsam": "Async SAM", "sampa2rho": "SAMPa-0.2, 2ρ"}

# SAMPa paper, Table 7: ResNet-32 on CIFAR-10 with label noise, test accuracy (%) mean and std.
TABLE7 = {
    0.0: {"sgd": (94.22, 0.14), "sam": (94.36, 0.07), "sampa0": (94.36, 0.12), "sampa": (94.41, 0.08)},
    0.2: {"sgd": (88.65, 0.75), "sam": (92.20, 0.06), "sampa0": (92.22, 0.10), "sampa": (92.39, 0.09)},
    0.4: {"sgd": (84.24, 0.25), "sam": (89.78, 0.12), "sampa0": (89.75, 0.15), "sampa": (90.01, 0.18)},
    0.6: {"sgd": (76.29, 0.25), "sam": (83.83, 0.51), "sampa0": (83.81, 0.37), "sampa": (84.38, 0.07)},
    0.8: {"sgd": (44.44, 1.20), "sam": (48.01, 1.63), "sampa0": (48.22, 1.71), "sampa": (49.92, 1.12)},
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m studies.vision_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "vision"), help="results folder (resumes from it)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one process (one thread) each")
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--noise", default="0,20,40,60,80", help="noise rates in percent")
    p.add_argument("--methods", default=",".join(METHOD_ORDER), help=f"a subset of {','.join(METHOD_ORDER)}")
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--sharpness_samples", type=int, default=256, help="0: no lambda_max")
    p.add_argument("--tiny", action="store_true", help="256 training examples, a 4-channel CNN (for tests)")
    p.add_argument("--curve_noise", type=float, default=40, help="noise rate (percent) of the curves' panel")
    p.add_argument("--report_only", action="store_true", help="write the tables and plot, run nothing")
    p.add_argument("--dry_run", action="store_true", help="list the runs still to do, run nothing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.noises = [float(n) / 100 for n in args.noise.split(",") if n.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHOD_ORDER]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHOD_ORDER)}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if any(not 0 <= n <= 1 for n in args.noises):
        p.error("--noise: rates in percent, 0 to 100")
    return args


def settings_of(args) -> dict:
    """What every run of one grid shares; a finished run made with other settings is not reused."""
    from sam_hf.label_noise import DigitsRun

    run = DigitsRun(epochs=args.epochs, sharpness_samples=args.sharpness_samples, tiny=args.tiny)
    if args.tiny:
        run.width, run.batch = 4, 32
    keep = ("epochs", "batch", "learning_rate", "weight_decay", "width", "label_smoothing", "sharpness_samples",
            "tiny")
    return {k: getattr(run, k) for k in keep}


def worker(args) -> int:
    """Run the runs named in --worker (a JSON list), one after the other, each written as it finishes."""
    from sam_hf.label_noise import DigitsRun, train_digits

    settings, out = settings_of(args), Path(args.out)
    for spec in json.loads(args.worker):
        run = runner.Run(spec["seed"], spec["noise"], spec["method"])
        result = train_digits(DigitsRun(method=run.method, noise=run.noise, seed=run.seed, **settings),
                              out / "runs" / "trainer" / run.name)
        runner.write_result(runner.result_path(out, run), {**result, "settings": settings})
    return 0


def command_for(args):
    def command(chunk: list[runner.Run]) -> list[str]:
        runs = [{"method": r.method, "noise": r.noise, "seed": r.seed} for r in chunk]
        cmd = runner.python_module("studies.vision_noise") + [
            "--worker", json.dumps(runs), "--out", args.out, "--epochs", str(args.epochs),
            "--sharpness_samples", str(args.sharpness_samples)]
        return cmd + (["--tiny"] if args.tiny else [])

    return command


# ---------------------------------------------------------------- report


def rows_of(results: list[dict]) -> list[dict]:
    keep = ("method", "label", "noise", "seed", "optim", "optim_args", "rho", "epochs", "steps", "test_accuracy",
            "train_fit", "memorized", "corrupted", "lambda_max", "hessian_vector_products", "sharpness_seconds",
            "sec_per_step", "train_seconds")
    return [{k: r.get(k) for k in keep} for r in results]


def tables(results: list[dict], methods: list[str]) -> str:
    def paper(m, noise):
        ref = TABLE7.get(round(noise, 2), {}).get(m)
        return f" [{ref[0]:.2f}]" if ref else ""

    def paper_gain(m, noise):
        ref = TABLE7.get(round(noise, 2), {})
        return f" [{ref[m][0] - ref['sgd'][0]:+.2f}]" if m in ref and m != "sgd" else ""

    noises = sorted({r["noise"] for r in results})
    gains = {m: paired_differences(results, "test_accuracy", m, "sgd") for m in methods if m != "sgd"}
    gain_rows = [[f"{noise:.0%}"] + [("" if m == "sgd" else cell(gains[m][noise], 100) + paper_gain(m, noise))
                                     for m in methods] for noise in noises]
    # each method against SAM, the method SAMPa and the others claim to improve on
    others = [m for m in methods if m not in ("sgd", "sam")]
    vs_sam = {m: paired_differences(results, "test_accuracy", m, "sam") for m in others}

    def paper_vs_sam(m, noise):
        ref = TABLE7.get(round(noise, 2), {})
        return f" [{ref[m][0] - ref['sam'][0]:+.2f}]" if m in ref and "sam" in ref else ""

    sam_rows = [[f"{noise:.0%}"] + [cell(vs_sam[m][noise], 100) + paper_vs_sam(m, noise) for m in others]
                for noise in noises]
    step = group(results, lambda r: (r["method"], r["noise"]), "sec_per_step")

    def vs_sgd(m, noise):
        base = step.get(("sgd", noise))
        return f" ({step[(m, noise)].mean / base.mean:.2f}x)" if base and (m, noise) in step else ""

    seeds = sorted({r["seed"] for r in results})
    return "\n\n".join([
        f"**Test accuracy (%)** of the final model, clean test labels, mean ± sample std over seeds "
        f"{', '.join(map(str, seeds))}; in brackets the SAMPa paper's Table 7 (ResNet-32 on CIFAR-10, 6 runs).",
        grid_table(results, methods, LABELS, "test_accuracy", 100, annotate=paper),
        "**Gain over SGD (points)**, paired by seed (same corrupted labels, initial weights and batches), "
        "mean ± std over seeds; in brackets the paper's gain (from Table 7's means).",
        markdown(["noise"] + [LABELS[m] for m in methods], gain_rows),
        "**Difference from SAM (points)**, paired by seed as above, mean ± std over seeds; in brackets the "
        "paper's (from Table 7's means).",
        markdown(["noise"] + [LABELS[m] for m in others], sam_rows),
        "**λ_max** of the final model: the largest Hessian eigenvalue of the training loss (label-smoothed "
        "cross-entropy on the noisy labels) on a fixed sample of 256 training examples, the same examples for "
        "every run (`sam_hf.sharpness.measure_sharpness`, eval mode).",
        grid_table(results, methods, LABELS, "lambda_max", 1, 1),
        "**Memorized (%)**: the share of the corrupted training examples that the final model predicts as "
        "their corrupted label (fitting the noise).",
        grid_table(results, methods, LABELS, "memorized", 100, 1, noises=[n for n in noises if n > 0]),
        "**Time per optimizer step** in ms (median of the run, one CPU thread per run, two runs at once on a "
        "shared machine; in brackets the ratio to SGD's mean at the same noise). Asynchronous SAM and SAMPa "
        "compute both gradients in one process here: their speed-up needs two devices, their accuracy does not.",
        grid_table(results, methods, LABELS, "sec_per_step", 1000, 1, annotate=vs_sgd),
    ])


def plot(results: list[dict], methods: list[str], path: Path, curve_noise: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    noises = sorted({r["noise"] for r in results})
    by = group(results, lambda r: (r["method"], r["noise"]), "test_accuracy")
    lmax = group(results, lambda r: (r["method"], r["noise"]), "lambda_max")
    fig, (acc_ax, lmax_ax, curve_ax) = plt.subplots(1, 3, figsize=(16, 4.6))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs = np.array([100 * n for n in noises]) + (i - (len(methods) - 1) / 2) * width * 4
        s = [by.get((m, n), summarize([])) for n in noises]
        line = acc_ax.errorbar(xs, [100 * v.mean for v in s], yerr=[100 * (v.std if v.n > 1 else 0) for v in s],
                               marker="o", capsize=3, label=LABELS[m])
        color = line[0].get_color()
        ref = [(100 * n, TABLE7[round(n, 2)][m][0]) for n in noises if m in TABLE7.get(round(n, 2), {})]
        if ref:
            acc_ax.plot(*zip(*ref), linestyle=":", marker="x", color=color, alpha=0.6)
        t = [lmax.get((m, n), summarize([])) for n in noises]
        lmax_ax.errorbar(xs, [v.mean for v in t], yerr=[v.std if v.n > 1 else 0 for v in t], marker="o",
                         capsize=3, color=color, label=LABELS[m])
        curves = [r["curve"] for r in results if r["method"] == m and math.isclose(r["noise"], curve_noise / 100)
                  and r.get("curve")]
        if curves:
            length = min(len(c) for c in curves)
            epochs = [c[0] for c in curves[0][:length]]
            mean = np.mean([[c[1] for c in cur[:length]] for cur in curves], axis=0)
            curve_ax.plot(epochs, 100 * mean, color=color, label=LABELS[m])
    acc_ax.set_xlabel("label noise (%)")
    acc_ax.set_ylabel("test accuracy (%), clean labels")
    acc_ax.set_title("CNN on digits (dotted ×: paper's Table 7, CIFAR-10)", fontsize="medium")
    acc_ax.legend(fontsize="small")
    lmax_ax.set_xlabel("label noise (%)")
    lmax_ax.set_ylabel("λ_max of the final model")
    lmax_ax.set_yscale("log")
    lmax_ax.set_title("sharpness on 256 training examples", fontsize="medium")
    curve_ax.set_xlabel("epoch")
    curve_ax.set_ylabel("test accuracy (%)")
    curve_ax.set_title(f"test accuracy during training, {curve_noise:.0f}% noise (mean over seeds)",
                       fontsize="medium")
    curve_ax.legend(fontsize="small")
    report.save(fig, path)


def write_report(args, results: list[dict], seconds: float | None) -> Path:
    out = Path(args.out)
    methods = [m for m in args.methods if any(r["method"] == m for r in results)]
    report.write_csv(out / "vision_noise.csv", rows_of(results))
    plot(results, methods, out / "vision_noise.png", args.curve_noise)
    s = settings_of(args)
    text = [
        *report.header("Label noise from scratch: a small CNN on scikit-learn's digits (SAMPa Table 7's protocol)",
                       "vision_noise", args, results, seconds),
        f"Settings: {s['epochs']:g} epochs of the 1,437 training images (batch {s['batch']}), SGD momentum 0.9, "
        f"lr {s['learning_rate']} cosine, weight decay {s['weight_decay']}, label smoothing "
        f"{s['label_smoothing']}, CNN width {s['width']}; ρ = 0.1 for every sharpness-aware method, 0.01 at 80% "
        "noise (SAMPa §5.4, SAMPa-0.2 included; the column SAMPa-0.2, 2ρ doubles it, as §5.1 does without "
        "noise); mSAM with 4 micro-batches of 32; Asynchronous SAM with r = 1, one process. See "
        "`sam_hf/label_noise.py` for the protocol and what differs from the paper.", "",
        tables(results, methods), "",
        "![accuracy, λ_max and test-accuracy curves](vision_noise.png)", "",
    ]
    (out / "vision_noise.md").write_text("\n".join(text))
    return out / "vision_noise.md"


def main(argv: list[str] | None = None) -> int:
    args = runner.study_args(argv, parse_args)
    if args.worker:
        return worker(args)
    return runner.run_study(args, settings_of(args), command_for(args), write_report,
                            chunk_key=runner.by_cell)


if __name__ == "__main__":
    sys.exit(main())
