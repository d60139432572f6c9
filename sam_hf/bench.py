"""`sam-hf bench`: time per step and peak memory of every method, in 1 and 2 processes.

Every configuration trains the same model on the same per-device batch, one
CPU thread per process (or one GPU per process when CUDA is there), in its
own processes (2-process runs under torchrun), so the figures compare like
with like. Timings are medians over the measured steps and are reported as
ratios taken in the same run; absolute times on a shared machine are noise.
With `--repeats N` every ratio is paired: the median over the N interleaved
rounds of (this configuration's step / the reference's step in the same
round). Every 2-process row is compared with AdamW under DDP on 2 processes
(which pays the same cost of two processes at once) as well as with AdamW
and SAM on 1. Peak memory is reported per process: the resident set's peak
(`ru_maxrss`) on a CPU, `torch.cuda.max_memory_allocated` on a GPU.

    sam-hf bench                       # the default table
    sam-hf bench --steps 20 --hidden 384 --out bench_out
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from .timing import step_timer  # noqa: F401  (also used as bench.step_timer by benchmarks/)

# The references every row is compared with: AdamW on 1 process, and AdamW under DDP on 2, which pays the same cost
# of two processes at once. (label, optim, optim_args, processes)
BASELINES = [("AdamW", "adamw_torch", "", 1), ("AdamW (DDP)", "adamw_torch", "", 2)]


def configurations() -> list[tuple[str, str, str, int]]:
    """The references, then every registered method's examples (registry.py): 1-process rows, then 2-process."""
    import sam_hf  # noqa: F401  (registers the methods)
    from sam_hf import registry

    rows = [(e.label, s.name, e.optim_args, e.processes) for s in registry.specs() for e in s.examples if e.bench]
    return [BASELINES[0]] + [r for r in rows if r[3] == 1] + [BASELINES[1]] + [r for r in rows if r[3] == 2]


def example_id_column(optim: str, optim_args: str) -> str | None:
    """The per-example id column the configuration's method reads from the training data (SAF's), if any."""
    from sam_hf import SharpnessConfig, registry

    if not registry.is_method(optim):
        return None
    return registry.get(optim).method.example_id_column(SharpnessConfig.from_optim_args(optim, optim_args or None))


def runnable(procs: int, optim_args: str, cuda_devices: int, precision: str = "fp32") -> tuple[bool, str]:
    """Whether this machine can run a configuration, and why not."""
    cpu_ascent = "ascent_device=cpu" in optim_args
    if cpu_ascent and not cuda_devices:
        return False, "no GPU: with CPUs only it is the AsyncSAM row above"
    if cpu_ascent and precision == "fp16":
        return False, "a CPU ascent rank has no GradScaler for fp16 (sam_hf refuses it); use --precision bf16"
    if cuda_devices and procs > 1 and not cpu_ascent and cuda_devices < procs:
        return False, f"needs {procs} GPUs, this machine has {cuda_devices}"
    return True, ""


def labels() -> list[str]:
    """Every configuration's label once (a label may run on 1 and on 2 processes)."""
    return list(dict.fromkeys(label for label, *_ in configurations()))


def parse_only(text: str) -> list[str]:
    """`--only`: comma-separated labels; a label holding a comma ("AsyncSAM (CPU ascent, r=auto)") is matched
    whole. An unknown label is an error that lists the known ones."""
    known, pieces, out = labels(), text.split(","), []
    while pieces:
        item = pieces.pop(0)
        while item.strip() not in known and pieces and any(k.startswith(f"{item.strip()},") for k in known):
            item += "," + pieces.pop(0)
        if item.strip() not in known:
            raise ValueError(f"--only: no configuration is labelled {item.strip()!r}; labels: "
                             + "; ".join(known))
        out.append(item.strip())
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam-hf bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out", help="folder for bench.json and bench.md")
    p.add_argument("--steps", type=int, default=12, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="steps before measuring")
    p.add_argument("--batch", type=int, default=16, help="per-device batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per example of the benchmark's BERT classifier")
    p.add_argument("--hidden", type=int, default=256, help="the BERT classifier's hidden size")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="mixed precision of every configuration (Trainer's --bf16 / --fp16)")
    p.add_argument("--layers", type=int, default=4, help="the BERT classifier's encoder layers")
    p.add_argument("--only", default=None,
                   help="comma-separated labels to run, each on every process count it has (default: all): "
                        + "; ".join(labels()))
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all configurations, interleaved so slow drifts of a shared machine hit every "
                        "configuration alike; each configuration reports its median round")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    for action in p._actions:  # every option's help shows its default
        if action.help not in (None, argparse.SUPPRESS) and action.dest not in ("help", "only"):
            action.help += " (default: %(default)s)"
    return p


# ---- one configuration (a worker process) ---------------------------------------
def _worker(opts) -> None:
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    import sam_hf

    torch.set_num_threads(1)
    label, optim, optim_args = json.loads(opts.worker)
    rank = int(os.environ.get("RANK", 0))
    two_kinds = "ascent_device=cpu" in optim_args
    backend = ("nccl" if torch.cuda.is_available() and not two_kinds else "gloo") if "RANK" in os.environ else None
    sam_hf.place_ascent_rank(optim, optim_args, backend)  # ascent_device=cpu: rank 1 on the CPU
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU") != "true"

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=opts.hidden, num_hidden_layers=opts.layers,
                        num_attention_heads=max(1, opts.hidden // 64), intermediate_size=4 * opts.hidden,
                        max_position_embeddings=max(opts.seq, 16), num_labels=2)
    model = BertForSequenceClassification(config)
    steps = opts.warmup + opts.steps
    n = opts.batch * (steps + 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (n, opts.seq), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    column = example_id_column(optim, optim_args)
    if column:  # a method that keeps a record per example (SAF) reads its id from the data
        data = data.add_column(column, list(range(n)))
    args = TrainingArguments(
        output_dir=os.path.join(opts.out, "runs"), optim=optim, optim_args=optim_args or None, max_steps=steps,
        per_device_train_batch_size=opts.batch, learning_rate=1e-4, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=not cuda, dataloader_num_workers=0,
        bf16=opts.precision == "bf16", fp16=opts.precision == "fp16",
        ddp_backend=backend)
    timer = step_timer(torch.cuda.synchronize if cuda else None)
    trainer = sam_hf.SharpnessTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    measured = timer.times[opts.warmup:]
    exchange = [h["sam/exchange_seconds"] for h in trainer.state.log_history if "sam/exchange_seconds" in h]
    result = {
        "label": label, "optim": optim, "optim_args": optim_args, "rank": rank, "round": opts.round,
        "processes": int(os.environ.get("WORLD_SIZE", 1)),
        # a schedule's steps differ by design (3 plain steps in 4 with interval=4): its cost is the mean step
        "step_s": statistics.mean(measured) if "interval=" in optim_args else statistics.median(measured),
        "step_statistic": "mean" if "interval=" in optim_args else "median",
        "exchange_s": statistics.median(exchange[opts.warmup:] or exchange) if exchange else 0.0,
        "peak_mem_mb": (torch.cuda.max_memory_allocated() if cuda else
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "mem_kind": "gpu" if cuda else "rss",
        "device": torch.cuda.get_device_name() if cuda else "cpu (1 thread per process)",
        "ascent_batch_ratio": getattr(getattr(trainer.optimizer, "method", None), "ratio", None),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    with open(os.path.join(opts.out, f"worker_{rank}.json"), "w") as f:
        json.dump(result, f)


# ---- the harness ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(opts, label, optim, optim_args, procs, round_: int = 0) -> list[dict]:
    out = Path(opts.out) / "tmp"
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("worker_*.json"):
        f.unlink()
    common = ["--out", str(out), "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--batch",
              str(opts.batch), "--seq", str(opts.seq), "--hidden", str(opts.hidden), "--layers", str(opts.layers),
              "--precision", opts.precision, "--round", str(round_),
              "--worker", json.dumps([label, optim, optim_args])]
    launcher = [sys.executable, "-m", "sam_hf.bench"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
        str(_free_port()), "-m", "sam_hf.bench"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    load = os.getloadavg()[0]  # what else the machine was doing: timings under load are not comparable
    proc = subprocess.run(launcher + common, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {label} on {procs} process(es) failed:\n{proc.stderr[-4000:]}")
    return [{**json.loads(f.read_text()), "load_avg_1m": load} for f in sorted(out.glob("worker_*.json"))]


REFERENCES = {"adamw_1": ("AdamW", 1), "adamw_ddp_2": ("AdamW (DDP)", 2), "sam_1": ("SAM", 1)}


def _paired(row: dict, ref: dict | None) -> float | None:
    """row / ref: the median over the rounds both ran of the ratio within each round (interleaved rounds see the
    same machine), or the ratio of their median rounds where rounds are not known."""
    if ref is None or not ref["step_s"]:
        return None
    mine, theirs = row["by_round"], ref["by_round"]
    common = sorted(set(mine) & set(theirs))
    if None in mine or not common:
        return row["step_s"] / ref["step_s"]
    return statistics.median(mine[r] / theirs[r] for r in common)


def summarize(results: list[dict]) -> dict:
    """Per configuration: rank 0's step time (median round), every rank's peak memory, and step-time ratios to
    AdamW on 1, AdamW with DDP on 2 (2-process rows) and SAM on 1, each paired within rounds."""
    rows = []
    by_key = {}
    for r in results:
        by_key.setdefault((r["label"], r["processes"]), []).append(r)
    for (label, procs), ranks in by_key.items():
        leads = sorted((r for r in ranks if r["rank"] == 0), key=lambda r: r["step_s"])
        lead = leads[len(leads) // 2]  # the median round
        same_kind = [r for r in ranks if r.get("mem_kind") == lead.get("mem_kind")]
        per_rank = {}
        for r in same_kind:  # GPU memory and a CPU rank's resident set are not comparable: rank 0's kind
            per_rank[r["rank"]] = max(per_rank.get(r["rank"], 0.0), r["peak_mem_mb"])
        rows.append({"label": label, "processes": procs, "step_s": lead["step_s"], "rounds": len(leads),
                     "round_steps_s": [r["step_s"] for r in leads],
                     "by_round": {r.get("round"): r["step_s"] for r in leads},
                     "exchange_share": lead["exchange_s"] / lead["step_s"] if lead["step_s"] else 0.0,
                     "peak_mem_mb": max(per_rank.values()),
                     "peak_mem_mb_per_rank": [per_rank[k] for k in sorted(per_rank)],
                     "mem_kind": lead.get("mem_kind", "rss"),
                     "device": lead["device"], "params_m": lead["params_m"],
                     "step_statistic": lead.get("step_statistic", "median"),
                     "ascent_batch_ratio": lead.get("ascent_batch_ratio")})
    find = {(r["label"], r["processes"]): r for r in rows}
    refs = {name: find.get(key) for name, key in REFERENCES.items()}
    for r in rows:
        r["vs_adamw_1"] = _paired(r, refs["adamw_1"])
        r["vs_adamw_ddp_2"] = _paired(r, refs["adamw_ddp_2"]) if r["processes"] == 2 else None
        to_sam = _paired(r, refs["sam_1"])
        r["speedup_vs_sam_1"] = 1 / to_sam if to_sam else None
        base = refs["adamw_1"]
        copy_mb = r["params_m"] * 1e6 * 4 / 2**20  # one fp32 copy of the weights
        r["mem_copies_vs_adamw_1"] = ((r["peak_mem_mb"] - base["peak_mem_mb"]) / copy_mb
                                      if base and base.get("mem_kind") == r["mem_kind"] and copy_mb else None)
    targets = {}

    def target(name, key, field, invert=False):
        row = find.get(key)
        if row is not None and row.get(field) is not None:
            targets[name] = 1 / row[field] if invert else row[field]

    target("SAMPa-0.2 on 2 vs AdamW (DDP) on 2 (target <= 1.05x)", ("SAMPa-0.2", 2), "vs_adamw_ddp_2")
    target("AsyncSAM (r=1) on 2 vs AdamW (DDP) on 2 (target <= 1.03x)", ("AsyncSAM (r=1)", 2), "vs_adamw_ddp_2")
    if ("SAMPa-0.2", 1) in find and refs["sam_1"]:
        targets["SAMPa-0.2 on 1 vs SAM on 1 (target <= 1.05x)"] = _paired(find[("SAMPa-0.2", 1)], refs["sam_1"])
    target("SAM (interval=4) on 1 vs AdamW on 1 (expected about 1.25x)", ("SAM (interval=4)", 1), "vs_adamw_1")
    target("SAMPa-0.2 on 2 vs SAM on 1 (target >= 1.85x faster)", ("SAMPa-0.2", 2), "speedup_vs_sam_1")
    target("SAMPa-0.2 on 2 vs AdamW on 1 (target <= 1.08x)", ("SAMPa-0.2", 2), "vs_adamw_1")
    target("AsyncSAM (r=1) on 2 vs AdamW on 1 (target <= 1.10x)", ("AsyncSAM (r=1)", 2), "vs_adamw_1")
    loads = [r["load_avg_1m"] for r in results if "load_avg_1m" in r]
    return {"rows": rows, "targets": targets, "load_avg_1m": [min(loads), max(loads)] if loads else None}


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def to_markdown(summary: dict, opts) -> str:
    rows = summary["rows"]
    if not rows:
        return "No configuration ran on this machine (see the skipped lines above).\n"
    device = rows[0]["device"]
    kind = "GPU max_memory_allocated" if rows[0]["mem_kind"] == "gpu" else "resident set peak"
    lines = [f"Model: BERT, hidden {opts.hidden}, {opts.layers} layers ({rows[0]['params_m']:.1f} M parameters), "
             f"per-device batch {opts.batch} x {opts.seq} tokens, {opts.precision}; device: {device}; median of "
             f"{opts.steps} steps "
             f"after {opts.warmup} warm-up steps; median of {opts.repeats} interleaved round(s); ratios are paired "
             f"within rounds. Peak memory per process: {kind} (rank 0 / rank 1), and above AdamW on 1 process in "
             "copies of the weights (fp32).", "",
             "| method | processes | step (ms) | vs AdamW on 1 | vs AdamW (DDP) on 2 | speed-up vs SAM on 1 | "
             "exchange share | peak memory / process (MiB) | above AdamW on 1 (copies) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = f"{100 * r['exchange_share']:.1f}%" if r["exchange_share"] else "-"
        mem = " / ".join(f"{m:.0f}" for m in r["peak_mem_mb_per_rank"])
        copies = "-" if r["mem_copies_vs_adamw_1"] is None else f"{r['mem_copies_vs_adamw_1']:+.1f}"
        lines.append(f"| {r['label']} | {r['processes']} | {1000 * r['step_s']:.0f} | {_x(r['vs_adamw_1'])} | "
                     f"{_x(r['vs_adamw_ddp_2'])} | {_x(r['speedup_vs_sam_1'])} | {share} | {mem} | {copies} |")
    means = [r["label"] for r in rows if r.get("step_statistic") == "mean"]
    if means:
        lines += ["", f"{', '.join(means)}: the mean step of the measured steps (a schedule's steps differ by design), "
                      "the others the median step."]
    auto = [r for r in rows if "r=auto" in r["label"] and r.get("ascent_batch_ratio")]
    if auto:
        lines += [""] + [f"{r['label']}: `ascent_batch_ratio=auto` chose r = {r['ascent_batch_ratio']:.3f}."
                         for r in auto]
    loads = summary.get("load_avg_1m")
    if loads:
        lines += ["", f"1-minute load average when each run started: {loads[0]:.2f} to {loads[1]:.2f} "
                      "(this machine's own runs keep it near the process count)."]
    if summary["targets"]:
        lines += ["", "| target | measured |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in summary["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    if opts.worker:
        _worker(opts)
        return 0
    try:
        only = set(parse_only(opts.only)) if opts.only else None
    except ValueError as err:
        _parser().error(str(err))
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    results = []
    for round_ in range(opts.repeats):
        for label, optim, optim_args, procs in configurations():
            if only and label not in only:
                continue
            ok, why = runnable(procs, optim_args, gpus, opts.precision)
            if not ok:
                if round_ == 0:
                    print(f"[bench] skipping {label} on {procs} process(es): {why}", flush=True)
                continue
            print(f"[bench] round {round_ + 1}/{opts.repeats}: {label} on {procs} process(es) ...", flush=True)
            results += _run(opts, label, optim, optim_args, procs, round_)
    summary = summarize(results)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(summary, opts)
    (out / "bench.json").write_text(json.dumps({"settings": vars(opts), "results": results, **summary}, indent=2))
    (out / "bench.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
