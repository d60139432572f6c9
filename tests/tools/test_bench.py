"""The benchmark harness: its table arithmetic, and one real configuration end to end (tiny)."""

import argparse
import json

import pytest

from sam_hf import bench


def _r(label, procs, step, rank=0, exchange=0.0, mem=100.0):
    return {"label": label, "processes": procs, "step_s": step, "rank": rank, "exchange_s": exchange,
            "peak_mem_mb": mem, "device": "cpu", "params_m": 1.0}


def test_summary_ratios_medians_and_targets():
    results = [_r("AdamW", 1, 1.0), _r("AdamW", 1, 3.0), _r("AdamW", 1, 1.2),  # three rounds: median 1.2
               _r("SAM", 1, 2.4), _r("SAMPa-0.2", 2, 1.3, exchange=0.13), _r("SAMPa-0.2", 2, 1.3, rank=1, mem=300.0),
               _r("AsyncSAM (r=1)", 2, 1.2)]
    summary = bench.summarize(results)
    rows = {(r["label"], r["processes"]): r for r in summary["rows"]}
    assert rows[("AdamW", 1)]["step_s"] == 1.2 and rows[("AdamW", 1)]["rounds"] == 3
    sampa = rows[("SAMPa-0.2", 2)]
    assert abs(sampa["speedup_vs_sam_1"] - 2.4 / 1.3) < 1e-12 and abs(sampa["vs_adamw_1"] - 1.3 / 1.2) < 1e-12
    assert sampa["peak_mem_mb"] == 300.0 and abs(sampa["exchange_share"] - 0.1) < 1e-12
    targets = summary["targets"]
    assert abs(targets["SAMPa-0.2 on 2 vs SAM on 1 (target >= 1.85x faster)"] - 2.4 / 1.3) < 1e-12


def test_ratios_are_paired_within_rounds_and_two_process_rows_meet_ddp():
    # round 1 ran on a slower machine for everyone: paired ratios see through it, ratios of medians do not
    rounds = {"AdamW": (1.0, 2.0, 1.0), "SAM": (2.0, 4.0, 2.0), "AdamW (DDP)": (1.1, 2.2, 1.1)}
    results = [{**_r(label, 2 if "DDP" in label else 1, s), "round": i}
               for label, steps in rounds.items() for i, s in enumerate(steps)]
    results += [{**_r("SAMPa-0.2", 2, s, rank=rank, mem=100.0 + rank), "round": i}
                for i, s in enumerate((1.2, 2.0, 1.21)) for rank in (0, 1)]
    results += [{**_r("SAMPa-0.2", 1, s), "round": i} for i, s in enumerate((2.1, 4.1, 2.06))]
    results += [{**_r("SAM (interval=4)", 1, s), "round": i} for i, s in enumerate((1.25, 2.5, 1.25))]
    summary = bench.summarize(results)
    rows = {(r["label"], r["processes"]): r for r in summary["rows"]}
    sampa2 = rows[("SAMPa-0.2", 2)]
    # per round: 1.2/1.1, 2.0/2.2, 1.21/1.1 -> median 1.2/1.1 (the median rounds alone would give 1.21/1.1)
    assert sampa2["vs_adamw_ddp_2"] == pytest.approx(1.2 / 1.1)
    assert sampa2["vs_adamw_1"] == pytest.approx(1.2) and sampa2["speedup_vs_sam_1"] == pytest.approx(2.0 / 1.2)
    assert sampa2["peak_mem_mb_per_rank"] == [100.0, 101.0] and sampa2["peak_mem_mb"] == 101.0
    assert rows[("AdamW", 1)]["vs_adamw_ddp_2"] is None  # 1-process rows are not compared with DDP
    targets = summary["targets"]
    assert targets["SAMPa-0.2 on 2 vs AdamW (DDP) on 2 (target <= 1.05x)"] == pytest.approx(1.2 / 1.1)
    assert targets["SAMPa-0.2 on 1 vs SAM on 1 (target <= 1.05x)"] == pytest.approx(1.03)  # 1.05, 1.025, 1.03
    assert targets["SAM (interval=4) on 1 vs AdamW on 1 (expected about 1.25x)"] == pytest.approx(1.25)
    markdown = bench.to_markdown(summary, argparse.Namespace(hidden=8, layers=1, batch=2, seq=4, precision="fp32",
                                                             steps=2, warmup=1, repeats=3))
    assert "| SAMPa-0.2 | 2 | 1210 | 1.20x | 1.09x | 1.67x | - | 100 / 101 |" in markdown


def test_bench_runs_every_registered_method_with_valid_options():
    """The bench's rows come from the registry: every method on 1 process, every two-role method on 2 processes
    too (role mode), each row's options valid for its method, labels unique per process count, and the rows the
    targets compare present."""
    from sam_hf import SharpnessConfig, registry

    rows = bench.configurations()
    assert rows[0] == ("AdamW", "adamw_torch", "", 1) and ("AdamW (DDP)", "adamw_torch", "", 2) in rows
    for spec in registry.specs():
        assert any(o == spec.name and p == 1 for _, o, _, p in rows), spec.name
        if spec.method.two_roles:
            assert any(o == spec.name and p == 2 for _, o, _, p in rows), spec.name
    for label, optim, optim_args, procs in rows:
        if registry.is_method(optim):
            SharpnessConfig.from_optim_args(optim, optim_args)  # raises on a bad key or value
    assert len({(label, p) for label, _, _, p in rows}) == len(rows)
    for label, procs in [("SAM", 1), ("SAM (interval=4)", 1), ("SAMPa-0.2", 1), ("SAMPa-0.2", 2)]:
        assert (label, procs) in {(r[0], r[3]) for r in rows}, label


def test_one_configuration_end_to_end(tmp_path):
    out = tmp_path / "bench"
    code = bench.main(["--out", str(out), "--only", "AdamW,SAM,SAM (interval=4)", "--steps", "4", "--warmup", "1",
                       "--hidden", "32", "--layers", "1", "--seq", "8", "--batch", "4", "--precision", "bf16"])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert {r["label"] for r in report["rows"]} == {"AdamW", "SAM", "SAM (interval=4)"}
    # a schedule's steps differ by design: its row is the mean step, the others the median
    assert {r["label"]: r["step_statistic"] for r in report["rows"]} == {
        "AdamW": "median", "SAM": "median", "SAM (interval=4)": "mean"}
    markdown = (out / "bench.md").read_text()
    assert "| SAM | 1 |" in markdown and "tokens, bf16;" in markdown
    assert all(r["peak_mem_mb"] > 0 and r["mem_kind"] in ("rss", "gpu") for r in report["results"])
    assert "load average" in markdown


def test_configurations_this_machine_cannot_run_are_skipped():
    cpu_ascent = "rho=0.05,ascent_device=cpu"
    assert not bench.runnable(2, cpu_ascent, 0)[0]  # CPUs only: the same as the plain AsyncSAM row
    assert bench.runnable(2, cpu_ascent, 1)[0]  # one GPU and the CPU: the heterogeneous case
    ok, why = bench.runnable(2, "rho=0.05", 1)
    assert not ok and "needs 2 GPUs" in why
    assert bench.runnable(2, "rho=0.05", 0)[0] and bench.runnable(1, "", 1)[0]
    assert not bench.runnable(2, cpu_ascent, 1, "fp16")[0] and bench.runnable(2, cpu_ascent, 1, "bf16")[0]


def test_a_report_with_nothing_run_says_so():
    assert "No configuration ran" in bench.to_markdown(bench.summarize([]), None)


def test_a_gpu_and_a_cpu_rank_report_the_gpu_memory():
    gpu = {**_r("AsyncSAM (CPU ascent, r=auto)", 2, 1.0, mem=500.0), "mem_kind": "gpu", "ascent_batch_ratio": 0.25}
    cpu = {**_r("AsyncSAM (CPU ascent, r=auto)", 2, 1.0, rank=1, mem=4000.0), "mem_kind": "rss"}
    row = bench.summarize([_r("AdamW", 1, 1.0), _r("SAM", 1, 2.0), gpu, cpu])["rows"][-1]
    assert row["peak_mem_mb"] == 500.0 and row["ascent_batch_ratio"] == 0.25


def test_help_gives_every_default_and_the_labels_only_takes():
    text = " ".join(bench._parser().format_help().split())  # argparse wraps lines
    for option, default in [("--seq", 128), ("--hidden", 256), ("--layers", 4), ("--steps", 12), ("--batch", 16)]:
        assert f"(default: {default})" in text.split(option, 2)[2].split("--", 1)[0], option
    for label in bench.labels():
        assert label in text, label


def test_only_takes_labels_whole_even_with_a_comma():
    assert bench.parse_only("AdamW,AsyncSAM (CPU ascent, r=auto),SAMPa-0.2") == [
        "AdamW", "AsyncSAM (CPU ascent, r=auto)", "SAMPa-0.2"]
    with pytest.raises(ValueError, match="no configuration is labelled 'SAMPa'.*SAMPa-0.2"):
        bench.parse_only("SAMPa")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--only", "nope", "--out", "unused"])
    assert exit_.value.code == 2
