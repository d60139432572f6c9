"""Shared machinery of the papers' GLUE grids: build, print and run the runs.

A grid is a settings table (see grid_sampa_table6.py, grid_msam_table3.py):
flags common to every run, flags per task, and flags per method, each value
citing the paper's table or section it comes from. Each run is
one `run_glue.py` process writing to OUTPUT_DIR/<task>/<method>/seed<k>, which
is what summarize.py reads. Runs that already have eval_results.json are
skipped, so an interrupted grid resumes where it stopped.

Flags after `--` (or in --extra "...") are appended to every run and, since
the last occurrence of a flag wins, override the table, e.g.
    python glue_scripts/grid_sampa_table6.py --tasks rte --dry_run -- --num_train_epochs 1
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN_GLUE = HERE / "run_glue.py"
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


@dataclass
class Grid:
    name: str  # also the default output folder: out/<name>
    title: str  # one line: which paper, which table
    model: str  # default --model_name_or_path
    common: dict  # run_glue flags for every run
    tasks: dict[str, dict]  # task -> run_glue flags, plus "rho", which only fills {rho} in method flags
    methods: dict[str, list[str]]  # method -> run_glue flags, e.g. ["--optim", "sam", "--optim_args", "rho={rho}"]
    notes: str = ""  # caveats, printed before every run or dry run
    seeds: tuple[int, ...] = (1, 2, 3)  # default --seeds: a paper grid sets its paper's number of runs
    data_dir: str | None = None  # default --data_dir (local GLUE json lines), None: the Hub

    def __post_init__(self):
        unknown = sorted(set(self.tasks) - set(GLUE_TASKS))
        if unknown:
            raise ValueError(f"grid {self.name!r}: unknown GLUE tasks {unknown}; known: {', '.join(GLUE_TASKS)}")


@dataclass
class Run:
    task: str
    method: str
    seed: int
    output_dir: Path
    argv: list[str] = field(default_factory=list)  # run_glue.py's arguments


def _flags(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in (f"--{key}", str(value))]


def local_files(data_dir: str | Path, task: str) -> list[str]:
    """run_glue flags for DATA_DIR/<task>/{train,dev}.jsonl (the layout of ../shared/data/glue)."""
    folder = Path(data_dir) / task
    files = ["--train_file", folder / "train.jsonl"]
    dev = next((folder / n for n in ("dev.jsonl", "validation.jsonl", "dev_matched.jsonl") if (folder / n).exists()),
               folder / "dev.jsonl")
    files += ["--validation_file", dev]
    if (folder / "dev_mismatched.jsonl").exists():  # MNLI
        files += ["--validation_mismatched_file", folder / "dev_mismatched.jsonl"]
    return [str(f) for f in files]


def build_runs(grid: Grid, tasks, methods, seeds, model, output_dir, data_dir=None, extra=()) -> list[Run]:
    runs = []
    for task in tasks:
        settings = dict(grid.tasks[task])
        rho = settings.pop("rho", None)
        for method in methods:
            for seed in seeds:
                out = Path(output_dir) / task / method / f"seed{seed}"
                argv = ["--model_name_or_path", model, "--task_name", task]
                argv += local_files(data_dir, task) if data_dir else []
                # Results only: no checkpoints or final weights (a BERT-base grid would write ~100 GB).
                argv += ["--do_train", "--do_eval", "--output_dir", str(out), "--seed", str(seed),
                         "--save_strategy", "no", "--save_model", "False", "--report_to", "none"]
                argv += _flags(grid.common) + _flags(settings)
                argv += [arg.format(rho=rho) for arg in grid.methods[method]]
                argv += list(extra)
                runs.append(Run(task, method, seed, out, argv))
    return runs


def _csv(kind, choices, cast=str):
    def parse(text):
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
        unknown = [v for v in values if choices is not None and v not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {kind} {unknown}; choose from {', '.join(map(str, choices))}")
        return values

    return parse


def build_parser(grid: Grid, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or grid.title,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", type=_csv("task", list(grid.tasks)), default=list(grid.tasks),
                        help="comma-separated GLUE tasks")
    parser.add_argument("--methods", type=_csv("method", list(grid.methods)), default=list(grid.methods),
                        help="comma-separated methods")
    parser.add_argument("--seeds", type=_csv("seed", None, int), default=list(grid.seeds), help="comma-separated seeds")
    parser.add_argument("--model", default=grid.model, help="model name or local folder")
    parser.add_argument("--output_dir", default=f"out/{grid.name}",
                        help="runs go to OUTPUT_DIR/<task>/<method>/seed<k>")
    parser.add_argument("--data_dir", default=grid.data_dir,
                        help="local GLUE data as DATA_DIR/<task>/{train,dev}.jsonl; default: the Hub")
    parser.add_argument("--launcher", default=None,
                        help='run each job under this launcher instead of python, e.g. "torchrun --nproc_per_node 2"')
    parser.add_argument("--extra", default="", help="flags appended to every run_glue.py command (also: after --)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--rerun", action="store_true", help="run again even where eval_results.json exists")
    parser.add_argument("--no_summary", action="store_true", help="do not print the results table at the end")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = shlex.split(args.extra) + passthrough
    return args


def command(run: Run, launcher: str | None = None) -> list[str]:
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    return prefix + [str(RUN_GLUE)] + run.argv


def run_grid(grid: Grid, args: argparse.Namespace) -> int:
    runs = build_runs(grid, args.tasks, args.methods, args.seeds, args.model, args.output_dir,
                      args.data_dir, args.extra)
    print(f"# {grid.title}")
    print(f"# {len(runs)} runs ({len(args.tasks)} tasks x {len(args.methods)} methods "
          f"x {len(args.seeds)} seeds) -> {args.output_dir}")
    for line in grid.notes.strip().splitlines():
        print(f"# {line}")
    missing = sorted({a for r in runs for a in r.argv if a.endswith(".jsonl") and not Path(a).exists()})
    if missing and not args.dry_run:
        print("missing data files: " + ", ".join(missing), file=sys.stderr)
        return 2
    failed = []
    for i, run in enumerate(runs, 1):
        cmd = command(run, args.launcher)
        label = f"[{i}/{len(runs)}] {run.task} / {run.method} / seed{run.seed}"
        if args.dry_run:
            print(f"# {label}\n{shlex.join(cmd)}")
            continue
        if (run.output_dir / "eval_results.json").exists() and not args.rerun:
            print(f"{label}: done already, skipped")
            continue
        run.output_dir.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(run.output_dir / "log.txt", "w") as log:  # one log per run keeps the console readable
            log.write(shlex.join(cmd) + "\n")
            log.flush()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        status = "ok" if code == 0 else f"FAILED (exit {code}), see {run.output_dir / 'log.txt'}"
        print(f"{label}: {status} in {time.time() - start:.0f}s", flush=True)
        if code != 0:
            failed.append(run)
    if not args.dry_run and not args.no_summary and Path(args.output_dir).exists():
        import summarize

        summarize.main([args.output_dir])
    if failed:
        print(f"{len(failed)} runs failed: " + ", ".join(f"{r.task}/{r.method}/seed{r.seed}" for r in failed))
    return 1 if failed else 0


def main(grid: Grid, argv: list[str] | None = None) -> int:
    return run_grid(grid, parse_args(build_parser(grid), argv))
