"""Memory targets: extra fp32 copies of the trainable parameters beyond the base optimizer's own.

Issue 2, one process: SAM <= 1, mSAM <= 2, Asynchronous SAM <= 2. Issue 10: SAMPa within SAM's + 1 (one
process), and in role mode (2 processes) every rank of SAMPa and Asynchronous SAM within SAM's (1 process, same
base optimizer, clipping and accumulation) + 1, as measured by `benchmarks/param_copies.py` (allocation counting
under a TorchDispatchMode, on every rank; see its docstring). The figures are counts of allocations, not
timings: deterministic on any machine.
"""

import pytest

import benchmarks.param_copies as pc
import sam_hf  # noqa: F401  (registers the optimizer names)
import sam_hf.methods.sam as sam_module

STEPS = 4  # steps 3-4 measured: the optimizer state and every method's carried state exist
# One parameter tensor (1/LAYERS of a copy): a method may hold one more per-parameter temporary at its peak than
# the base optimizer does in its own step. A whole extra copy is LAYERS times that, so this hides none.
TOL = 1 / pc.LAYERS
# every registered method's 1-process examples (the registry's), by label
ROWS = {row[0]: row for row in pc.ROWS}
SAMPA, SAMPA_SGD = "SAMPa-0.2", "SAMPa-0.2, base=sgd momentum=0.9"


def test_every_registered_method_is_metered():
    from sam_hf import registry

    assert {optim for _, optim, _ in pc.ROWS} == set(registry.names())


@pytest.mark.parametrize("case", list(ROWS))
def test_extra_copies_within_target(case):
    label, optim, optim_args = ROWS[case]
    copies = pc.measure(optim, optim_args, steps=STEPS)
    assert copies <= pc.target(optim, optim_args) + TOL, f"{label} ({optim_args}): {copies:.3f} extra copies"


@pytest.mark.parametrize("case", ["SAM", SAMPA, SAMPA_SGD])
def test_extra_copies_within_target_with_clipping(case):
    label, optim, optim_args = ROWS[case]
    copies = pc.measure(optim, optim_args, steps=STEPS, max_grad_norm=1.0)
    assert copies <= pc.TARGETS[optim] + TOL, f"{label} ({optim_args}), max_grad_norm=1: {copies:.3f} extra copies"


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
@pytest.mark.parametrize("case", [SAMPA, SAMPA_SGD])
def test_sampa_in_one_process_within_sam_plus_one_copy(case, max_grad_norm):
    """g_t is the one copy SAMPa carries beyond SAM's backup: the lookahead pass runs first, and g_t is freed as
    soon as the perturbation has used it; both gradients are .grad's own tensors, G is combined in place."""
    label, optim, optim_args = ROWS[case]
    sam = pc.measure("sam", pc.sam_twin(optim, optim_args), steps=STEPS, max_grad_norm=max_grad_norm)
    copies = pc.measure(optim, optim_args, steps=STEPS, max_grad_norm=max_grad_norm)
    assert copies <= sam + 1 + TOL, f"{label}, max_grad_norm={max_grad_norm:g}: {copies:.3f} vs SAM's {sam:.3f} + 1"


# Role mode (2 processes under torchrun, gloo): both roles of SAMPa and Asynchronous SAM, with and without clipping
# and gradient accumulation, in one launch.
ROLE_CASES = {
    "sampa": ("sampa", "rho=0.1,lam=0.2", 0.0, 1),
    "sampa-clip-ga2": ("sampa", "rho=0.1,lam=0.2", 1.0, 2),
    "sampa-lam0": ("sampa", "rho=0.1,lam=0.0", 0.0, 1),
    "sampa-sgd-clip": ("sampa", "rho=0.1,lam=0.2,base=sgd,momentum=0.9", 1.0, 1),
    "asyncsam-r1": ("asyncsam", "rho=0.05,ascent_batch_ratio=1", 0.0, 1),
    "asyncsam-r0.5-clip-ga2": ("asyncsam", "rho=0.05,ascent_batch_ratio=0.5", 1.0, 2),
    # bf16 on the wire: half a copy out and half a copy in while the exchange runs (1.81 copies)
    "sampa-bf16-exchange": ("sampa", "rho=0.1,lam=0.2,exchange_dtype=bf16", 0.0, 1),
}


@pytest.fixture(scope="module")
def role_counts():
    return dict(zip(ROLE_CASES, pc.measure_roles(list(ROLE_CASES.values()), steps=STEPS)))


@pytest.mark.parametrize("case", list(ROLE_CASES))
def test_role_mode_every_rank_within_sam_plus_one_copy(role_counts, case):
    r = role_counts[case]
    assert len(r["ranks"]) == 2
    for rank, copies in enumerate(r["ranks"]):
        assert copies <= r["target"] + TOL, (f"{case}: rank {rank} holds {copies:.3f} extra copies, SAM (1 process) "
                                             f"holds {r['sam']:.3f}: over SAM + 1")
    if r["optim"] == "sampa":  # every rank carries g_t: the meter sees what the exchange allocated on each rank
        assert min(r["ranks"]) >= 1 - TOL, r


def test_baseline_is_grads_and_optimizer_state():
    """The meter sees .grad and the optimizer's state once each, and sees freed storages go."""
    assert pc.measure("adamw_torch", None, steps=STEPS) == 0.0
    adam = pc.baseline_run("adamw_torch", None, steps=STEPS)
    # .grad, exp_avg, exp_avg_sq, plus AdamW's temporaries (sqrt, div) for one parameter at a time
    assert 3.0 <= adam.copies <= 3.0 + 3 * TOL
    sgd = pc.baseline_run("sgd", "momentum=0.9", steps=STEPS)
    assert sgd.copies == 2.0  # .grad and momentum_buffer; SGD works in place
    # every step allocates new gradients: were freed ones missed, a longer run would peak higher
    assert pc.run("sgd", "momentum=0.9", steps=STEPS + 2).peak_bytes == sgd.peak_bytes


def test_one_wasted_copy_measures_one(monkeypatch):
    honest = pc.measure("sam", "rho=0.05", steps=STEPS)
    step = sam_module.SAM.step

    def wasteful(self, batches, passes):
        spare = [p.detach().clone() for p in self.params]  # alive for the whole step
        result = step(self, batches, passes)
        del spare
        return result

    monkeypatch.setattr(sam_module.SAM, "step", wasteful)
    assert pc.measure("sam", "rho=0.05", steps=STEPS) == pytest.approx(honest + 1.0, abs=1e-9)


@pytest.mark.parametrize("optim_args", ["rho=0.1", "rho=0.5,adaptive=true", "rho=0.1,lam=0.3"])
def test_backup_written_into_the_spent_direction_is_exact(optim_args):
    """Role mode's perturbation writes x's backup into the direction's own buffers: the weights move exactly as
    `perturb_` moves them, the backup is x (None for a parameter the rule leaves where it is), and no new buffer is
    made where one can be reused."""
    import torch

    from sam_hf.config import SharpnessConfig
    from sam_hf.methods import SAMPa

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    method = SAMPa(SharpnessConfig.from_optim_args("sampa", optim_args), torch.optim.AdamW(model.parameters()),
                   param_names=dict((id(p), n) for n, p in model.named_parameters()))
    x = [p.detach().clone() for p in method.params]
    d = [torch.randn_like(p) for p in method.params]
    d[1] = None  # a parameter without a gradient
    method.perturb_([None if t is None else t.clone() for t in d])
    want = [p.detach().clone() for p in method.params]
    with torch.no_grad():
        for p, x0 in zip(method.params, x):
            p.copy_(x0)
    ids = [None if t is None else id(t) for t in d]
    saved, applied, _ = method.perturb_(d, keep_x=True)
    assert applied
    for p, w, s, x0, i in zip(method.params, want, saved, x, ids):
        assert torch.equal(p, w)
        if i is None:  # no direction: not moved, nothing to restore
            assert s is None and torch.equal(p, x0)
        else:
            assert torch.equal(s, x0) and id(s) == i  # the direction's buffer now holds x


def test_data_parallel_adds_nothing_per_rank_and_fsdp2_holds_one_shard_of_each_extra_copy():
    """2 CPU processes (gloo; one torchrun launch), SAM and SAMPa (parallel=off), busiest rank against the base
    optimizer in the same layout, in units of one FULL copy. Unsharded data parallel: the gradient all-reduce
    works in place (staging at most 1/16 of the gradients), so each rank holds what 1 process holds. FSDP2
    (accelerate's plugin turned on for CPU): one shard of each extra copy per rank, about the 1-process figure / 2
    (the meter counts DTensors by their local shards and sees FSDP2's in-place storage resizes: not 0)."""
    rows = [ROWS["SAM"], ROWS[SAMPA]]
    res = pc.measure_layouts(rows=rows, steps=STEPS, layouts=("one", "ddp", "fsdp"))
    for label, _, _ in rows:
        one, ddp, fsdp = (res["rows"][label][k] for k in ("one", "ddp", "fsdp"))
        assert ddp <= one + 0.1, f"{label}: data parallel {ddp:.3f} vs 1 process {one:.3f}"
        assert one / 2 - 0.15 <= fsdp <= one / 2 + 0.15, f"{label}: FSDP2 {fsdp:.3f} vs 1 process {one:.3f}"
