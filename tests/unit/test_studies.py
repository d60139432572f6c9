"""The studies' machinery: label noise (SAMPa §5.4's protocol), the summary maths and the resume logic.

Not the accuracies: no training here, no GLUE data; everything runs in seconds.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import textwrap

import numpy as np
import pytest

from sam_hf.label_noise import corrupt_labels, method_optim, rho_for
from studies import runner
from studies.summary import Summary, cell, grid_table, group, paired_differences, summarize

# ---------------------------------------------------------------- label noise


@pytest.mark.parametrize("n,rate", [(1437, 0.2), (1437, 0.4), (1437, 0.6), (1437, 0.8), (4000, 0.4), (7, 0.5),
                                    (10, 0.25), (100, 0.0), (100, 1.0)])
def test_exactly_round_n_rate_labels_change_and_never_to_the_true_one(n, rate):
    labels = np.random.default_rng(123).integers(0, 10, size=n)
    noisy, changed = corrupt_labels(labels, 10, rate, seed=3)
    assert changed.sum() == round(n * rate)  # exact fraction, Python's round (7 * 0.5 = 3.5 -> 4 (even))
    assert np.array_equal(noisy != labels, changed)  # every chosen label moved to another class, no other did
    assert noisy.min() >= 0 and noisy.max() < 10 and noisy.dtype == labels.dtype
    assert np.array_equal(labels, np.random.default_rng(123).integers(0, 10, size=n))  # input left as it was


def test_binary_noise_flips_the_label():
    labels = np.array([0, 1] * 50)
    noisy, changed = corrupt_labels(labels, 2, 0.4, seed=0)
    assert changed.sum() == 40 and np.array_equal(noisy[changed], 1 - labels[changed])


def test_noise_is_seeded():
    labels = np.arange(1000) % 10
    a, b = corrupt_labels(labels, 10, 0.4, seed=7), corrupt_labels(labels, 10, 0.4, seed=7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    other = corrupt_labels(labels, 10, 0.4, seed=8)
    assert not np.array_equal(a[1], other[1])  # another seed, another corrupted set


def test_the_new_class_is_uniform_over_the_other_classes():
    """Each (true, new) pair of the 9 x 10 off-diagonal ones is equally likely: with n = 90,000 labels all
    corrupted, each count is Binomial(90000, 1/90): mean 1000, std 31.4. A fixed seed makes this deterministic;
    the bound is 5 std (a failure means a biased draw, not bad luck)."""
    labels = np.arange(90_000) % 10
    noisy, _ = corrupt_labels(labels, 10, 1.0, seed=0)
    counts = np.zeros((10, 10), dtype=int)
    np.add.at(counts, (labels, noisy), 1)
    assert np.all(np.diag(counts) == 0)
    off = counts[~np.eye(10, dtype=bool)]
    std = math.sqrt(90_000 * (1 / 90) * (1 - 1 / 90))
    assert np.all(np.abs(off - 1000) < 5 * std), off


@pytest.mark.parametrize("kwargs,match", [({"rate": 1.5}, "rate"), ({"rate": -0.1}, "rate"),
                                          ({"num_classes": 1}, "num_classes"), ({"labels": [0, 10]}, r"\[0, 10\)"),
                                          ({"labels": [0.5, 1.0]}, "class ids")])
def test_bad_noise_arguments_are_errors(kwargs, match):
    args = {"labels": [0, 1, 2], "num_classes": 10, "rate": 0.4, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        corrupt_labels(**args)


def test_digits_test_set_is_untouched_and_train_noise_is_exact():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    from sam_hf.label_noise import digits_splits

    target = load_digits().target
    clean = digits_splits(0.0, seed=1)
    for noise, seed in ((0.4, 1), (0.8, 2)):
        data = digits_splits(noise, seed)
        # the test set: the same images and the same (true) labels whatever the noise and seed
        assert np.array_equal(data.test.y.numpy(), clean.test.y.numpy())
        assert np.array_equal(data.test.x.numpy(), clean.test.x.numpy())
        assert np.array_equal(data.train.x.numpy(), clean.train.x.numpy())
        n = len(data.train)
        assert (n, len(data.test)) == (1437, 360)
        assert data.changed.sum() == round(n * noise)
        assert np.array_equal(data.train.y.numpy() != data.true_train_labels, data.changed)
        assert np.array_equal(data.true_train_labels, clean.train.y.numpy())
    # the clean labels are scikit-learn's own: the split is a permutation of all 1,797 images
    assert sorted(np.concatenate([clean.train.y.numpy(), clean.test.y.numpy()])) == sorted(target)


def test_text_study_corrupts_training_labels_only(tmp_path):
    """SST-2's loader (studies.text_noise) on a made-up GLUE-style folder: dev untouched, train exactly
    round(n * rate) flipped, the same training subset for every seed."""
    pytest.importorskip("datasets")
    from transformers import BertConfig, BertTokenizerFast

    from studies.text_noise import noisy_sst2

    # sentences of 2 to 5 words, so sorting dev by length reorders it
    rows = [{"sentence": "sentence" + " number" * (i % 4) + f" {i}", "label": i % 2, "idx": i} for i in range(60)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps({**r, "label": 1 - r["label"]}) for r in rows[:20]))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sentence", "number"] + [str(i) for i in range(60)]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert tokenizer.unk_token_id not in tokenizer(rows[7]["sentence"])["input_ids"]  # every word is known
    config = BertConfig(vocab_size=70, max_position_embeddings=32)
    train0, dev0, _, changed0 = noisy_sst2(str(tmp_path), 40, 16, 0.0, 1, tokenizer, config)
    train, dev, _, changed = noisy_sst2(str(tmp_path), 40, 16, 0.4, 1, tokenizer, config)
    assert len(train) == 40 and changed.sum() == 16 and changed0.sum() == 0
    # dev: the same sentences with their own labels (sorted by length for cheap evaluation, never relabelled)
    assert sorted(zip(map(tuple, dev["input_ids"]), dev["labels"])) == sorted(
        zip(map(tuple, dev0["input_ids"]), dev0["labels"]))
    texts = {tokenizer.decode(ids, skip_special_tokens=True): y for ids, y in zip(dev["input_ids"], dev["labels"])}
    assert texts == {r["sentence"]: 1 - r["label"] for r in rows[:20]}
    assert train["input_ids"] == train0["input_ids"]  # the same subset, in the same order
    flipped = [a != b for a, b in zip(train["labels"], train0["labels"])]
    assert flipped == changed.tolist()
    train2, _, _, other = noisy_sst2(str(tmp_path), 40, 16, 0.4, 2, tokenizer, config)
    assert not np.array_equal(other, changed) and train2["input_ids"] == train0["input_ids"]


def test_rho_follows_section_5_4():
    assert [rho_for(n) for n in (0.0, 0.2, 0.4, 0.6, 0.8)] == [0.1, 0.1, 0.1, 0.1, 0.01]
    # SAMPa-0.2 gets SAM's rho under label noise (not twice it, as in §5.1)
    assert method_optim("sampa", 0.4)[2] == "rho=0.1,lam=0.2,base=sgd,momentum=0.9"
    assert method_optim("sam", 0.8)[2] == "rho=0.01,base=sgd,momentum=0.9"
    assert method_optim("sampa2rho", 0.8)[2] == "rho=0.02,lam=0.2,base=sgd,momentum=0.9"  # the §5.1 ablation
    assert method_optim("sgd", 0.4)[1:] == ("sgd", "momentum=0.9")


# ---------------------------------------------------------------- summary maths


def test_mean_and_sample_std_match_statistics():
    values = [0.91, 0.87, 0.95, 0.90, 0.89]
    s = summarize(values)
    assert s.n == 5
    assert s.mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert s.std == pytest.approx(statistics.stdev(values), rel=1e-12)  # n - 1 in the denominator
    assert summarize([1.0, 2.0, 3.0, 4.0]).std == pytest.approx(math.sqrt(5 / 3), rel=1e-15)


def test_summary_edge_cases():
    one = summarize([0.5])
    assert (one.mean, one.n) == (0.5, 1) and math.isnan(one.std)
    none = summarize([])
    assert none.n == 0 and math.isnan(none.mean)
    assert summarize([1.0, float("nan"), 3.0, None]) == Summary(2.0, math.sqrt(2.0), 2)  # unmeasured: left out
    assert cell(summarize([0.9, 0.8]), 100) == "85.00 ± 7.07"
    assert cell(one, 100, 1) == "50.0" and cell(none) == "-"


def test_group_paired_differences_and_table():
    rows = [{"method": m, "noise": n, "seed": s, "acc": base + (0.05 if m == "sam" else 0) + 0.01 * s}
            for m in ("sgd", "sam") for n, base in ((0.0, 0.9), (0.4, 0.7)) for s in (1, 2, 3)]
    rows.append({"method": "sam", "noise": 0.4, "seed": 4, "acc": 0.0})  # no sgd partner: not paired
    cells = group(rows, lambda r: (r["method"], r["noise"]), "acc")
    assert cells[("sgd", 0.4)].mean == pytest.approx(0.72) and cells[("sam", 0.4)].n == 4
    gain = paired_differences(rows, "acc", "sam", "sgd")
    assert gain[0.4].n == 3 and gain[0.4].mean == pytest.approx(0.05) and gain[0.4].std == pytest.approx(0, abs=1e-12)
    table = grid_table(rows, ["sgd", "sam"], {"sgd": "SGD", "sam": "SAM"}, "acc", 100,
                       annotate=lambda m, n: " [x]" if m == "sgd" else "")
    assert table.splitlines()[0] == "| noise | SGD | SAM |"
    assert table.splitlines()[2] == "| 0% | 92.00 ± 1.00 [x] | 97.00 ± 1.00 |"


# ---------------------------------------------------------------- resume logic

SETTINGS = {"epochs": 20, "batch": 128}
WRITE_RESULTS = textwrap.dedent("""
    import json, os, sys
    runs, out, fail = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(os.path.join(out, "launched.txt"), "a") as f:
        f.write(" ".join(r["name"] for r in runs) + "\\n")
    for r in runs:
        if r["name"] == fail:
            sys.exit(3)
        path = os.path.join(out, "runs", r["name"] + ".json")
        with open(path, "w") as f:
            json.dump({"method": r["method"], "noise": r["noise"], "seed": r["seed"], "status": "done",
                       "settings": %r, "value": 1.0}, f)
""" % SETTINGS)


def fake_command(out, fail=""):
    def command(chunk):
        runs = [{"name": r.name, "method": r.method, "noise": r.noise, "seed": r.seed} for r in chunk]
        return [sys.executable, "-c", WRITE_RESULTS, json.dumps(runs), str(out), fail]

    return command


def test_grid_is_seed_first_with_one_name_per_run():
    runs = runner.grid(["sgd", "sam"], [0.0, 0.4], [2, 1])
    assert [r.name for r in runs[:4]] == ["sgd-noise00-seed1", "sam-noise00-seed1", "sgd-noise40-seed1",
                                          "sam-noise40-seed1"]
    assert len({r.name for r in runs}) == 8


def test_finished_runs_are_skipped_and_partial_ones_rerun(tmp_path):
    runs = runner.grid(["sgd", "sam"], [0.4], [1, 2])
    done, truncated, unfinished, leftover = runs
    runner.write_result(runner.result_path(tmp_path, done), {"method": "sgd", "noise": 0.4, "seed": 1,
                                                             "settings": SETTINGS, "value": 0.5})
    before = runner.result_path(tmp_path, done).read_text()
    runner.result_path(tmp_path, truncated).write_text('{"method": "sam", "noise": 0.4, "se')  # died mid-write
    runner.result_path(tmp_path, unfinished).write_text(json.dumps(
        {"method": "sgd", "noise": 0.4, "seed": 2, "settings": SETTINGS}))  # no "status": "done"
    runner.result_path(tmp_path, leftover).with_name(leftover.name + ".json.tmp").write_text("{")
    assert runner.pending(runs, tmp_path, SETTINGS) == [truncated, unfinished, leftover]

    status = runner.run_pending(runs, tmp_path, SETTINGS, fake_command(tmp_path), jobs=2, echo=lambda _: None)
    assert status == {r.name: True for r in (truncated, unfinished, leftover)}
    launched = (tmp_path / "launched.txt").read_text().split()
    assert sorted(launched) == sorted(r.name for r in (truncated, unfinished, leftover))  # `done` not rerun
    assert runner.result_path(tmp_path, done).read_text() == before
    assert runner.pending(runs, tmp_path, SETTINGS) == []
    assert not list(tmp_path.glob("runs/*.tmp"))
    # a second invocation launches nothing
    assert runner.run_pending(runs, tmp_path, SETTINGS, fake_command(tmp_path), jobs=2, echo=lambda _: None) == {}


def test_chunks_share_a_process_and_a_failed_run_is_reported_and_rerun_next_time(tmp_path):
    runs = runner.grid(["sgd", "sam", "sampa"], [0.0, 0.4], [1])
    failing = runs[4]  # sam-noise40-seed1: its process exits before writing it and sampa-noise40
    status = runner.run_pending(runs, tmp_path, SETTINGS, fake_command(tmp_path, fail=failing.name), jobs=2,
                                chunk_key=lambda r: (r.seed, r.noise), echo=lambda _: None)
    assert (tmp_path / "launched.txt").read_text().count("\n") == 2  # one process per (seed, noise)
    assert [name for name, ok in status.items() if not ok] == [failing.name, runs[5].name]
    assert runner.pending(runs, tmp_path, SETTINGS) == [failing, runs[5]]
    status = runner.run_pending(runs, tmp_path, SETTINGS, fake_command(tmp_path), jobs=2,
                                chunk_key=lambda r: (r.seed, r.noise), echo=lambda _: None)
    assert status == {failing.name: True, runs[5].name: True}


def test_a_run_finished_with_other_settings_is_an_error(tmp_path):
    run = runner.Run(1, 0.4, "sgd")
    runner.write_result(runner.result_path(tmp_path, run), {"method": "sgd", "noise": 0.4, "seed": 1,
                                                            "settings": {**SETTINGS, "epochs": 40}})
    with pytest.raises(runner.SettingsMismatch, match="epochs: 40 there, 20 now"):
        runner.pending([run], tmp_path, SETTINGS)


def test_a_report_names_the_command_that_runs_the_study():
    from studies.report import study_command

    # a report rewritten with --report_only names the study's own command, its other options kept
    assert study_command("text_noise", ["--jobs", "1", "--report_only", "--seeds", "1,2"]) == \
        "python -m studies.text_noise --jobs 1 --seeds 1,2"
    assert study_command("vision_noise", []) == "python -m studies.vision_noise"


def test_vision_tables_give_each_method_paired_against_sam():
    """The 'Difference from SAM' table holds, per noise rate, the mean ± std over seeds of the per-seed
    differences (not the difference of the means' cells), with the paper's difference of Table 7's means."""
    from studies import vision_noise

    acc = {("sgd", 1): 0.80, ("sgd", 2): 0.82, ("sam", 1): 0.90, ("sam", 2): 0.95,
           ("sampa", 1): 0.91, ("sampa", 2): 0.93}
    results = [{"method": m, "noise": 0.4, "seed": s, "test_accuracy": a, "lambda_max": 1.0, "memorized": 0.1,
                "sec_per_step": 0.1} for (m, s), a in acc.items()]
    text = vision_noise.tables(results, ["sgd", "sam", "sampa"])
    section = text.split("**Difference from SAM (points)**")[1].split("**")[0]
    # per seed: +1 and -2 points; mean -0.5, sample std sqrt(((1.5)^2 + (1.5)^2) / 1) = 2.12; paper 90.01 - 89.78
    assert "| 40% | -0.50 ± 2.12 [+0.23] |" in section


# ---------------------------------------------------------------- SAMPa Tables 4 and 8 (studies/variants.py)


def test_every_variant_row_builds_a_valid_config_with_appendix_b4_settings():
    from sam_hf import SharpnessConfig
    from studies import variants

    for row in variants.ROWS:
        optim, args = variants.optim_of(row.name)
        config = variants.config_of(row.name)
        assert (config is None) == (optim == "sgd"), row.name
        if config is None:
            continue
        assert config == SharpnessConfig.from_optim_args(optim, args)
        if optim in ("saf", "mesa"):  # no ascent, hence no rho
            assert "rho=" not in args
        else:  # SAM's rho at 40% noise (SAMPa §5.4), times the row's factor (B.4; SAMPa doubles it)
            assert math.isclose(config.rho, 0.1 * row.rho_factor), row.name
    rho = {r.name: variants.config_of(r.name).rho for r in variants.ROWS if r.optim not in ("sgd", "saf", "mesa")}
    assert rho["aesam"] == 0.2 and rho["asam"] == rho["sam_on"] == 0.5  # B.4's own rho
    for alone, combo in variants.TABLE8_PAIRS:  # B.4: "rho x 2 for SAMPa ... when incorporated"
        assert math.isclose(rho[combo], 2 * rho[alone]), combo
        assert variants.BY_NAME[combo].optim == "sampa"
    assert variants.config_of("msam_sampa").micro_batches == variants.config_of("msam").micro_batches == 4
    assert variants.config_of("looksam").k == 5 and variants.config_of("esam").beta == 0.5
    for optim, timing_args in variants.TIMING_ARGS.items():  # the timing pass's early trajectory loss is valid
        SharpnessConfig.from_optim_args(optim, timing_args)


def test_two_process_rows_are_their_one_process_configuration_in_role_mode():
    """Table 4's SAMPa-0.2 time is on 2 GPUs (SAMPa Table 11): the 2-process row is the 1-process row with
    parallel=on (role mode), and the paper's time sits on it; Asynchronous SAM runs its ascent on the whole
    batch (r = 1) at SAM's rho; SGD with DDP is only a time reference."""
    import dataclasses

    from studies import variants

    by = variants.BY_NAME
    assert variants.config_of("sampa2rho_2proc") == dataclasses.replace(variants.config_of("sampa2rho"),
                                                                         parallel="on")
    assert by["sampa2rho_2proc"].paper_time == 10.94 and by["sampa2rho"].paper_time is None
    asyncsam = variants.config_of("asyncsam_2proc")
    assert asyncsam.parallel == "on" and asyncsam.ascent_batch_ratio == 1 and math.isclose(asyncsam.rho, 0.1)
    assert {r.name for r in variants.ROWS if r.processes == 2} == {"sgd_ddp", "sampa2rho_2proc", "asyncsam_2proc"}
    assert [r.name for r in variants.ROWS if r.timed_only] == ["sgd_ddp"] and variants.optim_of("sgd_ddp")[0] == "sgd"
    # the timing pass's early trajectory loss is set in this process: it would not reach torchrun's workers
    assert not [r.name for r in variants.ROWS if r.processes > 1 and r.optim in variants.TIMING_ARGS]


def test_a_torchrun_worker_started_in_the_study_knows_its_rows(tmp_path, monkeypatch):
    """torchrun starts `python -m studies.variants --digits_run ...`: main hands it to label_noise's worker
    after registering the rows, so a row that exists only here (asyncsam_2proc) can train."""
    from sam_hf import label_noise
    from studies import variants

    seen = []
    monkeypatch.setattr(label_noise, "METHODS", {k: v for k, v in label_noise.METHODS.items()
                                                 if k not in variants.BY_NAME or k == "sgd"})
    monkeypatch.setattr(label_noise, "digits_worker",
                        lambda argv: seen.append((argv, "asyncsam_2proc" in label_noise.METHODS)) or 0)
    argv = ["--digits_run", '{"method": "asyncsam_2proc"}', "--output_dir", str(tmp_path)]
    assert variants.main(argv) == 0 and seen == [(argv, True)]


def test_two_process_rows_need_their_ddp_reference_and_the_reference_is_not_trained(capsys):
    from studies import variants

    with pytest.raises(SystemExit):
        variants.parse_args(["--methods", "sgd,sam,sampa2rho_2proc"])
    assert "(sampa2rho_2proc) are timed against SGD with DDP on 2 processes: add sgd_ddp" in capsys.readouterr().err
    args = variants.parse_args(["--methods", "sgd,sgd_ddp,sampa2rho_2proc"])
    assert args.rows == ["sgd", "sgd_ddp", "sampa2rho_2proc"] and args.methods == ["sgd", "sampa2rho_2proc"]


def test_timing_pass_runs_two_process_rows_under_torchrun_and_pairs_them_with_ddp(tmp_path, monkeypatch):
    """1-process rows train here, 2-process rows under torchrun started in this module (so its workers know
    the rows); ratios to SGD and, for the 2-process rows, to SGD with DDP are paired within each round."""
    from sam_hf import label_noise
    from studies import variants

    # round 2 on a machine twice as slow: every time doubles, no ratio moves
    times = {"sgd": 0.010, "sam": 0.020, "sgd_ddp": 0.011, "sampa2rho_2proc": 0.0121}
    calls = []

    def here(run, output_dir, distributed=False):
        calls.append((run.method, 1, None))
        return {"sec_per_step_mean": times[run.method] * (1 + sum(c[0] == run.method for c in calls) // 2)}

    def torchrun(run, output_dir, processes=2, module="sam_hf.label_noise", timeout=600):
        calls.append((run.method, processes, module))
        return {"sec_per_step_mean": times[run.method] * (1 + sum(c[0] == run.method for c in calls) // 2)}

    monkeypatch.setattr(label_noise, "train_digits", here)
    monkeypatch.setattr(label_noise, "train_digits_torchrun", torchrun)
    args = variants.parse_args(["--out", str(tmp_path), "--methods", "sgd,sam,sgd_ddp,sampa2rho_2proc",
                                "--timing_rounds", "2"])
    timing = variants.timing_pass(args)
    assert sorted(set(calls)) == [("sam", 1, None), ("sampa2rho_2proc", 2, "studies.variants"),
                                  ("sgd", 1, None), ("sgd_ddp", 2, "studies.variants")]
    assert len(calls) == 8 and [c[0] for c in calls[4:]] == ["sam", "sgd_ddp", "sampa2rho_2proc", "sgd"]  # rotated
    assert [r["sgd"] for r in timing["rounds"]] == [0.010, 0.020]
    assert math.isclose(timing["ratios"]["sampa2rho_2proc"]["median"], 1.21)
    assert math.isclose(timing["ratios_to_ddp"]["sampa2rho_2proc"]["median"], 1.1)
    assert timing["ratios_to_ddp"]["sgd_ddp"]["max"] == 1.0 and set(timing["ratios_to_ddp"]) == {
        "sgd_ddp", "sampa2rho_2proc"}


def test_a_timing_pass_without_a_requested_row_is_run_again_whole(tmp_path, monkeypatch):
    from studies import variants

    runner.write_result(tmp_path / "timing.json", {"rounds": [{"sgd": 0.1, "sam": 0.2}], "epochs": 2,
                                                   "ratios": variants.paired_ratios([{"sgd": 0.1, "sam": 0.2}])})
    same = variants.parse_args(["--out", str(tmp_path), "--methods", "sgd,sam", "--timing_rounds", "1",
                                "--timing_epochs", "2"])
    assert variants.timing_mismatch(tmp_path, same) == ""

    def why(*more):
        return variants.timing_mismatch(tmp_path, variants.parse_args(["--out", str(tmp_path), *more]))

    assert why("--methods", "sgd,sam,sam_k2", "--timing_rounds", "1") == "timing.json has no sam_k2"
    assert why("--methods", "sgd,sam", "--timing_rounds", "1", "--timing_epochs", "1") == \
        "timing.json has 1 rounds of 2 epochs, asked: 1 of 1"
    assert why("--methods", "sgd,sam") == "timing.json has 1 rounds of 2 epochs, asked: 5 of 4"  # the defaults
    passes = []
    monkeypatch.setattr(variants, "timing_pass", lambda args: passes.append(args.rows) or {"rounds": [], "epochs": 2,
                                                                                           "ratios": {}})
    assert variants.main(["--out", str(tmp_path), "--methods", "sgd,sam,sam_k2", "--timing", "only",
                          "--timing_rounds", "1"]) == 0
    assert passes == [["sgd", "sam", "sam_k2"]]


def test_the_two_process_timing_needs_two_cores(tmp_path, monkeypatch, capsys):
    from sam_hf.distributed import placement
    from studies import variants

    monkeypatch.setattr(placement, "cpu_cores", lambda: 1)
    monkeypatch.setattr(variants, "timing_pass", lambda args: pytest.fail("refused before timing"))
    assert variants.main(["--out", str(tmp_path), "--methods", "sgd,sgd_ddp,asyncsam_2proc"]) == 2
    assert "sgd_ddp, asyncsam_2proc needs 2 CPU cores, this machine has 1" in capsys.readouterr().err


def test_a_row_may_not_redefine_a_label_noise_method():
    from sam_hf import label_noise
    from studies import variants

    variants.register()
    saved = label_noise.METHODS["sam"]
    label_noise.METHODS["sam"] = ("SAM", "sam", "interval=3")
    try:
        with pytest.raises(ValueError, match="row 'sam'"):
            variants.register()
    finally:
        label_noise.METHODS["sam"] = saved


def test_digits_give_saf_its_example_ids():
    """SAF's per-example memory reads the example's index from the batch; the other methods get no such key."""
    import torch

    from sam_hf.label_noise import DigitsDataset

    data = DigitsDataset(torch.zeros(5, 1, 8, 8), torch.arange(5))
    assert set(data[3]) == {"pixel_values", "labels"}
    data.id_column = "idx"
    assert [data[i]["idx"] for i in range(5)] == list(range(5))


def test_timing_ratios_are_paired_within_a_round_and_the_median_over_rounds():
    from studies.variants import paired_ratios

    # round 2 runs on a loaded machine: every time doubles; round 3 has one outlier for sam
    rounds = [{"sgd": 0.10, "sam": 0.20, "sampa": 0.15}, {"sgd": 0.20, "sam": 0.40, "sampa": 0.30},
              {"sgd": 0.10, "sam": 0.50, "sampa": 0.15}]
    r = paired_ratios(rounds)
    assert r["sgd"] == {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": 3}
    assert math.isclose(r["sam"]["median"], 2.0) and math.isclose(r["sam"]["max"], 5.0)
    assert all(math.isclose(x, 1.5) for x in (r["sampa"]["median"], r["sampa"]["min"], r["sampa"]["max"]))
    # a configuration missing from a round counts over the rounds it has
    assert paired_ratios([{"sgd": 0.1, "sam": 0.3}, {"sgd": 0.1}])["sam"]["rounds"] == 1


def fake_variant_results(out, seeds, methods):
    from studies import variants

    args = variants.parse_args(["--out", str(out)])
    settings = variants.settings_of(args)
    for seed in seeds:
        for i, m in enumerate(methods):
            run = runner.Run(seed, variants.NOISE, m)
            runner.write_result(runner.result_path(out, run), {
                "method": m, "noise": variants.NOISE, "seed": seed, "test_accuracy": 0.8 + 0.01 * i + 0.001 * seed,
                "lambda_max": 10.0 - i, "memorized": 0.1, "train_seconds": 1.0, "sharpness_seconds": 1.0,
                "processes": variants.BY_NAME[m].processes, "settings": settings})


def test_variants_resume_runs_nothing_finished_and_reports_both_tables(tmp_path, monkeypatch):
    from studies import variants

    methods = ["sgd", "sam", "msam", "msam_sampa"]
    fake_variant_results(tmp_path, [1, 2], methods)
    runner.write_result(tmp_path / "timing.json", {"rounds": [{"sgd": 0.1, "sam": 0.2, "msam": 0.21,
                                                               "msam_sampa": 0.12}], "epochs": 2,
                                                   "ratios": variants.paired_ratios([{
                                                       "sgd": 0.1, "sam": 0.2, "msam": 0.21, "msam_sampa": 0.12}])})
    monkeypatch.setattr(variants, "timing_pass", lambda args: pytest.fail("timing.json holds the timing pass"))
    monkeypatch.setattr(variants, "command_for", lambda args: lambda chunk: pytest.fail("every run is finished"))
    assert variants.main(["--out", str(tmp_path), "--seeds", "1,2", "--methods", ",".join(methods),
                          "--timing_rounds", "1", "--timing_epochs", "2"]) == 0
    text = (tmp_path / "variants.md").read_text()
    # mSAM + SAMPa minus mSAM, paired by seed: +1 point on both seeds (std 0); the paper's 94.28 -> 94.71
    assert "| mSAM (m=4) | 82.15 ± 0.07 | 83.15 ± 0.07 | 1.00 ± 0.00 | 94.28 → 94.71 (+0.43) |" in text
    assert "| SAM | 81.15 ± 0.07 | 1.00 ± 0.00 | 94.26 |" in text and "2.00 (2.00–2.00)" in text
    # lambda_max 10, 9, 8 for sgd, sam, msam on both seeds: mSAM Theorem 3.2's ordering holds
    assert "holds in 2 of 2 seeds (seed 1: 10 / 9 / 8; seed 2: 10 / 9 / 8)" in text
    assert (tmp_path / "figure2.png").stat().st_size > 0 and (tmp_path / "variants.csv").exists()


def test_variants_report_the_two_process_rows_against_sgd_and_ddp(tmp_path):
    """The DDP reference is a timed row without accuracy; a 2-process row has both ratios, the paper's 2-GPU
    time (Table 4, SAMPa Table 11) and the paired gain of its runs."""
    import csv

    from studies import variants

    methods = ["sgd", "sampa2rho_2proc"]
    fake_variant_results(tmp_path, [1, 2], methods)
    rounds = [{"sgd": 0.10, "sgd_ddp": 0.11, "sampa2rho_2proc": 0.121}]
    runner.write_result(tmp_path / "timing.json", {"rounds": rounds, "epochs": 2, **variants.timing_ratios(rounds)})
    assert variants.main(["--out", str(tmp_path), "--seeds", "1,2", "--methods", "sgd,sgd_ddp,sampa2rho_2proc",
                          "--report_only"]) == 0
    text = (tmp_path / "variants.md").read_text()
    assert ("| SGD, DDP on 2 processes | (time reference) |  | - | - | - | 1.10 (1.10–1.10) | - | "
            "1.00 (1.00–1.00) | - |") in text
    assert ("| SAMPa-0.2 (2ρ), 2 processes | 81.15 ± 0.07 | 1.00 ± 0.00 | 94.62 | 9.0 ± 0.0 | 10.0 ± 0.0 | "
            "1.21 (1.21–1.21) | - | 1.10 (1.10–1.10) | 10.94 s (0.58× SAM) |") in text
    rows = list(csv.DictReader((tmp_path / "variants.csv").read_text().splitlines()))
    assert [(r["method"], r["processes"]) for r in rows if r["seed"] == "1"] == [("sgd", "1"), ("sampa2rho_2proc", "2")]
    assert [float(r["time_ratio_to_sgd_ddp"] or "nan") for r in rows if r["seed"] == "1"] == pytest.approx(
        [math.nan, 1.1], nan_ok=True)
