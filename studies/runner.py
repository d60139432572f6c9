"""A study's grid of runs: one result file per (method, noise, seed), resumable, several runs at once.

Each run is a separate process (`command(run)`, e.g. `python -m studies.vision_noise --worker ...`) that
writes `OUT/runs/<name>.json` atomically (a temporary file, then `os.replace`) when, and only when, it has
finished. So a result file either holds a finished run or does not exist:

* a finished run (its file parses, says `"status": "done"`, names the same method, noise and seed, and was
  made with the same settings) is skipped;
* anything else (no file, a truncated or unreadable one, a leftover `.tmp`, a file of an unfinished run) is
  rerun from scratch, so an interrupted study resumes by running the same command again;
* a finished run made with other settings (say `--epochs 40` against 20) stops the study with an error
  naming the file: mixing budgets in one table would be silent nonsense.

Runs are ordered seed first, so an interrupted study holds whole seeds of the grid. `jobs` processes run at
once (each uses one thread: one per core); a process may run a chunk of runs one after the other
(the methods of one noise rate and seed: torch and transformers are imported once), each run still written
to its own file as it finishes. A process's output goes to `OUT/runs/<first run>[+N].log`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Run:
    seed: int
    noise: float  # a fraction: 0.4 for 40%
    method: str

    @property
    def name(self) -> str:
        return f"{self.method}-noise{round(self.noise * 100):02d}-seed{self.seed}"


class SettingsMismatch(RuntimeError):
    pass


def grid(methods, noises, seeds) -> list[Run]:
    """Every (method, noise, seed), seed first, then noise, then the methods in the order given."""
    order = {m: i for i, m in enumerate(methods)}
    runs = [Run(int(s), float(n), m) for m in methods for n in noises for s in seeds]
    return sorted(runs, key=lambda r: (r.seed, r.noise, order[r.method]))


def result_path(out: Path, run: Run) -> Path:
    return Path(out) / "runs" / f"{run.name}.json"


def write_result(path: Path, result: dict) -> None:
    """Write a finished run's result atomically: readers see the old state or the whole new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**result, "status": "done"}, indent=1))
    os.replace(tmp, path)


def load_result(out: Path, run: Run, settings: dict) -> dict | None:
    """The finished result of `run`, or None when it must (re)run; SettingsMismatch when it finished with
    other settings."""
    path = result_path(out, run)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("status") != "done":
        return None
    if data.get("method") != run.method or data.get("seed") != run.seed or \
            not math.isclose(float(data.get("noise", math.nan)), run.noise):
        return None
    theirs = data.get("settings", {})
    differ = {k: (theirs.get(k), v) for k, v in settings.items() if theirs.get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
        raise SettingsMismatch(f"{path} finished with other settings ({detail}); use another --out, or delete the "
                               "file to rerun it")
    return data


def pending(runs: list[Run], out: Path, settings: dict) -> list[Run]:
    return [r for r in runs if load_result(out, r, settings) is None]


def chunks(runs: list[Run], key: Callable[[Run], object]) -> list[list[Run]]:
    """Consecutive runs with the same key(run) in one chunk (one process: the imports are paid once)."""
    out: list[list[Run]] = []
    for run in runs:
        if out and key(out[-1][0]) == key(run):
            out[-1].append(run)
        else:
            out.append([run])
    return out


def run_pending(runs: list[Run], out: Path, settings: dict, command: Callable[[list[Run]], list[str]], jobs: int,
                chunk_key: Callable[[Run], object] = lambda run: run, env: dict | None = None,
                echo: Callable[[str], None] = print) -> dict[str, bool]:
    """Run every pending run, `jobs` processes at a time, each process `command(chunk)` running a chunk of
    runs that share `chunk_key` (default: one run per process). Returns {run name: finished} of the runs
    launched; a run counts as finished when its result file holds it, whatever its process's exit code."""
    todo = chunks(pending(runs, out, settings), chunk_key)
    count = sum(len(c) for c in todo)
    echo(f"[study] {len(runs) - count} of {len(runs)} runs already finished; {count} to run, in {len(todo)} "
         f"processes, {jobs} at once")
    logs = Path(out) / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    status: dict[str, bool] = {}
    stop_on_sigterm()
    active: list[tuple[list[Run], subprocess.Popen, float, object]] = []
    start = time.perf_counter()
    try:
        while todo or active:
            while todo and len(active) < jobs:
                chunk = todo.pop(0)
                for run in chunk:
                    result_path(out, run).with_name(run.name + ".json.tmp").unlink(missing_ok=True)
                log = open(logs / f"{chunk[0].name}{f'+{len(chunk) - 1}' if len(chunk) > 1 else ''}.log", "w")
                proc = subprocess.Popen(command(chunk), stdout=log, stderr=subprocess.STDOUT, env=env)
                active.append((chunk, proc, time.perf_counter(), log))
            time.sleep(0.2)
            for item in list(active):
                chunk, proc, began, log = item
                if proc.poll() is None:
                    continue
                log.close()
                active.remove(item)
                for run in chunk:
                    status[run.name] = load_result(out, run, settings) is not None
                failed = [r.name for r in chunk if not status[r.name]]
                what = f"FAILED {', '.join(failed)} (exit {proc.returncode}; see {Path(log.name).name})" if failed \
                    else "done"
                echo(f"[study] {chunk[0].name}{f' and {len(chunk) - 1} more' if len(chunk) > 1 else ''}: {what} "
                     f"in {time.perf_counter() - began:.0f} s ({len(status)} of {count} runs, "
                     f"{time.perf_counter() - start:.0f} s so far)")
    except KeyboardInterrupt:  # stop the processes this study started; unfinished runs stay unwritten
        for _, proc, _, _ in active:
            proc.terminate()
        for _, proc, _, log in active:
            proc.wait()
            log.close()
        raise
    return status


def stop_on_sigterm() -> None:
    """`kill PID` of the study stops its runs as Ctrl-C does (their processes are ended, nothing is written)."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def study_args(argv: list[str] | None, parse_args: Callable[[list[str]], object]):
    """A study's parsed command line (argv: sys.argv[1:] when None), with args.argv kept for its report, and the
    offline switches set for it and the runs it starts (the studies read only packaged models and local data)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    return args


def by_cell(run: Run) -> tuple[int, float]:
    """The chunk key that makes the methods of one (seed, noise) share a process: the imports and the data are
    loaded once per cell."""
    return run.seed, run.noise


def run_study(args, settings: dict, command: Callable[[list[Run]], list[str]],
              write_report: Callable[[object, list[dict], float | None], Path],
              chunk_key: Callable[[Run], object] = lambda run: run) -> int:
    """A study's command line: the grid of args.methods x args.noises x args.seeds in args.out; --dry_run
    lists what is left, --report_only only writes the report, otherwise the pending runs run first
    (args.jobs at once). Returns 1 when a run failed or nothing is there to report."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = grid(args.methods, args.noises, args.seeds)
    if args.dry_run:
        todo = pending(runs, out, settings)
        print(f"{len(runs) - len(todo)} of {len(runs)} runs finished; to run:")
        print("\n".join(f"  {r.name}" for r in todo))
        return 0
    start = time.perf_counter()
    status = {} if args.report_only else run_pending(runs, out, settings, command, args.jobs, chunk_key=chunk_key)
    results = [r for r in (load_result(out, run, settings) for run in runs) if r is not None]
    if not results:
        print("[study] no finished runs to report")
        return 1
    report = write_report(args, results, None if args.report_only else time.perf_counter() - start)
    print(report.read_text())
    print(f"[study] wrote {report} and the .csv and .png beside it")
    failed = [name for name, ok in status.items() if not ok]
    if failed:
        print(f"[study] {len(failed)} runs failed: {', '.join(failed)} (see their .log; rerun to retry)")
    return 1 if failed else 0
