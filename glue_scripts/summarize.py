#!/usr/bin/env python
"""Turn a grid's runs into the papers' table: methods x tasks, mean ± std over seeds.

Reads RESULTS_DIR/<task>/<method>/seed<k>/eval_results.json (what the grids
write), prints a markdown table (scores x 100, as the papers print them, with
an average column), and writes PREFIX.md, PREFIX.csv and PREFIX.png (bars with
one standard deviation as error bars).

Where the runs measured sharpness (run_glue.py --sharpness_samples, the
accuracy study's default), each run's sharpness_results.json holds lambda_max
of the final model's training-loss Hessian on a fixed training sample: it is
reported beside the scores, as a second table (mean ± std over seeds), a
per-seed table of score and lambda_max, `lambda_max` rows in PREFIX.csv
(unscaled), PREFIX_seeds.csv (one row per run) and a second panel in the plot.

    python glue_scripts/summarize.py out/sampa_table6 [--metrics mrpc=f1,stsb=spearmanr]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

# One number per task, as a paper's table cell; --metrics overrides (e.g. mrpc=f1).
DEFAULT_METRIC = {"cola": "matthews_correlation", "stsb": "pearson"}  # every other task: accuracy
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
TASK_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
              "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
METHOD_ORDER = ("adamw", "sam", "msam", "sampa-0", "sampa-0.1", "sampa-0.2", "asyncsam")
METHOD_NAMES = {"adamw": "AdamW", "sam": "SAM", "msam": "mSAM", "sampa-0": "SAMPa-0", "sampa-0.1": "SAMPa-0.1",
                "sampa-0.2": "SAMPa-0.2", "asyncsam": "AsyncSAM"}


def _order(names, preferred):
    return sorted(names, key=lambda n: (preferred.index(n) if n in preferred else len(preferred), n))


def collect(results_dir, metrics: dict[str, str] | None = None) -> dict[str, dict[str, list[float]]]:
    """{method: {task: [score per seed, seed order]}} from the eval_results.json files."""
    metrics = {**DEFAULT_METRIC, **(metrics or {})}
    scores: dict[str, dict[str, list[float]]] = {}
    files = sorted(Path(results_dir).glob("*/*/seed*/eval_results.json"),
                   key=lambda p: (p.parts[-4], p.parts[-3], int(p.parts[-2][4:]) if p.parts[-2][4:].isdigit() else 0))
    for path in files:
        task, method = path.parts[-4], path.parts[-3]
        key = "eval_" + metrics.get(task, "accuracy")
        results = json.loads(path.read_text())
        if key not in results:
            print(f"warning: {path} has no {key}; skipped", file=sys.stderr)
            continue
        scores.setdefault(method, {}).setdefault(task, []).append(float(results[key]))
    return scores


def _run_key(path: Path):
    seed = path.parts[-2][4:]
    return path.parts[-4], path.parts[-3], int(seed) if seed.isdigit() else 0


def collect_runs(results_dir, metrics: dict[str, str] | None = None) -> list[dict]:
    """One record per finished run: task, method, seed, score (unscaled, None if the metric is missing),
    lambda_max and sharpness_samples (None where the run measured no sharpness)."""
    metrics = {**DEFAULT_METRIC, **(metrics or {})}
    runs = []
    for path in sorted(Path(results_dir).glob("*/*/seed*/eval_results.json"), key=_run_key):
        task, method, seed = _run_key(path)
        score = json.loads(path.read_text()).get("eval_" + metrics.get(task, "accuracy"))
        sharp_file = path.parent / "sharpness_results.json"
        sharp = json.loads(sharp_file.read_text()) if sharp_file.exists() else {}
        runs.append({"task": task, "method": method, "seed": seed,
                     "score": None if score is None else float(score),
                     "lambda_max": sharp.get("lambda_max"), "sharpness_samples": sharp.get("samples")})
    return runs


def collect_sharpness(results_dir) -> dict[str, dict[str, list[float]]]:
    """{method: {task: [lambda_max per seed, seed order]}} from the runs' sharpness_results.json."""
    out: dict[str, dict[str, list[float]]] = {}
    for run in collect_runs(results_dir):
        if run["lambda_max"] is not None:
            out.setdefault(run["method"], {}).setdefault(run["task"], []).append(float(run["lambda_max"]))
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is nan for a single seed."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summary_rows(scores, scale: float = 100.0):
    """(methods, tasks, cells, averages): cells[method][task] = (mean, std, n), scaled."""
    methods = _order(scores, METHOD_ORDER)
    tasks = _order({t for per_task in scores.values() for t in per_task}, TASK_ORDER)
    cells, averages = {}, {}
    for method in methods:
        cells[method] = {}
        for task, values in scores[method].items():
            mean, std = mean_std([v * scale for v in values])
            cells[method][task] = (mean, std, len(values))
        # The average is over tasks, of each task's mean; only where a method has every task.
        have_all = all(t in cells[method] for t in tasks)
        averages[method] = statistics.fmean(cells[method][t][0] for t in tasks) if have_all else math.nan
    return methods, tasks, cells, averages


def _cell(entry, most_seeds):
    if entry is None:
        return "–"
    mean, std, n = entry
    text = f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"
    return text + (f" (n={n})" if n != most_seeds else "")


def to_markdown(methods, tasks, cells, averages, metrics=None) -> str:
    metrics = {**DEFAULT_METRIC, **(metrics or {})}
    most_seeds = max((n for row in cells.values() for _, _, n in row.values()), default=0)
    header = ["Method"] + [TASK_NAMES.get(t, t) for t in tasks] + ["Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        row = [METHOD_NAMES.get(m, m)] + [_cell(cells[m].get(t), most_seeds) for t in tasks]
        row.append("–" if math.isnan(averages[m]) else f"{averages[m]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    used = ", ".join(f"{TASK_NAMES.get(t, t)} {metrics.get(t, 'accuracy')}" for t in tasks)
    lines.append("")
    lines.append(f"Scores x 100, mean ± sample std over {most_seeds} seeds (n= where fewer). Metrics: {used}.")
    return "\n".join(lines)


def _g(value: float) -> str:
    return f"{value:.4g}"


def sharpness_markdown(sharp_cells, runs, metrics=None) -> str:
    """lambda_max mean ± std per method and task, then score and lambda_max per seed."""
    metrics = {**DEFAULT_METRIC, **(metrics or {})}
    methods = _order(sharp_cells, METHOD_ORDER)
    tasks = _order({t for per_task in sharp_cells.values() for t in per_task}, TASK_ORDER)
    samples = sorted({r["sharpness_samples"] for r in runs if r["lambda_max"] is not None} - {None})
    most = max((n for row in sharp_cells.values() for _, _, n in row.values()), default=0)
    lines = ["| Method | " + " | ".join(f"{TASK_NAMES.get(t, t)} λ_max" for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        cells = []
        for t in tasks:
            if t not in sharp_cells[m]:
                cells.append("–")
                continue
            mean, std, n = sharp_cells[m][t]
            cells.append(_g(mean) + ("" if math.isnan(std) else f" ± {std:.2g}") + (f" (n={n})" if n != most else ""))
        lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    sample = " or ".join(map(str, samples)) if samples else "?"
    lines += ["", f"λ_max: the largest eigenvalue of the Hessian of the training loss of the final model, on a "
                  f"fixed sample of {sample} training examples (the same for every method and seed), mean ± "
                  f"sample std over seeds.", ""]
    seeds = sorted({r["seed"] for r in runs if r["lambda_max"] is not None})
    lines += ["| Method | Task | " + " | ".join(f"seed {k}" for k in seeds) + " |",
              "|" + "---|" * (len(seeds) + 2)]
    by_run = {(r["method"], r["task"], r["seed"]): r for r in runs}
    for m in methods:
        for t in tasks:
            cells = []
            for k in seeds:
                r = by_run.get((m, t, k))
                if r is None or r["lambda_max"] is None:
                    cells.append("–")
                else:
                    score = "–" if r["score"] is None else f"{100 * r['score']:.2f}"
                    cells.append(f"{score} / {_g(r['lambda_max'])}")
            lines.append(f"| {METHOD_NAMES.get(m, m)} | {TASK_NAMES.get(t, t)} | " + " | ".join(cells) + " |")
    used = ", ".join(f"{TASK_NAMES.get(t, t)} {metrics.get(t, 'accuracy')}" for t in tasks)
    lines += ["", f"Per seed: score x 100 / λ_max ({used})."]
    return "\n".join(lines)


def write_seeds_csv(path, runs, metrics=None):
    metrics = {**DEFAULT_METRIC, **(metrics or {})}
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["method", "task", "seed", "metric", "score", "lambda_max", "sharpness_samples"])
        methods = _order({r["method"] for r in runs}, METHOD_ORDER)
        tasks = _order({r["task"] for r in runs}, TASK_ORDER)
        for r in sorted(runs, key=lambda r: (methods.index(r["method"]), tasks.index(r["task"]), r["seed"])):
            out.writerow([r["method"], r["task"], r["seed"], metrics.get(r["task"], "accuracy"),
                          "" if r["score"] is None else f"{100 * r['score']:.4f}",
                          "" if r["lambda_max"] is None else repr(float(r["lambda_max"])),
                          "" if r["sharpness_samples"] is None else r["sharpness_samples"]])


def write_csv(path, methods, tasks, cells, metrics=None, sharp_cells=None):
    metrics = {**DEFAULT_METRIC, **(metrics or {})}
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["method", "task", "metric", "n_seeds", "mean", "std"])
        for m in methods:
            for t in tasks:
                if t in cells[m]:
                    mean, std, n = cells[m][t]
                    std_text = "" if math.isnan(std) else f"{std:.4f}"
                    out.writerow([m, t, metrics.get(t, "accuracy"), n, f"{mean:.4f}", std_text])
        for m in _order(sharp_cells or {}, METHOD_ORDER):  # lambda_max, unscaled
            for t in tasks:
                if t in sharp_cells[m]:
                    mean, std, n = sharp_cells[m][t]
                    out.writerow([m, t, "lambda_max", n, f"{mean:.6g}", "" if math.isnan(std) else f"{std:.4g}"])


def plot(path, methods, tasks, cells, sharp_cells=None, sharpness=None):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(methods), 1)
    panel = max(6, 1.4 * len(tasks) * max(1, len(methods) / 3))
    if sharp_cells:
        fig, (ax, sharp_ax) = plt.subplots(1, 2, figsize=(2 * panel, 4))
    else:
        fig, ax = plt.subplots(figsize=(panel, 4))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, t in enumerate(tasks) if t in cells[m]]
        means = [cells[m][t][0] for t in tasks if t in cells[m]]
        errs = [0 if math.isnan(cells[m][t][1]) else cells[m][t][1] for t in tasks if t in cells[m]]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=METHOD_NAMES.get(m, m))
    ax.set_xticks(range(len(tasks)), [TASK_NAMES.get(t, t) for t in tasks])
    lows = [cells[m][t][0] - (0 if math.isnan(cells[m][t][1]) else cells[m][t][1]) for m in methods for t in cells[m]]
    ax.set_ylim(max(0, min(lows, default=0) - 5), None)  # zoom in: the differences are a few points
    ax.set_ylabel("score x 100 (mean ± std over seeds)")
    ax.legend(fontsize="small")
    if sharp_cells:
        sharp_methods = [m for m in methods if m in sharp_cells] + [m for m in sharp_cells if m not in methods]
        colors = {m: f"C{i}" for i, m in enumerate(methods)}
        for i, m in enumerate(sharp_methods):
            offset = (i - (len(sharp_methods) - 1) / 2) * width
            here = [(j, t) for j, t in enumerate(tasks) if t in sharp_cells[m]]
            means = [sharp_cells[m][t][0] for _, t in here]
            errs = [0 if math.isnan(sharp_cells[m][t][1]) else sharp_cells[m][t][1] for _, t in here]
            sharp_ax.bar([j + offset for j, _ in here], means, width, yerr=errs, capsize=3,
                         color=colors.get(m), alpha=0.8, label=METHOD_NAMES.get(m, m))
            for j, t in here:  # every seed as a dot
                values = (sharpness or {}).get(m, {}).get(t, [])
                sharp_ax.plot([j + offset] * len(values), values, "k.", markersize=4)
        sharp_ax.set_xticks(range(len(tasks)), [TASK_NAMES.get(t, t) for t in tasks])
        sharp_ax.set_ylabel("λ_max of the training loss, final model")
        sharp_ax.set_title("sharpness (mean ± std, dots: seeds)", fontsize="medium")
        sharp_ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _metric_overrides(text):
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError("expected task=metric[,task=metric...], e.g. mrpc=f1")
    return {task.strip(): metric.strip() for task, metric in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", help="a grid's output_dir: <task>/<method>/seed<k>/eval_results.json")
    parser.add_argument("--metrics", type=_metric_overrides, default={},
                        help="per-task metric, e.g. mrpc=f1,stsb=spearmanr,mnli=accuracy_mm")
    parser.add_argument("--out", default=None, help="prefix of the .md/.csv/.png files (default RESULTS_DIR/summary)")
    parser.add_argument("--no_plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)

    scores = collect(args.results_dir, args.metrics)
    if not scores:
        print(f"no eval_results.json under {args.results_dir}/<task>/<method>/seed<k>/", file=sys.stderr)
        return 1
    methods, tasks, cells, averages = summary_rows(scores)
    table = to_markdown(methods, tasks, cells, averages, args.metrics)
    runs = collect_runs(args.results_dir, args.metrics)
    sharpness = collect_sharpness(args.results_dir)
    sharp_cells = summary_rows(sharpness, scale=1.0)[2] if sharpness else {}
    if sharp_cells:
        table += "\n\n" + sharpness_markdown(sharp_cells, runs, args.metrics)
    print(table)
    prefix = str(args.out or Path(args.results_dir) / "summary")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(prefix + ".md").write_text(table + "\n")
    write_csv(prefix + ".csv", methods, tasks, cells, args.metrics, sharp_cells)
    written = [prefix + ".md", prefix + ".csv"]
    if sharp_cells:
        write_seeds_csv(prefix + "_seeds.csv", runs, args.metrics)
        written.append(prefix + "_seeds.csv")
    if not args.no_plot:
        plot(prefix + ".png", methods, tasks, cells, sharp_cells, sharpness)
        written.append(prefix + ".png")
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
