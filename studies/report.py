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
        f"Command: `python -m studies.{module} " + " ".join(args.argv) + "`", "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores shared with other jobs, one thread per run"
        f"{at_once}; torch {torch.__version__}, transformers {transformers.__version__}."
        + (f" This invocation took {seconds / 60:.0f} min." if seconds else ""), "",
        f"{len(results)} runs; training and measuring took {runs_seconds / 60:.0f} min of run time in all.{extra}", "",
    ]


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
