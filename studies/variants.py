"""Efficient variants and combinations, the SAMPa paper's Table 4 and Table 8, on the label-noise digits task.

Every row trains the small BatchNorm CNN of `sam_hf/label_noise.py` on scikit-learn's digits with 40% of the
training labels corrupted (§5.4's protocol, §5.1's settings), over seeds; a seed fixes the corrupted labels,
the initial weights and the batch order, the same for every row. Each run reports the clean test accuracy,
lambda_max of the final model and the memorized share of the corrupted labels.

Time is not read from the runs (they ran one after the other on a machine shared with other jobs, so the
load changed between them). A separate timing pass (`--timing`) trains every configuration for a short while,
round-robin, several rounds; in each round each configuration's mean step time is divided by SGD's of the
same round, and the table gives the median of these ratios over rounds (`paired_ratios`). A step is one
batch of 128, so the ratio per step is the ratio per epoch. Every process runs one thread, so it stands for
one device: the 2-process rows (SAMPa-0.2 and Asynchronous SAM in role mode, under torchrun) are also divided
by SGD with DDP on 2 processes (batch 128 on each) of the same round, which pays the same cost of two
processes and is the limit they can reach (`sgd_ddp`, a time reference only; per epoch it takes half the
steps). timing.json is reused only when it holds every requested row with the requested rounds and length
(`timing_mismatch`): ratios are paired within rounds.

    python -m studies.variants --jobs 1                 # timing pass and every run, resumable
    python -m studies.variants --report_only            # tables and figure from what is finished

Settings per row follow the SAMPa paper's Appendix B.4 (cited in ROWS); rho is the vision study's SAM rho
(0.1 at 40% noise, §5.4) unless B.4 gives another, and doubled for SAMPa (§5.1; B.4 for Table 8).
Writes OUT/runs/<row>-noise40-seed<k>.json, OUT/timing.json and OUT/variants.{csv,md}, OUT/figure2.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import report, runner
from .summary import cell, group, markdown, paired_differences, summarize

HERE = Path(__file__).resolve().parent
NOISE = 0.4
BASE = "base=sgd,momentum=0.9"


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    optim: str
    args: str  # the method's own optim_args, without rho and the base optimizer
    rho_factor: float = 1.0  # rho = factor x SAM's rho (0.1 at 40% noise)
    table: int = 4
    paper: float | None = None  # the paper's test accuracy (Table 4 or Table 8), ResNet-56 on CIFAR-10
    paper_time: float | None = None  # Table 4's time per epoch (s), 2 GPUs for SAMPa
    processes: int = 1  # > 1: torchrun, one thread per process (a process stands for a device)
    timed_only: bool = False  # a time reference: in the timing pass, not trained for accuracy


# SAF and MESA: B.4 starts their trajectory loss after epoch 5 (of 200 there, of 20 here).
TRAJ_START = "start_epoch=5"  # B.4
ROWS = (
    # Table 4 (§5.2): efficient variants
    Row("sgd", "SGD", "sgd", "", table=4, paper=94.20),  # Table 1 (ResNet-56, 400 epochs)
    # what two processes cost without any sharpness method: the limit of the 2-process rows (batch 128 each)
    Row("sgd_ddp", "SGD, DDP on 2 processes", "sgd", "", table=4, processes=2, timed_only=True),
    Row("sam", "SAM", "sam", "", table=4, paper=94.26, paper_time=18.81),
    Row("sam_k2", "SAM, k = 2", "sam", "interval=2", table=4),
    Row("sampa2rho", "SAMPa-0.2 (2ρ)", "sampa", "lam=0.2", 2.0, table=4, paper=94.62),
    # Table 4's time is SAMPa-0.2 on 2 GPUs (Table 11): role mode, one gradient per process
    Row("sampa2rho_2proc", "SAMPa-0.2 (2ρ), 2 processes", "sampa", "lam=0.2,parallel=on", 2.0, table=4, paper=94.62,
        paper_time=10.94, processes=2),
    # not in Table 4: the stale ascent on the second process, on the whole batch (r = 1), SAM's rho
    Row("asyncsam_2proc", "Asynchronous SAM, 2 processes", "asyncsam", "ascent_batch_ratio=1,parallel=on", table=4,
        processes=2),
    Row("looksam", "LookSAM", "looksam", "k=5,alpha=0.7", table=4, paper=91.42, paper_time=16.28),  # B.4
    Row("aesam", "AE-SAM", "aesam", "delta=0.9", 2.0, table=4, paper=94.46, paper_time=13.47),  # B.4: rho 0.2
    Row("esam", "ESAM (SWP)", "esam", "beta=0.5,gamma=1", table=4, paper=94.21, paper_time=15.97),  # B.4, no SDS
    Row("saf", "SAF", "saf", TRAJ_START, table=4, paper=93.89, paper_time=10.09),
    Row("mesa", "MESA", "mesa", f"kl_weight=0.8,decay=0.9995,{TRAJ_START}", table=4, paper=94.23,
        paper_time=15.43),  # B.4: lambda 0.8, beta 0.9995
    Row("gsam", "GSAM", "gsam", "alpha=0.4", table=4),
    # Table 8 (§5.5): each variant alone and with SAMPa-0.2 at twice its rho (B.4)
    Row("msam", "mSAM (m=4)", "msam", "micro_batches=4", table=8, paper=94.28),  # B.4: micro-batch 32
    Row("msam_sampa", "mSAM + SAMPa", "sampa", "lam=0.2,micro_batches=4", 2.0, table=8, paper=94.71),
    Row("asam", "ASAM", "sam", "rule=asam", 5.0, table=8, paper=94.84),  # B.4: rho 0.5
    Row("asam_sampa", "ASAM + SAMPa", "sampa", "lam=0.2,rule=asam", 10.0, table=8, paper=94.95),
    Row("sam_on", "SAM-ON", "sam", "rule=sam_on", 5.0, table=8, paper=94.44),  # B.4: rho 0.5
    Row("sam_on_sampa", "SAM-ON + SAMPa", "sampa", "lam=0.2,rule=sam_on", 10.0, table=8, paper=94.51),
    Row("vasso", "VaSSO", "sam", "rule=vasso,theta=0.4", table=8, paper=94.80),  # B.4: theta 0.4
    Row("vasso_sampa", "VaSSO + SAMPa", "sampa", "lam=0.2,rule=vasso,theta=0.4", 2.0, table=8, paper=94.97),
    Row("bisam", "BiSAM (-log)", "sam", "rule=bisam,bisam_bound=log,mu=1", table=8, paper=94.49),  # B.4: mu 1
    Row("bisam_sampa", "BiSAM + SAMPa", "sampa", "lam=0.2,rule=bisam,bisam_bound=log,mu=1", 2.0, table=8,
        paper=95.13),
)
BY_NAME = {r.name: r for r in ROWS}
ORDER = tuple(r.name for r in ROWS)
TABLE8_PAIRS = (("msam", "msam_sampa"), ("asam", "asam_sampa"), ("sam_on", "sam_on_sampa"),
                ("vasso", "vasso_sampa"), ("bisam", "bisam_sampa"))


def register() -> None:
    """Make every row a method of `sam_hf.label_noise` (its METHODS and RHO_FACTOR tables), so its runner
    trains it; a row named as an existing method must mean the same configuration."""
    from sam_hf import label_noise

    for r in ROWS:
        entry = (r.label, r.optim, r.args)
        old = label_noise.METHODS.get(r.name)
        if old is not None and old[1:] != entry[1:]:
            raise ValueError(f"row {r.name!r} is {entry[1:]} here but {old[1:]} in sam_hf.label_noise.METHODS")
        label_noise.METHODS[r.name] = entry
        if r.rho_factor != 1.0:
            label_noise.RHO_FACTOR[r.name] = r.rho_factor


def optim_of(name: str, noise: float = NOISE) -> tuple[str, str]:
    """(optim, optim_args) of a row as its run passes them to Trainer."""
    from sam_hf import label_noise

    register()
    _, optim, args = label_noise.method_optim(name, noise)
    return optim, args


def config_of(name: str, noise: float = NOISE):
    """The validated SharpnessConfig of a row (None for SGD, the plain base optimizer)."""
    from sam_hf import SharpnessConfig

    optim, args = optim_of(name, noise)
    return None if optim == "sgd" else SharpnessConfig.from_optim_args(optim, args)


# ---------------------------------------------------------------- timing pass


def paired_ratios(rounds: list[dict[str, float]], base: str = "sgd") -> dict[str, dict]:
    """Per configuration: its time over `base`'s time in the same round, then the median (and range) over the
    rounds. Rounds are interleaved, so a load change between rounds divides out of each ratio."""
    out = {}
    for name in {k for r in rounds for k in r}:
        ratios = [r[name] / r[base] for r in rounds if name in r and base in r and r[base] > 0]
        if ratios:
            out[name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                         "rounds": len(ratios)}
    return out


# The timing pass turns SAF's and MESA's trajectory loss on early: MESA from the first step, SAF (whose reference
# logits must be E epochs old) with E = 1 from the second epoch on.
TIMING_ARGS = {"mesa": "start_epoch=-1", "saf": "start_epoch=0,epochs_back=1"}


def train_row(name: str, run, output_dir: Path) -> dict:
    """Train a row's DigitsRun in this process, or under torchrun on the row's processes (whose workers start
    in this module, so they know the rows: main hands them to `digits_worker`)."""
    from sam_hf.label_noise import train_digits, train_digits_torchrun

    processes = BY_NAME[name].processes
    if processes == 1:
        return train_digits(run, output_dir)
    return train_digits_torchrun(run, output_dir, processes, module="studies.variants")


def timing_pass(args) -> dict:
    """Every row for `timing_epochs` epochs, round-robin (the order rotates by one each round), `timing_rounds`
    rounds; SAF and MESA with their trajectory loss on early (TIMING_ARGS). A 2-process row's time is rank 0's
    mean step (the roles meet at the exchange every step); torchrun's start is not in it."""
    from sam_hf import label_noise
    from sam_hf.label_noise import DigitsRun

    register()
    names = list(args.rows)
    rounds = []
    for k in range(args.timing_rounds):
        order = names[k % len(names):] + names[:k % len(names)]
        times = {}
        for name in order:
            label, optim, own = label_noise.METHODS[name]
            if optim in TIMING_ARGS:  # in this process only (a test checks no such row runs under torchrun)
                label_noise.METHODS[name] = (label, optim, own.replace(TRAJ_START, TIMING_ARGS[optim]))
            try:
                result = train_row(name, DigitsRun(method=name, noise=NOISE, seed=1, epochs=args.timing_epochs,
                                                   sharpness_samples=0, curves=False),
                                   Path(args.out) / "runs" / "trainer" / f"timing-{name}")
            except RuntimeError as err:
                raise RuntimeError(f"timing pass, round {k + 1}, row {name}: {err}") from None
            finally:
                label_noise.METHODS[name] = (label, optim, own)
            times[name] = result["sec_per_step_mean"]
            print(f"[timing] round {k + 1} {name}: {1000 * times[name]:.0f} ms/step", flush=True)
        rounds.append(times)
    return {"rounds": rounds, "epochs": args.timing_epochs, **timing_ratios(rounds)}


def timing_ratios(rounds: list[dict[str, float]]) -> dict:
    """Every row's paired ratios to SGD; the multi-process rows' also to SGD with DDP (their limit)."""
    many = [{n: t for n, t in r.items() if BY_NAME[n].processes > 1} for r in rounds]
    return {"ratios": paired_ratios(rounds), "ratios_to_ddp": paired_ratios(many, "sgd_ddp")}


# ---------------------------------------------------------------- runs


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m studies.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "variants"), help="results folder (resumes from it)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, one process (one thread) each; a 2-process row takes two")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--methods", default=",".join(ORDER), help=f"a subset of {','.join(ORDER)}")
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--sharpness_samples", type=int, default=256, help="0: no lambda_max")
    p.add_argument("--timing_rounds", type=int, default=5)
    p.add_argument("--timing_epochs", type=float, default=4, help="epochs of 12 steps per configuration and round")
    p.add_argument("--timing", choices=("first", "only", "skip"), default="first",
                   help="first: the timing pass (unless OUT/timing.json holds these rows, rounds and length) "
                        "then the runs")
    p.add_argument("--report_only", action="store_true", help="write the tables and figure, run nothing")
    p.add_argument("--dry_run", action="store_true", help="list the runs still to do, run nothing")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.noises = [NOISE]
    args.rows = [m.strip() for m in args.methods.split(",") if m.strip()]  # timed and reported
    unknown = [m for m in args.rows if m not in BY_NAME]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    if "sgd" not in args.rows:
        p.error("--methods must include sgd: times and gains are relative to it")
    many = [m for m in args.rows if BY_NAME[m].processes > 1 and m != "sgd_ddp"]
    if many and "sgd_ddp" not in args.rows:
        p.error(f"--methods: the 2-process rows ({', '.join(many)}) are timed against SGD with DDP on 2 "
                "processes: add sgd_ddp")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.timing_rounds < 1 or args.timing_epochs * 12 < 4:
        p.error(f"--timing_rounds {args.timing_rounds} --timing_epochs {args.timing_epochs:g}: at least 1 round "
                "and 1/3 epoch (4 steps, 3 of them dropped as warm-up)")
    args.methods = [m for m in args.rows if not BY_NAME[m].timed_only]  # trained for accuracy
    return args


def settings_of(args) -> dict:
    """What every run shares; a finished run made with other settings is not reused."""
    from sam_hf.label_noise import DigitsRun

    run = DigitsRun(epochs=args.epochs, sharpness_samples=args.sharpness_samples)
    keep = ("epochs", "batch", "learning_rate", "weight_decay", "width", "label_smoothing", "sharpness_samples")
    return {k: getattr(run, k) for k in keep}


def worker(args) -> int:
    from sam_hf.label_noise import DigitsRun

    runner.stop_on_sigterm()  # the study's `kill` reaches a torchrun row's workers too
    register()
    settings, out = settings_of(args), Path(args.out)
    for spec in json.loads(args.worker):
        run = runner.Run(spec["seed"], spec["noise"], spec["method"])
        result = train_row(run.method, DigitsRun(method=run.method, noise=run.noise, seed=run.seed, **settings),
                           out / "runs" / "trainer" / run.name)
        runner.write_result(runner.result_path(out, run), {**result, "settings": settings})
    return 0


def command_for(args):
    def command(chunk: list[runner.Run]) -> list[str]:
        runs = [{"method": r.method, "noise": r.noise, "seed": r.seed} for r in chunk]
        return runner.python_module("studies.variants") + [
            "--worker", json.dumps(runs), "--out", args.out, "--epochs", str(args.epochs),
            "--sharpness_samples", str(args.sharpness_samples)]

    return command


# ---------------------------------------------------------------- report


def load_timing(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / "timing.json").read_text())
    except (OSError, ValueError):
        return None


def timing_mismatch(out: Path, args) -> str:
    """Why OUT/timing.json cannot serve this command ("" when it can): no file, or made for other rows,
    lengths or rounds. The pass then reruns whole: a row timed in other rounds would not be paired with the rest."""
    timing = load_timing(out)
    if timing is None:
        return "no timing pass yet"
    missing = [m for m in args.rows if m not in timing.get("ratios", {})]
    if missing:
        return f"timing.json has no {', '.join(missing)}"
    if timing.get("epochs") != args.timing_epochs or len(timing.get("rounds", [])) != args.timing_rounds:
        return (f"timing.json has {len(timing.get('rounds', []))} rounds of {timing.get('epochs')} epochs, "
                f"asked: {args.timing_rounds} of {args.timing_epochs:g}")
    return ""


def _ratio(timing, name, key: str = "ratios") -> str:
    r = (timing or {}).get(key, {}).get(name)
    return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})" if r else "-"


def reported_rows(args, results: list[dict], timing: dict | None) -> list[str]:
    """The rows of the tables: the requested rows with finished runs, and the timed-only references timed."""
    ratios = (timing or {}).get("ratios", {})
    return [m for m in args.rows if any(r["method"] == m for r in results) or (BY_NAME[m].timed_only
                                                                                and m in ratios)]


def tables(results: list[dict], timing: dict | None, methods: list[str]) -> tuple[str, str]:
    acc = group(results, lambda r: (r["method"],), "test_accuracy")
    lmax = group(results, lambda r: (r["method"],), "lambda_max")
    mem = group(results, lambda r: (r["method"],), "memorized")
    gain = {m: paired_differences(results, "test_accuracy", m, "sgd").get(NOISE, summarize([])) for m in methods}
    none = summarize([])

    def paper_ratio(name):
        row, sam = BY_NAME[name], BY_NAME["sam"]
        return f"{row.paper_time:.2f} s ({row.paper_time / sam.paper_time:.2f}× SAM)" if row.paper_time else "-"

    sam_ratio = (timing or {}).get("ratios", {}).get("sam")
    t4 = [[BY_NAME[m].label,
           "(time reference)" if BY_NAME[m].timed_only else cell(acc.get((m,), none), 100),
           "" if m == "sgd" or BY_NAME[m].timed_only else cell(gain[m], 100),
           f"{BY_NAME[m].paper:.2f}" if BY_NAME[m].paper else "-", cell(lmax.get((m,), none), 1, 1),
           cell(mem.get((m,), none), 100, 1), _ratio(timing, m),
           (f"{timing['ratios'][m]['median'] / sam_ratio['median']:.2f}" if sam_ratio and m in timing["ratios"]
            else "-"), _ratio(timing, m, "ratios_to_ddp") if BY_NAME[m].processes > 1 else "-", paper_ratio(m)]
          for m in methods if BY_NAME[m].table == 4]
    table4 = markdown(["row", "test acc. (%)", "gain over SGD (pts)", "paper acc.", "λ_max", "memorized (%)",
                       "time/step ÷ SGD", "÷ SAM", "÷ SGD, DDP on 2", "paper time/epoch"], t4)
    t8 = []
    for alone, combo in TABLE8_PAIRS:
        if alone not in methods or combo not in methods:
            continue
        diff = paired_differences(results, "test_accuracy", combo, alone).get(NOISE, none)
        t8.append([BY_NAME[alone].label, cell(acc.get((alone,), none), 100), cell(acc.get((combo,), none), 100),
                   cell(diff, 100), f"{BY_NAME[alone].paper:.2f} → {BY_NAME[combo].paper:.2f} "
                                    f"({BY_NAME[combo].paper - BY_NAME[alone].paper:+.2f})",
                   f"{cell(lmax.get((alone,), none), 1, 1)} → {cell(lmax.get((combo,), none), 1, 1)}",
                   f"{_ratio(timing, alone)} → {_ratio(timing, combo)}"])
    table8 = markdown(["variant", "alone: acc. (%)", "+ SAMPa: acc. (%)", "+ SAMPa − alone (pts, paired)",
                       "paper: alone → + SAMPa", "λ_max: alone → + SAMPa", "time ÷ SGD: alone → + SAMPa"], t8)
    return table4, table8


def msam_ordering(results: list[dict]) -> str:
    """mSAM Theorem 3.2 (and its Table 4): lambda_max of SGD >= SAM >= mSAM; checked per seed."""
    lmax = {(r["method"], r["seed"]): r.get("lambda_max") for r in results}
    seeds = sorted(s for (m, s) in lmax if m == "sgd" and ("sam", s) in lmax and ("msam", s) in lmax)
    if not seeds:
        return ""
    holds = [s for s in seeds if lmax[("sgd", s)] >= lmax[("sam", s)] >= lmax[("msam", s)]]
    return (f"λ_max ordering of mSAM's Theorem 3.2 (SGD ≥ SAM ≥ mSAM at the final model): holds in "
            f"{len(holds)} of {len(seeds)} seeds (" + "; ".join(
                f"seed {s}: {lmax[('sgd', s)]:.0f} / {lmax[('sam', s)]:.0f} / {lmax[('msam', s)]:.0f}"
                for s in seeds) + ").")


def plot(results: list[dict], timing: dict | None, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = group(results, lambda r: (r["method"],), "test_accuracy")
    ratios = (timing or {}).get("ratios", {})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, table in zip(axes, (4, 8)):
        drawn = 0
        for m in methods:
            if (BY_NAME[m].table != table and m not in ("sgd", "sam")) or m not in ratios or (m,) not in acc:
                continue
            drawn += 1
            s, r = acc[(m,)], ratios[m]
            many = BY_NAME[m].processes > 1  # hollow: two processes (two devices)
            ax.errorbar(r["median"], 100 * s.mean, yerr=100 * s.std if s.n > 1 else 0,
                        xerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]], marker="o", capsize=3,
                        linestyle="none", label=BY_NAME[m].label, markerfacecolor="none" if many else None)
            ax.annotate(BY_NAME[m].label, (r["median"], 100 * s.mean), fontsize="x-small",
                        xytext=(4, 4 if drawn % 2 else -10), textcoords="offset points")  # neighbours apart
        ax.set_xlabel("time per step ÷ SGD's on 1 process (median over interleaved rounds; bars: range)")
        ax.set_ylabel("test accuracy (%), 40% label noise (bars: std over seeds)")
        ax.set_title(f"Table {table} rows, CNN on digits, one CPU thread per process", fontsize="medium")
    report.save(fig, path)


def write_report(args, results: list[dict], seconds: float | None) -> Path:
    out = Path(args.out)
    timing = load_timing(out)
    methods = reported_rows(args, results, timing)
    keep = ("method", "label", "noise", "seed", "optim", "optim_args", "rho", "epochs", "steps", "test_accuracy",
            "train_fit", "memorized", "corrupted", "lambda_max", "sec_per_step", "sec_per_step_mean",
            "train_seconds")
    ratios, to_ddp = (timing or {}).get("ratios", {}), (timing or {}).get("ratios_to_ddp", {})
    rows = [{**{k: r.get(k) for k in keep}, "processes": r.get("processes", 1),
             "time_ratio_to_sgd": ratios.get(r["method"], {}).get("median"),
             "time_ratio_to_sgd_ddp": to_ddp.get(r["method"], {}).get("median")} for r in results]
    report.write_csv(out / "variants.csv", rows)
    plot(results, timing, methods, out / "figure2.png")
    table4, table8 = tables(results, timing, methods)
    seeds = sorted({r["seed"] for r in results})
    s = settings_of(args)
    timing_text = ("no timing pass yet" if not timing else
                   f"{len(timing['rounds'])} interleaved rounds of {timing['epochs']:g} epoch(s) "
                   f"({12 * timing['epochs']:.0f} steps of 128, the first 3 dropped) per configuration; cell: "
                   "median ratio of mean step times to SGD's in the same round (range over rounds)"
                   + ("; 2-process rows also to SGD with DDP on 2 processes (batch 128 on each, so "
                      f"{6 * timing['epochs']:.0f} steps)" if timing.get("ratios_to_ddp") else ""))
    text = [
        *report.header("Efficient variants and combinations (SAMPa Tables 4 and 8) on the label-noise digits task",
                       "variants", args, results, seconds,
                       f" Seeds {', '.join(map(str, seeds))}. Timing: {timing_text}."),
        f"Settings: 40% label noise, {s['epochs']:g} epochs (batch {s['batch']}), SGD momentum 0.9 under every "
        f"method, lr {s['learning_rate']} cosine, weight decay {s['weight_decay']}, label smoothing "
        f"{s['label_smoothing']}; ρ = 0.1 (the vision study's SAM), × the row's factor: AE-SAM 0.2, ASAM and "
        "SAM-ON 0.5 (B.4), SAMPa 2ρ (§5.1, B.4). λ_max on a fixed sample of "
        f"{s['sharpness_samples']} training examples. Test accuracy: mean ± sample std over seeds; paired "
        "differences by seed. The paper's numbers are ResNet-56 on CIFAR-10 without noise (Tables 4 and 8, "
        "one value each); its times are per epoch on GPUs, SAMPa's on two.", "",
        "## Table 4: efficient variants", "", table4, "",
        msam_ordering(results), "",
        "## Table 8: with SAMPa-0.2", "", table8, "",
        "![time per step relative to SGD against test accuracy](figure2.png)", "",
    ]
    (out / "variants.md").write_text("\n".join(text))
    return out / "variants.md"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--digits_run" in argv:  # one process of a torchrun row
        from sam_hf.label_noise import digits_worker

        register()
        return digits_worker(argv)
    args = runner.study_args(argv, parse_args)
    if args.worker:
        return worker(args)
    out = Path(args.out)
    why = "" if args.report_only or args.dry_run or args.timing == "skip" else timing_mismatch(out, args)
    if why:
        from sam_hf.distributed.placement import cpu_cores

        cores = cpu_cores()
        crowded = [m for m in args.rows if BY_NAME[m].processes > cores]
        if crowded:  # their processes would share cores: the time would not be two devices'
            print(f"error: the timing pass of {', '.join(crowded)} needs {BY_NAME[crowded[0]].processes} CPU "
                  f"cores, this machine has {cores}: leave them out of --methods, or --timing skip",
                  file=sys.stderr)
            return 2
        print(f"[timing] {why}: timing every row, {args.timing_rounds} interleaved rounds", flush=True)
        start = time.perf_counter()
        timing = timing_pass(args)
        timing["seconds"] = time.perf_counter() - start
        out.mkdir(parents=True, exist_ok=True)
        runner.write_result(out / "timing.json", timing)
        print(f"[timing] done in {timing['seconds']:.0f} s")
    if args.timing == "only":
        return 0
    return runner.run_study(args, settings_of(args), command_for(args), write_report,
                            chunk_key=runner.by_cell)


if __name__ == "__main__":
    sys.exit(main())
