#!/usr/bin/env python
"""Turn a grid's runs into the papers' table: methods x tasks, mean ± std over seeds.

Reads RESULTS_DIR/<task>/<method>/seed<k>/eval_results.json (what the grids
write), prints a markdown table (scores x 100, as the papers print them, with
an average column), and writes PREFIX.md, PREFIX.csv and PREFIX.png (bars with
one standard deviation as error bars).

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


def write_csv(path, methods, tasks, cells, metrics=None):
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


def plot(path, methods, tasks, cells):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks) * max(1, len(methods) / 3)), 4))
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
    print(table)
    prefix = str(args.out or Path(args.results_dir) / "summary")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(prefix + ".md").write_text(table + "\n")
    write_csv(prefix + ".csv", methods, tasks, cells, args.metrics)
    written = [prefix + ".md", prefix + ".csv"]
    if not args.no_plot:
        plot(prefix + ".png", methods, tasks, cells)
        written.append(prefix + ".png")
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
