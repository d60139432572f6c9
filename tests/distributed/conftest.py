"""Every test in tests/distributed is `slow` (see pytest.ini): it launches several processes, or shares a module with
tests that do."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    for item in items:  # a conftest's hook sees the whole session's items: mark this folder's only
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def five_step_runs(tmp_path_factory):
    """Three torchrun launches of tests.helpers.dist_train shared by test_distributed.py and
    test_rules_distributed.py: a launch costs seconds of start-up per process, a tiny case milliseconds.

    `two/` (2 processes) and `four/` (4 processes, a 2 x 2 mesh) train every 5-step case of both modules' tables,
    saving at step 2; `resumed/` (2 processes, `--resume last`) resumes the cases of both modules' RESUMED_ON_TWO
    from a checkpoint-2 put where each case keeps its own: one written by `two/` or `four/`, or by one process here
    (`one/`). Returns the folder holding the four."""
    import shutil

    from tests.distributed import test_distributed as dist
    from tests.distributed import test_rules_distributed as rules
    from tests.helpers.dist_train import train

    out = tmp_path_factory.mktemp("five_steps")

    def launch(folder, nproc, cases, *args):
        specs = [f"{name}:{optim}:{optim_args}:{batch}" for name, (optim, optim_args, batch, *_) in cases.items()]
        proc = dist.launch(out / folder, nproc, "--steps", "5", *args, "--cases", *specs, timeout=600)
        assert proc.returncode == 0, f"{folder}: " + proc.stderr[-6000:]

    launch("two", 2, {**dist.WORLD_RESUME, **rules.TWO}, "--save_steps", "2")
    launch("four", 4, {**dist.MESH, **rules.FOUR}, "--save_steps", "2")
    resumed = {}
    for name, (source, optim, optim_args, batch, one) in {**dist.RESUMED_ON_TWO, **rules.RESUMED_ON_TWO}.items():
        if source == "one":  # one: (optim_args, batch) of the same method on one process
            train(str(out / "one" / name), optim, one[0], batch=one[1], steps=2, save_steps=2)
        checkpoint = out / source / source_name(name) / "run" / "checkpoint-2"
        shutil.copytree(checkpoint, out / "resumed" / name / "run" / "checkpoint-2")
        resumed[name] = (optim, optim_args, batch)
    launch("resumed", 2, resumed, "--resume", "last")
    return out


def source_name(name: str) -> str:
    """A case resumed on the layout it was saved on is named NAME_again in resumed/ (NAME in two/)."""
    return name.removesuffix("_again")
