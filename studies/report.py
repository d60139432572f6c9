"""What every study's report shares: the CSV, the header lines (command, machine, run time) and saving a figure."""

from __future__ import annotations

import csv
import os
import platform
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def header(title: str, module: str, args, results: list[dict], seconds: float | None, extra: str = "") -> list[str]:
    """The report's first lines: its title, the command that made it, the machine and the run time in all."""
    import torch
    import transformers

    runs_seconds = sum(r.get("train_seconds", 0) + r.get("sharpness_seconds", 0) for r in results)
    at_once = "" if args.report_only or not hasattr(args, "jobs") else f", {args.jobs} runs at once"
    return [
        f"# {title}", "",
        f"Command: `{study_command(module, args.argv)}`"
        + (" (this report rewritten from its runs with `--report_only`)" if args.report_only else ""), "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores shared with other jobs, one thread per run"
        f"{at_once}; torch {torch.__version__}, transformers {transformers.__version__}."
        + (f" This invocation took {seconds / 60:.0f} min." if seconds else ""), "",
        f"{len(results)} runs; training and measuring took {runs_seconds / 60:.0f} min of run time in all.{extra}", "",
    ]


def study_command(module: str, argv: list[str]) -> str:
    """The command that runs the study (resuming it), whatever options this invocation added to only report."""
    return " ".join(["python -m studies." + module, *(a for a in argv if a != "--report_only")])


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
