"""Several processes (gloo on CPU): the result does not depend on how many processes computed it.

The 2-process cases run together in one torchrun launch (tests/helpers/dist_train.py); each is compared
with the same configuration trained in this process on the same global batch.
"""

import json
import time

import pytest
import torch

from tests.helpers import processes
from tests.helpers.dist_train import compile_backend, model_kind, train
from tests.helpers.tiny import MODELS

# name: (optim, optim_args, per-device batch on 2 ranks, the 1-process equivalent (optim, optim_args, batch))
PARITY = {
    "sampa_roles": ("sampa", "rho=0.1,lam=0.3", 8, ("sampa", "rho=0.1,lam=0.3", 8)),
    # 64 samples in batches of 12: the 6th step is a partial batch of 4, the 7th starts epoch 2
    "sampa_roles_partial_batch": ("sampa", "rho=0.1,lam=0.3", 12, ("sampa", "rho=0.1,lam=0.3", 12)),
    "asyncsam_roles_partial_batch": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 12,
                                     ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 12)),
    "asyncsam_roles": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 8,
                       ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 8)),
    # every rank builds a different model: training starts from rank 0's weights, as DDP's construction did
    "sampa_roles_rankinit": ("sampa", "rho=0.1,lam=0.3", 8, ("sampa", "rho=0.1,lam=0.3", 8)),
    "sam_ddp_rankinit": ("sam", "rho=0.1", 4, ("sam", "rho=0.1", 8)),
    # BatchNorm: running statistics come from role 1's lookahead pass and are broadcast to every rank
    "sampa_roles_bn": ("sampa", "rho=0.1,lam=0.3", 8, ("sampa", "rho=0.1,lam=0.3", 8)),
    "sam_ddp": ("sam", "rho=0.1", 4, ("sam", "rho=0.1", 8)),
    "msam_ddp": ("msam", "rho=0.1,micro_batches=4", 4, ("msam", "rho=0.1,micro_batches=4", 8)),
    # Models whose forward takes **kwargs, with transformers' default average_tokens_across_devices=True: Trainer
    # gathers num_items_in_batch over all ranks and multiplies each rank's loss by the world size. _kw ignores the
    # count (a plain mean, like BERT classifiers), _count divides by it (like causal LMs). Role mode on 2 processes
    # equals 1 process with the same per-device batch; data parallel keeps transformers' DDP semantics (2 processes
    # = 1 process accumulating the 2 micro-batches).
    "sampa_roles_kw": ("sampa", "rho=0.1,lam=0.3", 8, ("sampa", "rho=0.1,lam=0.3", 8)),
    "sampa_roles_count": ("sampa", "rho=0.1,lam=0.3", 8, ("sampa", "rho=0.1,lam=0.3", 8)),
    "asyncsam_roles_kw": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.3", 8,
                          ("asyncsam", "rho=0.1,ascent_batch_ratio=0.3", 8)),
    "asyncsam_roles_count": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.3", 8,
                             ("asyncsam", "rho=0.1,ascent_batch_ratio=0.3", 8)),
    "sam_ddp_kw": ("sam", "rho=0.1", 4, ("sam", "rho=0.1", 4, 2)),
    "msam_ddp_kw": ("msam", "rho=0.1,micro_batches=4", 4, ("msam", "rho=0.1,micro_batches=4", 4, 2)),
    "msam_ddp_count": ("msam", "rho=0.1,micro_batches=4", 4, ("msam", "rho=0.1,micro_batches=4", 4, 2)),
    # --torch_compile (aot_eager) on 2 processes equals the eager run in 1 process, for every method
    "sam_ddp_compile": ("sam", "rho=0.1", 4, ("sam", "rho=0.1", 8)),
    "msam_ddp_compile": ("msam", "rho=0.1,micro_batches=4", 4, ("msam", "rho=0.1,micro_batches=4", 8)),
    "sampa_roles_compile": ("sampa", "rho=0.1,lam=0.3", 8, ("sampa", "rho=0.1,lam=0.3", 8)),
    "asyncsam_roles_compile": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 8,
                               ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 8)),
    "sam_nosync_is_msam2": ("sam", "rho=0.1,sync_ascent=false", 4, ("msam", "rho=0.1,micro_batches=2", 8)),
    # data-parallel SAMPa: each rank holds its shard of B_t; the all-reduced halves are the global-batch rule
    "sampa_ddp": ("sampa", "rho=0.1,parallel=off", 4, ("sampa", "rho=0.1", 8)),
    # issue 10's exchange: a term of weight 0 (nothing of it crosses the link for lam = 1), and gradient accumulation
    # (a NAME ending in _ga2: 2 micro-batches per step on every rank)
    "sampa_roles_lam0": ("sampa", "rho=0.1,lam=0", 8, ("sampa", "rho=0.1,lam=0", 8)),
    "sampa_roles_lam1": ("sampa", "rho=0.1,lam=1", 8, ("sampa", "rho=0.1,lam=1", 8)),
    "sampa_roles_ga2": ("sampa", "rho=0.1,lam=0.3", 4, ("sampa", "rho=0.1,lam=0.3", 4, 2)),
    "asyncsam_roles_ga2": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 4,
                           ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 4, 2)),
    # ascent_device=cpu (here both ranks are CPUs): the tolerant replica check and re-sync run every 2 steps (last:
    # it leaves rank 1 with 2 threads)
    "asyncsam_roles_cpu_ascent": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5,ascent_device=cpu,check_every=2,"
                                  "ascent_threads=2", 8,
                                  ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 8)),
}


def launch(out_dir, nproc, *args, timeout=240, restarts=0):
    """dist_train on `nproc` processes; with `restarts`, an elastic launch (processes.torchrun)."""
    cmd = processes.torchrun(nproc, "-m", "tests.helpers.dist_train", "--out_dir", out_dir, *args, restarts=restarts)
    return processes.run(cmd, timeout=timeout, env=processes.ELASTIC_ENV if restarts else None)


def assert_close(a, b, atol=1e-6):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# exchange_dtype=bf16, in the same launch as the parity cases: name -> (optim, optim_args without the dtype)
BF16 = {"bf16_sampa": ("sampa", "rho=0.1,lam=0.3"), "bf16_asyncsam": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5")}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    cases = [f"{name}:{o}:{a}:{b}" for name, (o, a, b, _) in PARITY.items()]
    cases += [f"{name}:{o}:{a},exchange_dtype=bf16:8" for name, (o, a) in BF16.items()]
    proc = launch(out, 2, "--steps", "7", "--cases", *cases)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.mark.parametrize("name", list(PARITY))
def test_two_processes_equal_one(two_process_runs, tmp_path, name):
    optim, optim_args, batch, *ga = PARITY[name][3]
    trainer, one = train(str(tmp_path), optim, optim_args, batch=batch, steps=7, batchnorm=name.endswith("_bn"),
                         model=model_kind(name), ga=ga[0] if ga else 1)
    assert_close(one, torch.load(two_process_runs / f"{name}.pt"))
    # the logged training loss too (transformers' rule: the mean over the ranks of what each rank's step returns)
    losses = lambda history: [h["loss"] for h in history if "loss" in h]  # noqa: E731
    assert losses(torch.load(two_process_runs / f"{name}.log")) == pytest.approx(losses(trainer.state.log_history),
                                                                                rel=1e-5)
    if "_roles" in name:  # the two passes really ran on two ranks
        assert any("sam/exchange_seconds" in h for h in torch.load(two_process_runs / f"{name}.log"))


def test_the_cpu_ascent_rank_gets_its_threads(two_process_runs):
    # torchrun (and this test's environment) set OMP_NUM_THREADS=1; ascent_threads=2 applies to rank 1 only
    info = [json.loads((two_process_runs / f"asyncsam_roles_cpu_ascent.rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["threads"] for i in info] == [1, 2]


@pytest.mark.parametrize("name", ["sampa_roles", "asyncsam_roles_cpu_ascent", "sam_ddp"])
def test_evaluation_is_sharded_over_all_ranks(two_process_runs, tmp_path, name):
    from tests.helpers.dist_train import evaluate

    optim, optim_args, batch = PARITY[name][3]
    trainer, _ = train(str(tmp_path), optim, optim_args, batch=batch, steps=7)
    one, two = evaluate(trainer), torch.load(two_process_runs / f"{name}.eval")
    assert (one["batches"], two["batches"]) == (4, 2)  # 32 samples in batches of 8
    assert two["predictions"].shape == one["predictions"].shape  # the padding is dropped again
    torch.testing.assert_close(two["predictions"], one["predictions"], atol=1e-6, rtol=0)
    assert abs(two["eval_loss"] - one["eval_loss"]) < 1e-6


@pytest.mark.parametrize("name", list(PARITY))
def test_replicas_are_identical_and_not_wrapped_in_ddp(two_process_runs, name):
    assert_close(torch.load(two_process_runs / f"{name}.rank0.pt"), torch.load(two_process_runs / f"{name}.rank1.pt"),
                 atol=0)
    # sam_hf reduces the gradients itself: a DDP wrapper would only add a copy of them in its buckets
    # (a compiled model is torch.compile's wrapper around the bare module)
    assert (two_process_runs / f"{name}.wrapper").read_text() == (
        "OptimizedModule" if compile_backend(name) else MODELS[model_kind(name)].__name__)


def test_data_parallel_sampa_runs_both_passes_on_every_rank(two_process_runs):
    log = torch.load(two_process_runs / "sampa_ddp.log")
    assert any("sam/grad_cosine" in h for h in log) and all("sam/exchange_seconds" not in h for h in log)


@pytest.mark.parametrize("name", list(BF16))
def test_bf16_exchange_keeps_replicas_identical_and_close_to_fp32(two_process_runs, tmp_path, name):
    """exchange_dtype=bf16 sends half the bytes; each rank rounds its own gradient as the peer receives it, so the
    ranks still take the same step (bit for bit), and the result is the fp32 one up to bf16 rounding."""
    optim, optim_args = BF16[name]
    assert_close(torch.load(two_process_runs / f"{name}.rank0.pt"), torch.load(two_process_runs / f"{name}.rank1.pt"),
                 atol=0)
    start = MODELS["mean"]().state_dict()
    _, one = train(str(tmp_path / "one"), optim, optim_args, batch=8, steps=7)
    two = torch.load(two_process_runs / f"{name}.pt")
    moved = sum(float((one[k] - start[k]).pow(2).sum()) for k in one) ** 0.5
    off = sum(float((two[k] - one[k]).pow(2).sum()) for k in one) ** 0.5
    assert 0 < off <= 0.02 * moved, (off, moved)


EXCHANGE_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from sam_hf.distributed.exchange import exchange
from sam_hf.distributed.plan import make_plan
dist.init_process_group("gloo")
rank, world, dtype = dist.get_rank(), dist.get_world_size(), sys.argv[2]
plan = make_plan(torch.device("cpu"), 60.0, roles=True, exchange_dtype=dtype)
# large and small tensors (the small ones share a message); parameter 3 gets a gradient on role 0 only, 5 on none
shapes = [(300, 70), (7,), (64, 40), (5, 3), (2, 9000), (4,), (30,)]
params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
def grad(role, dp, i):
    g = torch.Generator().manual_seed(1000 * role + 100 * dp + i)
    return torch.randn(shapes[i], generator=g) * 3.0
for i, p in enumerate(params):
    p.grad = None if i == 5 or (i == 3 and plan.role == 1) else grad(plan.role, plan.dp_rank, i) * 4.0  # scale 4
into = [torch.empty(s) for s in shapes]
ids = [id(t) for t in into]
g0, g1, extras = exchange(plan, [p.grad for p in params], params, 4.0, {"loss": 1.0 + plan.role}, ("loss",),
                          "the test exchange", into=into)
k = plan.dp_size
for role, got in ((0, g0), (1, g1)):
    for i, t in enumerate(got):
        if i == 5 or (i == 3 and role == 1):
            assert t is None, (role, i)
            continue
        want = sum(grad(role, dp, i) for dp in range(k)) / k
        if dtype == "bf16":
            want = want.to(torch.bfloat16).float()
            tol = 0 if k == 1 else 1e-2
        else:
            tol = 0 if k == 1 else 1e-6
        torch.testing.assert_close(t, want, rtol=0, atol=tol)
        if role != plan.role:  # received in place, into the buffers handed in
            assert id(t) == ids[i], (role, i)
assert extras == {"loss": 3.0}, extras
torch.save([g0, g1], f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("nproc,dtype", [(2, "bf16"), (4, "fp32")])  # fp32 on 2: every parity case
def test_the_exchange_delivers_each_roles_gradient_in_place(tmp_path, nproc, dtype):
    """Each role's gradient (unscaled, dp-averaged) reaches every rank, the other role's landing in the buffers
    handed in; a parameter without a gradient stays None; the small gradients' shared message; identical on all."""
    script = tmp_path / "exchange.py"
    script.write_text(EXCHANGE_SCRIPT)
    proc = processes.run(processes.torchrun(nproc, script, tmp_path, dtype))
    assert proc.returncode == 0, proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]
    for other in ranks[1:]:  # replicas: every rank holds bit for bit the same two gradients
        for a, b in zip(ranks[0][0] + ranks[0][1], other[0] + other[1]):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("slow,expected", [
    # descent 0.16 s per step; ascent 0.04 s per sample on a batch of 8, and the ascent rank's optimizer step
    # 0.08 s more (a CPU rank's AdamW): r = (0.16 - 0.08) / (0.04 * 8) = 0.25 (the passes alone would give 0.5)
    ("0.16,0.04,0.08", 0.25),
], ids=["passes-and-optimizer-step"])
def test_auto_ascent_ratio_hides_the_ascent_behind_the_descent(tmp_path, slow, expected):
    proc = launch(tmp_path, 2, "--steps", "7", "--slow_roles", slow,
                  "--cases", "auto:asyncsam:rho=0.1,ascent_batch_ratio=auto:8")
    assert proc.returncode == 0, proc.stderr[-6000:]
    ratios = [h["sam/ascent_batch_ratio"] for h in torch.load(tmp_path / "auto.log") if "sam/ascent_batch_ratio" in h]
    assert ratios[0] == 1.0  # r = 1 while measuring
    assert abs(ratios[-1] - expected) < 0.12, ratios


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU + CPU case needs a GPU (CPU-only: the cases above)")
def test_gpu_descent_with_a_cpu_ascent_rank_matches_one_gpu_process(tmp_path):
    args = "rho=0.1,ascent_batch_ratio=0.5,ascent_device=cpu,check_every=2"
    proc = launch(tmp_path, 2, "--steps", "7", "--device", "cuda", "--cases", f"het:asyncsam:{args}:8")
    assert proc.returncode == 0, proc.stderr[-6000:]
    info = [json.loads((tmp_path / f"het.rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["device"] for i in info] == ["cuda", "cpu"]
    _, one = train(str(tmp_path / "one"), "asyncsam", "rho=0.1,ascent_batch_ratio=0.5", batch=8, steps=7, device="cuda")
    # two device kinds: equal up to their round-off, not bit for bit
    assert_close(one, torch.load(tmp_path / "het.pt"), atol=1e-4)
    assert_close(torch.load(tmp_path / "het.rank0.pt"), torch.load(tmp_path / "het.rank1.pt"), atol=1e-4)


# 4 processes, a 2 x 2 mesh (each role data parallel over 2 ranks, per-device batch 4), in conftest's shared
# `five_step_runs` launch (which also saves sampa_mesh at step 2 for the resume on 2 processes below). Asynchronous SAM
# on 2k ranks is asked for with parallel=on (auto takes role mode on 2 processes only).
MESH = {"sampa_mesh": ("sampa", "rho=0.1,lam=0.3", 4), "async_mesh": ("asyncsam", "rho=0.1,parallel=on", 4)}


def test_sampa_and_asyncsam_on_a_2x2_mesh_equal_one_process(five_step_runs, tmp_path):
    four = five_step_runs / "four"
    _, one = train(str(tmp_path / "one"), "sampa", "rho=0.1,lam=0.3", batch=8, steps=5)
    assert_close(one, torch.load(four / "sampa_mesh.pt"))
    _, one = train(str(tmp_path / "one_async"), "asyncsam", "rho=0.1", batch=8, steps=5)
    assert_close(one, torch.load(four / "async_mesh.pt"))
    assert any("sam/exchange_seconds" in h for h in torch.load(four / "async_mesh.log"))


# ---- resume on another number of processes, and an elastic restart ---------------------------------------------------
# The method state is saved independent of the world size (SAMPa's g_t and held batch B_t gathered, Asynchronous
# SAM's a_(t-1) whole): a run resumed on 1 process from a 2-process checkpoint, or on 2 from a 1-process one, ends
# where the never-stopped run ends. The 2-process and 1-process runs of one configuration differ in summation order
# only (the parity tests above): the same 1e-6.
WORLD_RESUME = {  # name: (optim, optim_args on 2 processes, per-device batch there, the 1-process batch)
    "sampa_roles": ("sampa", "rho=0.1,lam=0.3", 8, 8),
    "sampa_ddp": ("sampa", "rho=0.1,parallel=off", 4, 8),  # B_t: two shards of 4 saved as one batch of 8
    "asyncsam_roles": ("asyncsam", "rho=0.1,ascent_batch_ratio=0.5", 8, 8),
}


def _one_process_args(optim_args):
    return optim_args.replace(",parallel=off", "")


# conftest's `five_step_runs` trains these on 2 processes (two/, saving at step 2) and resumes them on 2 processes
# (resumed/) from a checkpoint-2 of `source`: one process (one: its optim_args and batch), the 2 x 2 mesh (four/),
# or the same 2-process layout (two/; the name ends in _again).
ONE_TO_TWO = ("sampa_roles", "sampa_ddp")
RESUMED_ON_TWO = {  # name: (source, optim, optim_args, per-device batch on 2 processes, one process's (args, batch))
    **{n: ("one", WORLD_RESUME[n][0], WORLD_RESUME[n][1], WORLD_RESUME[n][2],
           (_one_process_args(WORLD_RESUME[n][1]), WORLD_RESUME[n][3])) for n in ONE_TO_TWO},
    "sampa_mesh": ("four", "sampa", "rho=0.1,lam=0.3", 8, None),
    "sampa_roles_again": ("two", "sampa", "rho=0.1,lam=0.3", 8, None),
}


def _never_stopped(tmp_path, name):
    optim, optim_args, _, batch1 = WORLD_RESUME[name]
    return train(str(tmp_path / "one"), optim, _one_process_args(optim_args), batch=batch1, steps=5)[1]


@pytest.mark.parametrize("name", list(WORLD_RESUME))
def test_a_two_process_checkpoint_resumes_on_one_process(five_step_runs, tmp_path, name):
    optim, optim_args, _, batch1 = WORLD_RESUME[name]
    checkpoint = five_step_runs / "two" / name / "run" / "checkpoint-2"
    _, resumed = train(str(tmp_path / "resumed"), optim, _one_process_args(optim_args), batch=batch1, steps=5,
                       resume=str(checkpoint))
    never_stopped = _never_stopped(tmp_path, name)
    assert_close(resumed, never_stopped)
    assert_close(torch.load(five_step_runs / "two" / f"{name}.pt"), never_stopped)


@pytest.mark.parametrize("name", ONE_TO_TWO)
def test_a_one_process_checkpoint_resumes_on_two_processes(five_step_runs, tmp_path, name):
    assert_close(torch.load(five_step_runs / "resumed" / f"{name}.pt"), _never_stopped(tmp_path, name))


def test_parallel_resume_equals_uninterrupted(five_step_runs):
    """SAMPa in role mode resumed on the same 2 processes from its own checkpoint: bit for bit the run that never
    stopped."""
    assert_close(torch.load(five_step_runs / "two" / "sampa_roles.pt"),
                 torch.load(five_step_runs / "resumed" / "sampa_roles_again.pt"), atol=0)


def test_four_processes_resume_on_two(five_step_runs, tmp_path):
    """SAMPa on a 2 x 2 mesh (each role data parallel over 2 ranks, per-device 4) resumes in role mode on 2
    processes (per-device 8): B_t's two shards are gathered into one batch of 8."""
    assert_close(torch.load(five_step_runs / "resumed" / "sampa_mesh.pt"), _never_stopped(tmp_path, "sampa_roles"))


def test_an_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    """torchrun --max-restarts 1: rank 1 dies at step 3, torchrun restarts both ranks, and the script resumes from
    its newest checkpoint (get_last_checkpoint, as the HF example scripts do) and ends at the weights of a run
    that never stopped (SAMPa in role mode)."""
    _, never_stopped = train(str(tmp_path / "one"), "sampa", "rho=0.1,lam=0.3", batch=8, steps=5)
    marker = tmp_path / "killed_once"
    run = launch(tmp_path / "elastic", 2, "--steps", "5", "--save_steps", "2", "--kill_at", "3", "--kill_once",
                 str(marker), "--resume", "last", "--cases", "sampa_roles:sampa:rho=0.1,lam=0.3:8", restarts=1,
                 timeout=240)
    assert run.returncode == 0, run.stderr[-6000:]
    assert marker.exists()  # rank 1 was killed at step 3 ...
    # ... and the restart resumed from checkpoint-2: a fresh start would have written it again after the kill
    checkpoint = tmp_path / "elastic" / "sampa_roles" / "run" / "checkpoint-2" / "trainer_state.json"
    assert checkpoint.stat().st_mtime_ns <= marker.stat().st_mtime_ns
    assert_close(torch.load(tmp_path / "elastic" / "sampa_roles.pt"), never_stopped)


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_silent_peer_ends_training_with_a_clear_error(tmp_path, fault):
    start = time.monotonic()
    proc = launch(tmp_path, 2, "--steps", "50", f"--{fault}_at", "3", "--timeout", "5",
                  "--cases", "f:sampa:rho=0.1:8", timeout=150)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "sam_hf: rank 0 lost its peers during the sampa exchange at step 3" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 90, elapsed


@pytest.mark.parametrize("case", ["c:sampa:rho=0.1,check_every=2:8",
                                  "c:asyncsam:rho=0.1,ascent_device=cpu,check_every=2:8"], ids=["exact", "cpu-ascent"])
def test_diverged_replicas_are_an_error(tmp_path, case):
    proc = launch(tmp_path, 2, "--steps", "8", "--corrupt_at", "3", "--cases", case)
    assert proc.returncode != 0
    assert "replicas diverged at step 4" in proc.stderr, proc.stderr[-3000:]


def test_cpu_ascent_rank_round_off_is_resynced_from_rank_0(tmp_path):
    # a round-off-sized difference (as between a GPU's and a CPU's optimizer step) passes the check at step 4,
    # which then copies rank 0's weights to rank 1: the replicas end identical
    proc = launch(tmp_path, 2, "--steps", "6", "--corrupt_at", "3", "--corrupt_by", "1e-6",
                  "--cases", "n:asyncsam:rho=0.1,ascent_batch_ratio=0.5,ascent_device=cpu,check_every=2:8")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert_close(torch.load(tmp_path / "n.rank0.pt"), torch.load(tmp_path / "n.rank1.pt"), atol=0)


@pytest.mark.parametrize("optim,optim_args,message", [
    ("sampa", "parallel=on", "parallel=on needs 2 processes or more"),
    ("sam", "parallel=on", "parallel=on applies to sampa and asyncsam only"),
], ids=["sampa-one-process", "sam"])
def test_impossible_layouts_fail_before_training(tmp_path, optim, optim_args, message):
    from sam_hf import SharpnessConfigError

    with pytest.raises(SharpnessConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(str(tmp_path), optim, optim_args)
