"""FSDP2: every method on sharded parameters (`fully_shard`, DTensor) equals one unsharded process.

The sharded runs are 2 CPU processes over gloo (tests/helpers/fsdp_train.py, one torchrun launch for every case):
the same DTensor parameters accelerate's FSDP2 plugin builds on GPUs, driven by the methods directly in a plain
training loop with Trainer's loss normalisation. Each is compared with the same method on the unsharded model in
this process, on the same global batch. accelerate enables FSDP on accelerators only, so the Trainer-level test
runs on CUDA machines (tests/helpers/fsdp_trainer.py); its CPU variant turns accelerate's FSDP2 on by hand.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sam_hf import registry
from sam_hf.config import SharpnessConfig, SharpnessConfigError
from sam_hf.distributed import dtensor
from sam_hf.distributed.layouts import FSDP2, FSDP2Roles, trainer_sharding, wants_roles
from sam_hf.distributed.plan import ParallelPlan
from tests.helpers import fsdp_train, processes

STEPS = 6


def launch(module, nproc, *args, timeout=240):
    cmd = processes.torchrun(nproc, "-m", f"tests.helpers.{module}", *args)
    return processes.run(cmd, timeout=timeout)


TRAINER_CASES = {  # name: (optim, optim_args, equal to one process?) - see below for mSAM and Asynchronous SAM
    "sam": ("sam", "rho=0.1", True),
    "asam": ("sam", "rho=0.5,adaptive=true", True),
    "sampa": ("sampa", "rho=0.1,lam=0.3", True),
    # a parameter on the root module, evaluated before the first step (FSDP2 leaves the root unsharded after it)
    "sampa_eval": ("sampa", "rho=0.1,lam=0.3", True),
    # the output layer in accelerate's ignored_modules: its parameters stay plain tensors, averaged by sam_hf
    "sam_ignored": ("sam", "rho=0.1", True),
    "sampa_ignored": ("sampa", "rho=0.1,lam=0.3", True),
    # accelerate deals the global batch out as consecutive per-rank batches, and under FSDP2 mSAM's micro-batch j
    # (and Asynchronous SAM's ascent batch) is every rank's j-th slice: the same rule on a different partition
    # of the batch than one process's consecutive ranges (exactness: the loop tests above)
    "msam": ("msam", "rho=0.1,micro_batches=2", False),
    "asyncsam": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", False),
}
TRAINER_RESUME = ("sampa", "asyncsam")
# role mode on 4 CPU processes (2 roles x 2 ranks, per-device batch 4): the global batch of 8 is the one-process run's
ROLE_TRAINER_CASES = {
    "sampa_roles": ("sampa", "rho=0.1,lam=0.3,parallel=on", True),
    "asyncsam_roles": ("asyncsam", "rho=0.1,parallel=on", True),
    # a parameter on the root module, evaluated before the first step: the optimizer keeps the shards
    "sampa_roles_eval": ("sampa", "rho=0.1,lam=0.3,parallel=on", True),
    # the plugin's activation checkpointing: applied once, before each role is sharded
    "sampa_roles_ac": ("sampa", "rho=0.1,lam=0.3,parallel=on", True),
}
ROLE_TRAINER_RESUME = ("sampa_roles", "asyncsam_roles")


def trainer_cases(cases=TRAINER_CASES) -> list[str]:
    return [f"{n}:{o}:{a}" for n, (o, a, _) in cases.items()]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """One launch: the loop cases, the checks, and the Trainer cases."""
    out = tmp_path_factory.mktemp("fsdp")
    trainer = ["--trainer_cases", *trainer_cases(), "--trainer_resume", *TRAINER_RESUME]
    proc = launch("fsdp_train", 2, "--out_dir", str(out), "--steps", str(STEPS), "--checks", "--resume_check",
                  *trainer)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


def _result(out: Path, name: str, suffix: str = ".pt"):
    errors = sorted(out.glob(f"{name}.rank*.error"))
    assert not errors, f"{name} failed on the sharded ranks:\n" + errors[0].read_text()[-4000:]
    return torch.load(out / f"{name}{suffix}")


@pytest.mark.parametrize("name", list(fsdp_train.CASES))
def test_sharded_two_processes_equal_one_unsharded_process(sharded_runs, name):
    one, _ = fsdp_train.train(name, STEPS)
    two = _result(sharded_runs, name)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    # the method matters at this scale: the base optimizer alone ends elsewhere
    base = fsdp_train.train_base_only(name, STEPS)
    assert max(float((base[k] - one[k]).abs().max()) for k in one) > 1e-3


@pytest.mark.parametrize("name", list(fsdp_train.CASES))
def test_method_memory_per_rank_falls_with_the_shard_count(sharded_runs, name):
    _, one = fsdp_train.train(name, 1)  # after one step every method holds its state
    _result(sharded_runs, name)
    ranks = json.loads((sharded_runs / f"{name}.mem.json").read_text())
    for kind in ("backup", "state"):
        per_rank = [r[kind] for r in ranks]
        assert sum(per_rank) == one[kind], (kind, per_rank, one[kind])  # each rank holds its shard, nothing more
        if one[kind]:
            # the rows (9, 5, 3, LayerNorm 9) split unevenly over 2 ranks: at most one row more than half
            assert max(per_rank) <= 0.6 * one[kind], (kind, per_rank, one[kind])


@pytest.mark.parametrize("name", [n for n in fsdp_train.CASES if n.endswith("_lora")])
def test_lora_under_fsdp2_moves_and_keeps_only_the_adapters(sharded_runs, name):
    """The frozen base weights are sharded too, but never perturbed, backed up or stepped."""
    start = fsdp_train.with_lora(fsdp_train.MLP()).state_dict()
    trained = _result(sharded_runs, name)
    adapters = [k for k in start if "lora_" in k]
    assert adapters and all(not torch.equal(trained[k], start[k]) for k in adapters)
    for key in set(start) - set(adapters):
        assert torch.equal(trained[key], start[key]), key
    ranks = json.loads((sharded_runs / f"{name}.mem.json").read_text())
    adapter_bytes = sum(v.numel() * v.element_size() for k, v in start.items() if "lora_" in k)
    assert sum(r["backup"] for r in ranks) == adapter_bytes  # a backup of the adapters' shards, nothing else


@pytest.mark.parametrize("name", fsdp_train.STATEFUL)
def test_resume_from_a_sharded_checkpoint_equals_never_stopping(sharded_runs, name):
    never_stopped = _result(sharded_runs, name)
    resumed = _result(sharded_runs, name, ".resumed.pt")
    for key in never_stopped:
        torch.testing.assert_close(resumed[key], never_stopped[key], atol=0, rtol=0)
    # one state file for every rank (the held batch gathered from the data shards), the shards through DCP
    assert (sharded_runs / f"ckpt_{name}" / "sam_hf_state.pt").exists()
    assert not list((sharded_runs / f"ckpt_{name}").glob("sam_hf_state.rank*.pt"))
    torch.load(sharded_runs / f"ckpt_{name}" / "sam_hf_state.pt", weights_only=True)  # plain types: no allow-list


@pytest.fixture(scope="module")
def role_runs(tmp_path_factory):
    """Role mode on 4 processes: a 2 x 2 mesh, each role sharded over its own 2 ranks."""
    out = tmp_path_factory.mktemp("fsdp_roles")
    proc = launch("fsdp_train", 4, "--out_dir", str(out), "--steps", str(STEPS), "--cases", "--role_cases",
                  *fsdp_train.ROLE_CASES, "--resume_check", "--trainer_cases", *trainer_cases(ROLE_TRAINER_CASES),
                  "--trainer_resume", *ROLE_TRAINER_RESUME)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.mark.parametrize("name", list(fsdp_train.ROLE_CASES))
def test_role_mode_with_each_role_sharded_equals_one_unsharded_process(role_runs, name):
    """SAMPa and Asynchronous SAM on 2 x 2 ranks, the two gradients exchanged shard for shard, against the method
    in one process on the global batch; resume from a sharded checkpoint is exact."""
    one, _ = fsdp_train.train(name, STEPS, world=2)  # world: the role's 2 ranks (their shares of the batch)
    sharded = _result(role_runs, name)
    for key in one:
        torch.testing.assert_close(sharded[key], one[key], atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    base = fsdp_train.train_base_only(name, STEPS)
    assert max(float((base[k] - one[k]).abs().max()) for k in one) > 1e-3
    resumed = _result(role_runs, name, ".resumed.pt")
    for key in sharded:
        torch.testing.assert_close(resumed[key], sharded[key], atol=0, rtol=0)


@pytest.mark.parametrize("name", list(fsdp_train.ROLE_CASES))
def test_role_mode_memory_per_rank_is_one_shard(role_runs, name):
    """Each role's k ranks hold the method's backup and state one shard each (the received gradient included)."""
    _, one = fsdp_train.train(name, 1, world=2)
    _result(role_runs, name)
    ranks = json.loads((role_runs / f"{name}.mem.json").read_text())
    for role in (0, 1):
        mine = sorted((r for r in ranks if r["role"] == role), key=lambda r: r["dp"])
        for kind in ("backup", "state"):
            assert sum(r[kind] for r in mine) == one[kind], (role, kind, mine, one)
            assert max(r[kind] for r in mine) <= 0.6 * one[kind], (role, kind, mine, one)
    assert [r[k] for r in ranks if r["role"] == 0 for k in ("backup", "state")] == \
        [r[k] for r in ranks if r["role"] == 1 for k in ("backup", "state")]  # rank (0, i) and (1, i): one shard


def test_role_mode_refuses_a_model_sharded_over_both_roles(role_runs):
    message = json.loads((role_runs / "role_layout.json").read_text())["all_ranks_mesh"]
    assert "sharded over ranks [0, 1, 2, 3]" in message and "role_mesh" in message and "parallel=off" in message


def test_norms_and_checks_are_one_collective_over_the_shards(sharded_runs):
    checks = json.loads((sharded_runs / "checks.json").read_text())
    for rank in checks["ranks"]:
        assert rank["params"] == 8 and rank["is_fsdp2"] == [True, False]
        assert rank["norm_collectives"] == 1 and rank["norm_error"] < 1e-5
        assert rank["totals_collectives"] == 1 and rank["totals_error"] < 1e-5
        assert rank["finite_clean"] is True
        # an inf in the last rank's shard only: every rank says so (no rank takes another branch)
        assert rank["finite_with_inf_on_one_rank"] is False and rank["finite_collectives"] == 1


def test_fsdp_flags_on_cpu_processes_are_reported_not_taken_for_a_sharded_run(sharded_runs):
    message = json.loads((sharded_runs / "checks.json").read_text())["cpu_fsdp_flags"]
    assert message.startswith("is_fsdp_enabled=False: ")
    assert "accelerate left it off" in message and "would NOT be sharded" in message


# ---- check_setup's refusals, without processes -----------------------------------------------------------


def fake_trainer(version=None, deepspeed=False, fsdp_flag=None, batch=4, ga=1, parallelism=None):
    plugin = None if version is None else SimpleNamespace(fsdp_version=version)
    args = SimpleNamespace(fsdp=fsdp_flag, fsdp_plugin_args=None, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=ga, device=torch.device("cpu"), use_cpu=True)
    return SimpleNamespace(args=args, is_deepspeed_enabled=deepspeed,
                           accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin),
                                                       parallelism_config=parallelism))


def cfg(method, optim_args=""):
    return SharpnessConfig.from_optim_args(method, optim_args)


def set_up(trainer, config):
    """What SharpnessMixin does before training, on a fake trainer of 2 processes: the sharding accelerate set up,
    the layout it gives, and the method's own checks against it. Returns the layout, None when unsharded."""
    method_cls = registry.get(config.method).method
    sharding = trainer_sharding(trainer, config.method, method_cls.two_roles and config.parallel == "on")
    if sharding is None:
        return None
    roles = wants_roles(config, method_cls, 2, sharding)
    layout = FSDP2Roles(ParallelPlan(mode="roles", world_size=2)) if roles else FSDP2(ParallelPlan(mode="data", world_size=2))
    method_cls.check(config, layout, trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps)
    return layout


@pytest.mark.parametrize("trainer,config,words", [
    (fake_trainer(version=1), cfg("sampa"), ["FSDP1", "fsdp_version: 2"]),
    (fake_trainer(fsdp_flag=True), cfg("sam"), ["left it off", "NOT be sharded"]),
    (fake_trainer(version=2), cfg("asyncsam", "ascent_device=cpu"), ["ascent_device=cpu", "FSDP2"]),
    (fake_trainer(version=2), cfg("sam", "sync_ascent=false"), ["sync_ascent=false", "optim=msam"]),
    (fake_trainer(version=2, batch=2), cfg("msam", "micro_batches=4"), ["micro_batches <= 2"]),
    (fake_trainer(version=2, parallelism=SimpleNamespace(dp_replicate_size=2, dp_shard_size=2, tp_size=1)),
     cfg("sampa", "parallel=on"), ["parallel=on", "ParallelismConfig", "'dp_replicate': 2", "parallel=off"]),
], ids=["fsdp1", "fsdp-flags-ignored", "cpu-ascent", "sam-per-rank", "msam-too-many", "roles-with-hsdp"])
def test_check_setup_refuses_with_what_to_do_instead(monkeypatch, trainer, config, words):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(SharpnessConfigError) as err:
        set_up(trainer, config)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_check_setup_runs_sampa_and_asyncsam_data_parallel_under_fsdp2(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    for method in ("sampa", "asyncsam"):
        assert type(set_up(fake_trainer(version=2), cfg(method))) is FSDP2
    assert set_up(fake_trainer(), cfg("sampa")) is None  # no FSDP: nothing to do
    for method in ("sampa", "asyncsam"):  # role mode on request: each role sharded over its half of the ranks
        assert type(set_up(fake_trainer(version=2), cfg(method, "parallel=on"))) is FSDP2Roles


def test_plain_tensors_keep_their_norm():
    tensors = [torch.randn(3, 4), torch.randn(5)]
    expected = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors]))
    torch.testing.assert_close(dtensor.global_norm(iter(tensors)), expected)
    assert dtensor.global_norm([]) is None
    assert dtensor.all_finite(tensors) and not dtensor.all_finite([torch.tensor([float("nan")])])


# ---- the Trainer under accelerate's FSDP2 plugin -----------------------------------------------------------

def check_trainer_results(out: Path, device: str, cases=TRAINER_CASES, resumed=TRAINER_RESUME):
    from tests.helpers.fsdp_trainer import train

    for name, (optim, optim_args, exact) in cases.items():
        info = json.loads((out / f"{name}.json").read_text())
        assert info["sharded"] and info["model"].startswith("FSDP"), info
        two = torch.load(out / f"{name}.pt")
        assert all(torch.isfinite(v).all() for v in two.values())
        if exact:
            one_process = optim_args.replace(",parallel=on", "")
            trainer, one = train(str(out / f"{name}_one"), optim, one_process, 8, 4, fsdp=False, device=device,
                                 evaluate=name.endswith("_eval"))
            if name.endswith("_ac"):
                assert all(n.count("_checkpoint_wrapped_module") == 1 for n in info["names"] if "net." in n), \
                    info["names"]
            if name.endswith("_ignored"):
                assert info["plain_trainable"] == ["net.2.weight", "net.2.bias"], info["plain_trainable"]
            for key in one:
                torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
            for kind in ("loss", "eval_loss", "sam/grad_cosine"):  # the cosine: over all shards
                logged = lambda log: [e[kind] for e in log if kind in e]  # noqa: E731
                torch.testing.assert_close(logged(info["log"]), logged(trainer.state.log_history), atol=1e-6,
                                           rtol=0)
            if name.endswith("_eval"):
                assert len([e for e in info["log"] if "eval_loss" in e]) == 3  # at the start, steps 2 and 4
        if name in resumed:
            saved, resumed = torch.load(out / f"{name}.saved.pt"), torch.load(out / f"{name}.resumed.pt")
            for key in saved:
                torch.testing.assert_close(resumed[key], saved[key], atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate turns FSDP on only on accelerators; this "
                    "machine has no CUDA (the sharded path is tested on CPU above with fully_shard over gloo)")
def test_trainer_with_accelerates_fsdp2_plugin_on_gpus(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    proc = launch("fsdp_trainer", nproc, "--out_dir", str(tmp_path), "--device", "cuda", "--batch",
                  str(8 // nproc), "--cases", *trainer_cases(), "--resume_cases", *TRAINER_RESUME, timeout=540)
    assert proc.returncode == 0, proc.stderr[-6000:]
    check_trainer_results(tmp_path, "cuda")
    if nproc < 2:
        return
    # role mode: 2 x k GPUs, each role sharded over its k (per-device batch 8 / k: the same global batch of 8)
    nproc = 4 if torch.cuda.device_count() >= 4 else 2
    roles = tmp_path / "roles"
    proc = launch("fsdp_trainer", nproc, "--out_dir", str(roles), "--device", "cuda", "--batch",
                  str(8 // (nproc // 2)), "--cases", *trainer_cases(ROLE_TRAINER_CASES), "--resume_cases",
                  *ROLE_TRAINER_RESUME, timeout=540)
    assert proc.returncode == 0, proc.stderr[-6000:]
    check_trainer_results(roles, "cuda", ROLE_TRAINER_CASES, ROLE_TRAINER_RESUME)


def test_trainer_with_accelerates_fsdp2_plugin_turned_on_for_cpu_processes(sharded_runs):
    check_trainer_results(sharded_runs / "trainer", "cpu")


def test_trainer_role_mode_under_fsdp2_shards_each_role_over_its_ranks(role_runs):
    """SharpnessTrainer, parallel=on, accelerate's FSDP2 plugin on 4 processes: accelerate's own preparation runs
    over each role's 2 ranks; weights and logged loss equal one unsharded process, resume is exact, and each rank
    holds one shard of the method state (ranks (0, i) and (1, i) the same one)."""
    out = role_runs / "trainer"
    check_trainer_results(out, "cpu", ROLE_TRAINER_CASES, ROLE_TRAINER_RESUME)
    for name in ROLE_TRAINER_CASES:
        per_rank = json.loads((out / f"{name}.json").read_text())["state_bytes"]
        assert per_rank[:2] == per_rank[2:] and 0 < max(per_rank) < sum(per_rank[:2]), per_rank
