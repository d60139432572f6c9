"""`sam-hf launch` / `python -m sam_hf.launch` run an unmodified Hugging Face-style script with our optimizer
names, whatever Trainer subclass it builds, also under torchrun and accelerate launch.

The script, tests/helpers/hf_example.py, imports nothing from sam_hf. All runs start at once in a
module-scoped fixture (each is a fresh Python that imports transformers: seconds of start-up), and
each test checks its own run.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from sam_hf import launch
from tests.helpers.processes import ROOT, tool as _tool

SCRIPT = ROOT / "tests" / "helpers" / "hf_example.py"  # run by path, as a user runs their script
STEPS = 3
COMMON = ["--max_steps", str(STEPS), "--per_device_train_batch_size", "8", "--learning_rate", "0.01",
          "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no",
          "--logging_steps", "1", "--seed", "0"]
PY = sys.executable


SAM_HF = _tool("sam-hf")
TORCHRUN = _tool("torchrun")
ACCELERATE = _tool("accelerate")

# Subprocess runs, name: (command prefix, script args, Trainer class the script builds). Each is a fresh Python
# importing transformers (6-10 CPU-seconds), so only what needs its own process runs as one: the console script,
# torchrun, accelerate launch (two interpreters, ~10 CPU-seconds), the plain-vs-launched equality and the argparse
# failure.
RUNS = {
    "msam": ([SAM_HF, "launch", str(SCRIPT)], ["--optim", "msam", "--optim_args", "micro_batches=4",
                                                 "--trainer", "custom"], "CustomTrainer"),
    "asyncsam": ([TORCHRUN, "--standalone", "--nproc_per_node", "1", "-m", "sam_hf.launch", str(SCRIPT)],
                 ["--optim", "asyncsam", "--optim_args", "ascent_batch_ratio=0.5"], "Trainer"),
    # accelerate's --cpu launcher is single-process (multi-CPU needs mpirun); --multi_gpu goes through
    # torchrun. ascent_device=cpu: the launcher puts rank 1 on the CPU and adds --ddp_backend gloo itself.
    "accelerate": ([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sam_hf.launch", str(SCRIPT)],
                   ["--optim", "asyncsam", "--optim_args", "rho=0.1,ascent_device=cpu"], "Trainer"),
    "torchrun2": ([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "sam_hf.launch", str(SCRIPT)],
                  ["--optim", "sampa", "--optim_args", "rho=0.1,lam=0.2", "--ddp_backend", "gloo"], "Trainer"),
    # a plain optimizer through the launcher must be exactly a plain run
    "adamw_launch": ([PY, "-m", "sam_hf.launch", str(SCRIPT)], ["--optim", "adamw_torch"], "Trainer"),
    "adamw_plain": ([PY, str(SCRIPT)], ["--optim", "adamw_torch"], "Trainer"),
    # without the launcher, our names are not argparse choices
    "sam_plain": ([PY, str(SCRIPT)], ["--optim", "sam"], None),
}
# In-process runs through `sam_hf.launch.main` (the same code `python -m sam_hf.launch` runs after its imports).
IN_PROCESS = {
    "sam": (["-m", "tests.helpers.hf_example"], ["--optim", "sam", "--optim_args", "rho=0.1"], "Trainer"),
    "sampa": ([str(SCRIPT)], ["--optim", "sampa", "--optim_args", "rho=0.1,lam=0.2", "--trainer", "seq2seq"],
              "Seq2SeqTrainer"),
}
SUBPROCESS_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                  "OMP_NUM_THREADS": "1", "WANDB_DISABLED": "true", "ACCELERATE_DISABLE_RICH": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every subprocess run, do the in-process runs meanwhile, then collect: name -> (rc, output, out_dir)."""
    base = tmp_path_factory.mktemp("launch")
    env = {**os.environ, **SUBPROCESS_ENV}
    procs = {}
    for name, (prefix, script_args, _) in RUNS.items():
        if None in prefix:
            continue
        out = base / name
        cmd = [*prefix, "--output_dir", str(out), *COMMON, *script_args]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True), out)
    results = {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", list(sys.argv))
            mp.setattr(sys, "path", list(sys.path))  # launch.main puts the script's folder first
            for name, (target, script_args, _) in IN_PROCESS.items():
                out = base / name
                rc = launch.main([*target, "--output_dir", str(out), *COMMON, *script_args])
                results[name] = (rc, "", out)
    finally:
        for name, (proc, out) in procs.items():
            try:
                stdout, _ = proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            results[name] = (proc.returncode, stdout, out)
    return results


def get(runs, name):
    if name not in runs:
        pytest.skip(f"{name}: its launcher is not installed")
    return runs[name]


def info_of(runs, name):
    rc, stdout, out = get(runs, name)
    assert rc == 0, stdout[-4000:]
    return json.loads((out / "run_info.json").read_text()), out


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_script_imports_nothing_from_sam_hf():
    assert "sam_hf" not in SCRIPT.read_text()


@pytest.mark.parametrize("name", ["sam", "msam", "sampa", "asyncsam", "accelerate", "torchrun2"])
def test_launched_script_runs_the_method(runs, name):
    info, _ = info_of(runs, name)
    _, script_args, base = (IN_PROCESS if name in IN_PROCESS else RUNS)[name]
    method = script_args[1]
    assert info["name"] == "__main__" and info["argv0"].endswith("hf_example.py")
    assert info["optim"] == method
    assert "SharpnessMixin" in info["mro"] and base in info["mro"]
    assert info["optimizer"].startswith(f"SharpnessOptimizer({method}")
    logged = [h for h in info["log_history"] if "loss" in h]
    assert len(logged) == STEPS and all("sam/perturbed_loss" in h for h in logged)


def test_seq2seq_keeps_its_own_arguments(runs):
    info, _ = info_of(runs, "sampa")
    assert info["trainer_class"] == "SharpnessSeq2SeqTrainer" and info["args_class"] == "Seq2SeqTrainingArguments"


def test_script_subclass_compute_loss_is_used(runs):
    """The script's own Trainer subclass keeps its overrides: every mSAM pass goes through its compute_loss
    (4 micro-batches x (clean + perturbed) per step), plus the two forward passes that tell, once, whether the
    loss divides by num_items_in_batch (the slices' units)."""
    info, _ = info_of(runs, "msam")
    assert info["trainer_class"] == "SharpnessCustomTrainer"
    assert info["loss_calls"] == STEPS * 4 * 2 + 2


def test_plain_trainer_becomes_sharpness_trainer(runs):
    info, _ = info_of(runs, "sam")
    assert info["mro"] == ["SharpnessTrainer", "SharpnessMixin", "Trainer", "object"]


@pytest.mark.parametrize("name", ["torchrun2", "accelerate"])
def test_two_launched_processes_split_the_passes(runs, name):
    """Under a 2-process launcher the unmodified script runs role-parallel: each step logs its exchange."""
    rc, stdout, _ = get(runs, name)
    assert rc == 0, stdout[-4000:]
    assert stdout.count("'sam/exchange_seconds'") >= STEPS - 1, stdout[-4000:]


def test_launcher_places_the_cpu_ascent_rank(runs):
    rc, stdout, _ = get(runs, "accelerate")
    assert rc == 0, stdout[-4000:]
    # both ranks on gloo (added by the launcher); the launcher sent rank 1, and only rank 1, to the CPU (these
    # runs pass --use_cpu anyway, so the placement shows in the environment variable it sets)
    assert "[rank 1] device=cpu ddp_backend=gloo ACCELERATE_USE_CPU=true" in stdout, stdout[-4000:]
    assert "[rank 0] device=cpu ddp_backend=gloo ACCELERATE_USE_CPU=None" in stdout, stdout[-4000:]


def test_torchrun_one_process(runs):
    info, _ = info_of(runs, "asyncsam")
    assert info["world_size"] == 1


def test_adamw_through_the_launcher_equals_a_plain_run(runs):
    launched, out_a = info_of(runs, "adamw_launch")
    plain, out_b = info_of(runs, "adamw_plain")
    assert launched["mro"] == plain["mro"] == ["Trainer", "object"]
    a, b = final_weights(out_a), final_weights(out_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in launched["log_history"] if "loss" in h] == \
        [h["loss"] for h in plain["log_history"] if "loss" in h]


def test_without_the_launcher_our_names_are_rejected(runs):
    rc, stdout, _ = get(runs, "sam_plain")
    assert rc == 2, stdout[-3000:]
    assert "argument --optim: invalid choice: 'sam'" in stdout


def test_usage_errors(tmp_path, capsys):
    assert launch.main([]) == 2
    assert launch.main(["--help"]) == 0
    assert launch.main([str(tmp_path / "missing.py")]) == 2
    assert "no such script" in capsys.readouterr().err
    assert launch.main(["-m"]) == 2


def test_launch_in_process_sets_argv_and_main(tmp_path, monkeypatch):
    """The script runs as __main__, with its own sys.argv and its directory on sys.path."""
    script = tmp_path / "probe.py"
    (tmp_path / "probe_helper.py").write_text("VALUE = 7\n")
    record = tmp_path / "record.json"
    script.write_text(
        "import json, sys\n"
        "from transformers.training_args import OptimizerNames\n"
        "import probe_helper\n"
        f"json.dump({{'name': __name__, 'argv': sys.argv, 'helper': probe_helper.VALUE,\n"
        f"           'sampa': 'sampa' in [m.value for m in OptimizerNames]}}, open({str(record)!r}, 'w'))\n")
    monkeypatch.setattr(sys, "argv", ["sam-hf"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert launch.main([str(script), "--optim", "sampa", "x y"]) == 0
    got = json.loads(record.read_text())
    assert got == {"name": "__main__", "argv": [str(script), "--optim", "sampa", "x y"], "helper": 7, "sampa": True}


def test_launch_module_from_the_working_directory(tmp_path, monkeypatch):
    """`sam-hf launch -m mod` finds `mod` in the working directory, as `python -m mod` does (a console script
    starts without the working directory on sys.path)."""
    record = tmp_path / "record.json"
    (tmp_path / "cwd_module.py").write_text(
        "import json, sys\n"
        f"json.dump({{'name': __name__, 'argv': sys.argv[1:]}}, open({str(record)!r}, 'w'))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sam-hf"])
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())])
    monkeypatch.delitem(sys.modules, "cwd_module", raising=False)
    assert launch.main(["-m", "cwd_module", "--optim", "msam"]) == 0
    assert json.loads(record.read_text()) == {"name": "__main__", "argv": ["--optim", "msam"]}


@pytest.mark.parametrize("after,flag", [(["--sharpness_every", "10"], "--sharpness_every"),
                                        (["--sharpness-samples=64"], "--sharpness_samples")])
def test_launcher_options_after_the_script_are_refused(tmp_path, capsys, after, flag):
    """transformers would report them as the script's unused arguments; the launcher says where they go."""
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('the script must not start')\n")
    assert launch.main([str(script), "--output_dir", "x", *after]) == 2
    err = capsys.readouterr().err
    assert "launcher options go before the script" in err and f"sam-hf launch {flag} N {script}" in err


@pytest.mark.parametrize("optim,optim_args,words", [
    ("sampa", "rho=-1", ["rho", "-1"]),
    ("sam", "rho=0.05,lam=0.2", ["lam", "sampa"]),  # a key of another method: named with the methods that take it
    ("sampa", "rho=0.05 lam=0.2", ["commas", "rho=0.05,lam=0.2"]),
])
def test_bad_optim_args_are_refused_before_the_script_starts(tmp_path, capsys, optim, optim_args, words):
    """The launcher reads --optim/--optim_args itself: a bad value fails in a second, not after the script has
    loaded its data and model."""
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('the script must not start')\n")
    assert launch.main([str(script), "--output_dir", "x", "--optim", optim, "--optim_args", optim_args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sam-hf launch: optim_args") and all(w in err for w in words), err
