"""The ascent rules (rule=asam, sam_on, vasso, bisam) on every schedule, against the independent references.

Each case trains a float64 model with the plain-PyTorch API (`SharpnessOptimizer.step(BatchClosure)`, the same
method code SharpnessTrainer runs) and the same steps with the references in tests/helpers/family_reference
(written from the papers and checked against the authors' code, nothing imported from sam_hf), and compares every
weight.
In float64 two correct implementations differ only in the order of their sums: a few ulps per step, amplified a
little by SGD with momentum over 5 steps; the weights are O(1), so TOL = 1e-12 sits 3 orders of magnitude above
the differences measured (printed with -s) and far below what any real rule error moves (the rules move the
weights 1e-3 to 1e-1 from each other and from the base optimizer, checked by `power`).

The refusals are at the end; the Trainer-level cases (BiSAM's lower bound from a Trainer's model outputs, SAM-ON's
layers on Hugging Face models) are in tests/trainer/test_rules_trainer.py, the multi-process cases in
tests/distributed/test_rules_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sam_hf
from sam_hf import SharpnessConfig, SharpnessConfigError
from tests.helpers.family_reference import asam, async_sam, bisam, common, sam_on, sampa, vasso

TOL = 1e-12
STEPS = 5
RHO = 0.3  # large enough that every rule moves the weights well away from its base optimizer in 5 steps


class Net(nn.Module):
    """Linear -> LayerNorm `norm1` -> + `shift` (a vector whose name has no "weight") -> LayerNorm `ln2` (no "norm"
    in its name: SAM-ON's name rule misses it, the module rule finds it) -> Linear; optional BatchNorm `bn1`."""

    def __init__(self, bn: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(5, 8)
        self.norm1 = nn.LayerNorm(8)
        self.shift = nn.Parameter(0.3 * torch.randn(8))
        self.ln2 = nn.LayerNorm(8)
        self.bn1 = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # LayerNorm's affine parameters away from (1, 0), so T = |x| + eta matters there
            for m in (self.norm1, self.ln2):
                m.weight.add_(0.5 * torch.randn(8))
                m.bias.add_(0.3 * torch.randn(8))

    def forward(self, x):
        h = torch.relu(self.norm1(self.fc1(x))) + self.shift
        return self.head(torch.tanh(self.bn1(self.ln2(h))))


def data(steps=STEPS, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, 5, generator=g, dtype=torch.float64), "labels": torch.randint(0, 3, (n,), generator=g)}
            for _ in range(steps)]


def per_example(model, b):
    return F.cross_entropy(model(b["x"]), b["labels"], reduction="none")


def logits_of(model, b):
    return model(b["x"])


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def make(bn=False):
    return Net(bn).double()


def ours(optim: str, optim_args: str, bn=False, batches=None, model=None, save_at=None, resume=None):
    """sam_hf's plain loop: the trained model (and the optimizer state after `save_at` steps)."""
    model = model or make(bn)
    opt = sam_hf.SharpnessOptimizer(sgd(model), optim, optim_args, model=model)
    start, saved = 0, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(copy.deepcopy(resume["optim"]))
        start = resume["step"]
    for i, b in enumerate((batches or data())[start:], start=start):
        opt.step(sam_hf.BatchClosure(lambda b: per_example(model, b).mean(), b,
                                     logits_fn=lambda b: logits_of(model, b)))
        if save_at is not None and i + 1 == save_at:
            saved = {"model": copy.deepcopy(model.state_dict()), "optim": copy.deepcopy(opt.state_dict()),
                     "step": i + 1}
    return (model, saved) if save_at is not None else model


def reference(step, bn=False, batches=None):
    """The reference's loop: `step(model, optimizer, batch, state)` per batch."""
    model = make(bn)
    opt, state = sgd(model), {}
    for b in batches or data():
        step(model, opt, b, state)
    return model


def gap(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def check(name, got, want, power_against=None):
    diff = gap(got, want)
    print(f"RULES {name}: max |diff| = {diff:.3g}")
    assert diff < TOL, f"{name}: {diff:.3g}"
    if power_against is not None:
        assert gap(want, power_against) > 1e-3, f"{name}: no power, the rule does not move away"


@pytest.fixture(scope="module")
def plain_sgd():
    return reference(lambda m, o, b, s: common.base_step(o, common.trainable(m), common.gradient(m, per_example, b)))


@pytest.fixture(scope="module")
def plain_sam():
    return reference(lambda m, o, b, s: sam_step(m, o, b, s))


def sam_step(m, o, b, s, rho=RHO):
    params = common.trainable(m)
    g = common.gradient(m, per_example, b, params)
    common.base_step(o, params, common.gradient_at(m, per_example, b, params, common.direction(g, rho)))


def lower_bound_fn(mu=1.0, kind="log", alpha=0.1):
    return lambda m, b: bisam.lower_bound(logits_of(m, b), b["labels"], mu, kind, alpha)


# ---------------------------------------------------------------------------------------------------------- SAM
SAM_CASES = {
    # ASAM, the authors' rule (the default): t = |x| + eta on names with "weight" (not `shift`, not biases)
    "asam-authors": ("rule=asam,eta=0.05",
                     lambda m, o, b, s: asam.asam_step(m, per_example, b, o, RHO, 0.05, "authors")),
    "adaptive=true-is-asam": ("adaptive=true,eta=0.05",
                              lambda m, o, b, s: asam.asam_step(m, per_example, b, o, RHO, 0.05, "authors")),
    # davda54's rule: t = |x| on every parameter, no eta
    "asam-davda54": ("rule=asam,asam_params=davda54",
                     lambda m, o, b, s: asam.asam_step(m, per_example, b, o, RHO, rule="davda54")),
    "sam_on-module": ("rule=sam_on", lambda m, o, b, s: sam_on.samon_step(m, per_example, b, o, RHO, "module")),
    "sam_on-name": ("rule=sam_on,sam_on_params=name",
                    lambda m, o, b, s: sam_on.samon_step(m, per_example, b, o, RHO, "name")),
    "asam_on": ("rule=sam_on,adaptive=true,eta=0.05",
                lambda m, o, b, s: sam_on.samon_step(m, per_example, b, o, RHO, "module", adaptive=True, eta=0.05)),
    "asam_on-davda54": ("rule=sam_on,adaptive=true,asam_params=davda54",
                        lambda m, o, b, s: sam_on.samon_step(m, per_example, b, o, RHO, "module", adaptive=True,
                                                             eta=0.0, normalize_bias=True)),
    "vasso-0.4": ("rule=vasso", lambda m, o, b, s: vasso.vasso_step(m, per_example, b, o, s, RHO, 0.4)),
    "vasso-0.9": ("rule=vasso,theta=0.9", lambda m, o, b, s: vasso.vasso_step(m, per_example, b, o, s, RHO, 0.9)),
    "bisam-log": ("rule=bisam", lambda m, o, b, s: bisam.bisam_step(m, logits_of, _y(b), o, RHO, mu=1.0)),
    "bisam-log-mu4": ("rule=bisam,mu=4", lambda m, o, b, s: bisam.bisam_step(m, logits_of, _y(b), o, RHO, mu=4.0)),
    "bisam-tanh": ("rule=bisam,bisam_bound=tanh,tanh_alpha=0.5",
                   lambda m, o, b, s: bisam.bisam_step(m, logits_of, _y(b), o, RHO, kind="tanh", alpha=0.5)),
}


def _y(b):
    return {**b, "y": b["labels"]}


@pytest.mark.parametrize("case", list(SAM_CASES))
def test_sam_with_each_rule_equals_its_reference(case, plain_sam):
    args, step = SAM_CASES[case]
    check(case, ours("sam", f"rho={RHO},{args}"), reference(step), power_against=plain_sam)


def test_asam_not_bias_rule_equals_its_transcription():
    """asam_params=not_bias (sam_hf's rule before the choice existed): t = |x| + eta on every name not ending in
    bias; it differs from the authors' rule on `shift` (no "weight" in its name)."""
    def step(m, o, b, s):
        named = common.named_trainable(m)
        params = [p for _, p in named]
        t = [torch.ones_like(p) if n.endswith("bias") else p.detach().abs() + 0.05 for n, p in named]
        g = common.gradient(m, per_example, b, params)
        common.base_step(o, params, common.gradient_at(m, per_example, b, params,
                                                       asam.asam_perturbation(t, g, RHO)))
    want = reference(step)
    check("asam-not_bias", ours("sam", f"rho={RHO},rule=asam,asam_params=not_bias,eta=0.05"), want)
    authors = ours("sam", f"rho={RHO},rule=asam,eta=0.05")
    assert gap(authors, want) > 1e-4  # the rules really differ on this model (the `shift` vector)


def test_sam_on_rules_select_different_parameters_here():
    assert gap(ours("sam", f"rho={RHO},rule=sam_on"), ours("sam", f"rho={RHO},rule=sam_on,sam_on_params=name")) > 1e-4


def test_vasso_with_theta_1_is_sam(plain_sam):
    check("vasso-theta1", ours("sam", f"rho={RHO},rule=vasso,theta=1"), plain_sam)


def test_sam_on_with_batchnorm_equals_its_reference():
    """BatchNorm's affine parameters count as normalization parameters; its running statistics follow the clean
    pass only (bn_stats=clean), as the reference's freeze_bn."""
    want = reference(lambda m, o, b, s: sam_on.samon_step(m, per_example, b, o, RHO, "module"), bn=True)
    check("sam_on-bn", ours("sam", f"rho={RHO},rule=sam_on", bn=True), want)


# --------------------------------------------------------------------------------------------------------- mSAM
def msam_step(rule, ascent_fn=None, m_parts=3):
    """mSAM's reference: one perturbation per consecutive micro-batch (sizes differing by at most one), the step's
    gradient the |B_j|/|B|-weighted sum of the perturbed gradients."""
    def step(m, o, b, s):
        named = common.named_trainable(m)
        params = [p for _, p in named]
        total = None
        for part, w in sampa._split(b, m_parts):
            a = common.gradient(m, ascent_fn or per_example, _y(part), params)
            h = common.gradient_at(m, per_example, part, params, rule(named, a, s))
            total = [w * u for u in h] if total is None else [t + w * u for t, u in zip(total, h)]
        common.base_step(o, params, total)
    return step


MSAM_CASES = {
    "msam-asam": ("rule=asam", msam_step(sampa.asam_rule(RHO))),
    "msam-sam_on": ("rule=sam_on", msam_step(sampa.samon_rule(RHO, sam_on.norm_parameter_names(make())))),
    "msam-bisam": ("rule=bisam", msam_step(sampa.sam_rule(RHO),
                                           lambda m, b: bisam.lower_bound(logits_of(m, b), b["labels"]))),
}


@pytest.mark.parametrize("case", list(MSAM_CASES))
def test_msam_with_each_rule_equals_its_reference(case):
    args, step = MSAM_CASES[case]
    check(case, ours("msam", f"rho={RHO},micro_batches=3,{args}"), reference(step))


# -------------------------------------------------------------------------------------------------------- SAMPa
LAM = 0.3


def sampa_reference(rule=None, ascent_loss_fn=None, micro_batches=1, lam=LAM, batches=None):
    def step(m, o, b, s):
        sampa.sampa_step(m, per_example, _y(b), o, s, lam=lam, rule=rule, rho=RHO, ascent_loss_fn=ascent_loss_fn,
                         micro_batches=micro_batches)
    return reference(step, batches=batches)


SAMPA_CASES = {
    "sampa-asam": ("rule=asam", dict(rule=sampa.asam_rule(RHO))),
    "sampa-asam-davda54": ("rule=asam,asam_params=davda54", dict(rule=sampa.asam_rule(RHO, 0.0, "davda54"))),
    "sampa-sam_on": ("rule=sam_on", dict(rule=sampa.samon_rule(RHO, sam_on.norm_parameter_names(make())))),
    "sampa-vasso": ("rule=vasso", dict(rule=sampa.vasso_rule(RHO, 0.4))),
    "sampa-bisam": ("rule=bisam", dict(ascent_loss_fn=lambda m, b: bisam.lower_bound(logits_of(m, b), b["y"]))),
    "sampa-msam3": ("micro_batches=3", dict(micro_batches=3)),
    "sampa-msam3-asam": ("micro_batches=3,rule=asam", dict(micro_batches=3, rule=sampa.asam_rule(RHO))),
    "sampa-msam3-bisam": ("micro_batches=3,rule=bisam",
                          dict(micro_batches=3,
                               ascent_loss_fn=lambda m, b: bisam.lower_bound(logits_of(m, b), b["y"]))),
    # lam = 0: the lambda-term is not computed; micro-batches of 12 samples in 5: 3, 3, 2, 2, 2
    "sampa0-msam5": ("micro_batches=5,lam=0", dict(micro_batches=5, lam=0.0)),
}


@pytest.mark.parametrize("case", list(SAMPA_CASES))
def test_sampa_with_each_rule_equals_its_reference(case):
    args, kw = SAMPA_CASES[case]
    lam = kw.get("lam", LAM)
    args = args if "lam=" in args else f"{args},lam={lam}"
    plain = sampa_reference()
    check(case, ours("sampa", f"rho={RHO},{args}"), sampa_reference(**kw), power_against=plain)


def test_sampa_with_bisam_and_batchnorm_keeps_the_lookahead_statistics():
    """The lower bound's pass at y_{t+1} is the second pass over B_{t+1}: BatchNorm statistics move once, in the
    first (the reference freezes them in its second pass too)."""
    kw = dict(ascent_loss_fn=lambda m, b: bisam.lower_bound(logits_of(m, b), b["y"]))
    want = reference(lambda m, o, b, s: sampa.sampa_step(m, per_example, _y(b), o, s, lam=LAM, rho=RHO, **kw), bn=True)
    check("sampa-bisam-bn", ours("sampa", f"rho={RHO},lam={LAM},rule=bisam", bn=True), want)


# ------------------------------------------------------------------------------------------- Asynchronous SAM
def async_reference(rule=None, tau=1, ratio=0.5, ascent="first", seed=0, ascent_loss_fn=None):
    """tests/helpers/family_reference/async_sam.py, with a rule in place of SAM's direction (the same queue and
    ascent rows), and the per-step generator sam_hf documents: seeded with seed * 2^32 + t."""
    def step(m, o, b, s):
        t = s.get("t", 0)
        s["t"] = t + 1
        named = common.named_trainable(m)
        params = [p for _, p in named]
        queue = s.setdefault("queue", [])
        n = b["x"].shape[0]
        g = torch.Generator().manual_seed(seed * 2**32 + t)
        rows = async_sam.ascent_rows(n, ratio, ascent, g)
        sub = {k: v[rows] for k, v in b.items()}
        a_t = common.gradient(m, ascent_loss_fn or per_example, sub, params)
        if len(queue) >= tau:
            e = (rule or (lambda named, a, st: common.direction(a, RHO)))(named, queue[0], s.setdefault("rule", {}))
        else:
            e = [torch.zeros_like(p) for p in params]
        common.base_step(o, params, common.gradient_at(m, per_example, b, params, e))
        queue.append(a_t)
        del queue[:-tau]
    return reference(step)


def test_async_reference_here_is_the_family_one():
    """The rule-aware transcription above, with SAM's rule, is tests/helpers/family_reference/async_sam.py itself."""
    def family(m, o, b, s):
        async_sam.async_sam_step(m, per_example, b, o, s, RHO, tau=2, ratio=0.5)
    assert gap(reference(family), async_reference(tau=2)) == 0.0


ASYNC_CASES = {
    "async-tau2": ("staleness=2", dict(tau=2)),
    "async-tau3-r1": ("staleness=3,ascent_batch_ratio=1", dict(tau=3, ratio=1.0)),
    "async-random": ("ascent_samples=random", dict(ascent="random")),
    "async-random-seed7-tau2": ("ascent_samples=random,ascent_seed=7,staleness=2",
                                dict(ascent="random", seed=7, tau=2)),
    "async-asam": ("rule=asam", dict(rule=sampa.asam_rule(RHO))),
    "async-sam_on": ("rule=sam_on", dict(rule=sampa.samon_rule(RHO, sam_on.norm_parameter_names(make())))),
    "async-vasso": ("rule=vasso", dict(rule=sampa.vasso_rule(RHO, 0.4))),
    "async-vasso-tau2": ("rule=vasso,staleness=2", dict(rule=sampa.vasso_rule(RHO, 0.4), tau=2)),
    "async-bisam": ("rule=bisam", dict(ascent_loss_fn=lambda m, b: bisam.lower_bound(logits_of(m, b), b["labels"]))),
}


@pytest.mark.parametrize("case", list(ASYNC_CASES))
def test_asyncsam_with_each_rule_and_option_equals_its_reference(case):
    args, kw = ASYNC_CASES[case]
    ratio = kw.get("ratio", 0.5)
    args = args if "ratio" in args else f"{args},ascent_batch_ratio={ratio}"
    check(case, ours("asyncsam", f"rho={RHO},{args}"), async_reference(**kw), power_against=async_reference())


def test_random_ascent_rows_differ_from_the_first_rows():
    assert gap(ours("asyncsam", f"rho={RHO},ascent_batch_ratio=0.5"),
               ours("asyncsam", f"rho={RHO},ascent_batch_ratio=0.5,ascent_samples=random")) > 1e-4


# --------------------------------------------------------------------------------------------------- float64
def test_float64_sam_and_sampa_stay_float64(plain_sam):
    """A float64 model's directions, held gradients and lookahead stay float64 (fp32 buffers would round them to
    about 1e-8): SAM and SAMPa equal float64 references to round-off."""
    check("sam-fp64", ours("sam", f"rho={RHO}"), plain_sam)
    check("sampa-fp64", ours("sampa", f"rho={RHO},lam={LAM}"), sampa_reference())
    check("asyncsam-fp64", ours("asyncsam", f"rho={RHO},ascent_batch_ratio=0.5"), async_reference())


# --------------------------------------------------------------------------------------------------- rho -> 0
RHO0_CASES = [("sam", "rule=asam"), ("sam", "rule=sam_on"), ("sam", "rule=vasso"), ("sam", "rule=bisam"),
              ("msam", "rule=bisam,micro_batches=3"), ("asyncsam", "rule=vasso,staleness=2"),
              ("asyncsam", "rule=bisam,ascent_samples=random,ascent_batch_ratio=0.5"),
              ("sampa", "rule=bisam,lam=0"), ("sampa", "micro_batches=3,lam=0"), ("sampa", "rule=vasso,lam=0")]


@pytest.mark.parametrize("optim,args", RHO0_CASES, ids=[f"{o}-{a}" for o, a in RHO0_CASES])
def test_rho_to_zero_is_the_base_optimizer(optim, args, plain_sgd):
    """rho = 1e-9: every rule's perturbation is O(rho), so the weights are the base optimizer's to about 1e-8 (SAMPa
    with lam = 0: one step later, its first step computes g_0 only)."""
    batches = data()
    got = ours(optim, f"rho=1e-9,{args}", batches=batches)
    want = plain_sgd if optim != "sampa" else reference(
        lambda m, o, b, s: common.base_step(o, common.trainable(m), common.gradient(m, per_example, b)),
        batches=batches[:-1])
    assert gap(got, want) < 1e-7


# --------------------------------------------------------------------------------------------------- resume
RESUME_CASES = [("sam", "rule=vasso"), ("sampa", "rule=vasso"), ("sampa", "rule=bisam"),
                ("sampa", "micro_batches=3,rule=asam"), ("asyncsam", "staleness=2,ascent_samples=random"),
                ("asyncsam", "rule=vasso,staleness=2")]


@pytest.mark.parametrize("optim,args", RESUME_CASES, ids=[f"{o}-{a}" for o, a in RESUME_CASES])
def test_resume_from_state_dict_equals_never_stopping(optim, args):
    """VaSSO's average, SAMPa's held directions and Asynchronous SAM's queue travel in state_dict()."""
    full = ours(optim, f"rho={RHO},{args}")
    _, saved = ours(optim, f"rho={RHO},{args}", save_at=3)
    resumed = ours(optim, f"rho={RHO},{args}", model=Net().double(), resume=saved)
    assert gap(full, resumed) == 0.0
    state = saved["optim"]["sam_hf"]
    if "vasso" in args:
        assert state["rule"]["d"] is not None
    if "staleness=2" in args:
        assert len(state["older"]) == 1


# --------------------------------------------------------------------------------------------------- options
BAD = [
    ("sam", "rule=sam,adaptive=true", ["adaptive=true is ASAM", "rule=sam"]),
    ("sam", "rule=asam,adaptive=false", ["adaptive=false", "drop adaptive"]),
    ("sam", "rule=vasso,adaptive=true", ["rule=vasso", "no paper"]),
    ("sam", "rule=sam,theta=0.5", ["theta=0.5", "rule=vasso", "drop theta"]),
    ("sam", "rule=asam,mu=2", ["mu=2.0", "rule=bisam"]),
    ("sam", "eta=0.1", ["eta=0.1", "rule=asam", "drop eta"]),
    ("sam", "rule=asam,asam_params=davda54,eta=0.1", ["eta=0.1", "davda54's rule has no eta"]),
    ("sam", "rule=sam_on,asam_params=davda54", ["asam_params=davda54", "adaptive=true"]),
    ("sam", "rule=bisam,tanh_alpha=0.5", ["tanh_alpha=0.5", "bisam_bound=tanh"]),
    ("sam", "rule=vasso,theta=0", ["theta=0.0", "(0, 1]"]),
    ("sam", "rule=bisam,mu=0", ["mu=0.0", "> 0"]),
    ("sam", "rule=lookahead", ["rule='lookahead'", "sam, asam, sam_on, vasso or bisam"]),
    ("sam", "sync_ascent=false,ascent_group_size=2", ["contradict", "ascent_group_size=1"]),
    ("msam", "rule=vasso,micro_batches=2", ["rule=vasso", "micro_batches=2", "m ascent gradients"]),
    ("sampa", "rule=vasso,micro_batches=2", ["rule=vasso", "micro_batches=2"]),
    ("asyncsam", "staleness=0", ["staleness=0", ">= 1"]),
    ("asyncsam", "ascent_seed=3", ["ascent_seed=3", "ascent_samples=random"]),
    ("asyncsam", "ascent_samples=some", ["ascent_samples='some'", "first or random"]),
    ("sampa", "staleness=2", ["staleness=2", "asyncsam only"]),
    # the efficient variants shape e from the gradient they hand the rule: VaSSO and BiSAM need more of a schedule
    ("looksam", "rule=vasso", ["--optim looksam runs rule in", "not rule=vasso", "--optim asyncsam, msam, sam, sampa"]),
    ("gsam", "rule=bisam", ["not rule=bisam"]),
    ("esam", "rule=sam_on", ["--optim esam runs rule in ['sam', 'asam']"]),
]


@pytest.mark.parametrize("optim,args,needles", BAD, ids=[f"{o}-{a}" for o, a, _ in BAD])
def test_bad_rule_options_are_refused(optim, args, needles):
    with pytest.raises(SharpnessConfigError) as err:
        cfg = SharpnessConfig.from_optim_args(optim, args)
        sam_hf.registry.get(optim).method.check(cfg, sam_hf.distributed.layouts.single_process())
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_rule_spellings():
    cfg = SharpnessConfig.from_optim_args
    assert cfg("sam", "adaptive=true").rule == "asam"
    assert (cfg("sam", "rule=sam_on,adaptive=true").rule, cfg("sam", "rule=sam_on,adaptive=true").scaled) == (
        "sam_on", True)
    assert cfg("sampa", "rule=asam,adaptive=true").rule == "asam"  # the same thing twice is fine
    assert cfg("sam", "").rule == "sam" and not cfg("sam", "").scaled


def test_rules_that_read_names_or_layers_need_the_model():
    model = make()
    for args, needle in [("rule=asam", "pass model="), ("rule=sam_on", "pass model=")]:
        with pytest.raises(SharpnessConfigError, match=needle):
            sam_hf.SharpnessOptimizer(sgd(model), "sam", args)
    sam_hf.SharpnessOptimizer(sgd(model), "sam", "rule=asam,asam_params=davda54")  # reads no names


def test_bisam_reads_the_logits_of_the_outputs_loss_fn_returns():
    """A plain loop's loss_fn may return the model's outputs ({"loss", "logits"}): BiSAM then needs no logits_fn
    (one forward per ascent pass), and trains exactly as with logits_fn."""
    def run(with_outputs: bool):
        model = make()
        opt = sam_hf.SharpnessOptimizer(sgd(model), "sampa", f"rho={RHO},lam={LAM},rule=bisam", model=model)
        for b in data():
            if with_outputs:
                def loss_fn(b):
                    logits = logits_of(model, b)
                    return {"loss": F.cross_entropy(logits, b["labels"]), "logits": logits}
                opt.step(sam_hf.BatchClosure(loss_fn, b))
            else:
                opt.step(sam_hf.BatchClosure(lambda b: per_example(model, b).mean(), b,
                                             logits_fn=lambda b: logits_of(model, b)))
        return model
    assert gap(run(True), run(False)) < TOL


def test_bisam_needs_logits_in_a_plain_loop():
    model = make()
    opt = sam_hf.SharpnessOptimizer(sgd(model), "sam", "rule=bisam", model=model)
    b = data(1)[0]
    with pytest.raises(TypeError, match="needs the model's logits"):
        opt.step(sam_hf.BatchClosure(lambda b: per_example(model, b).mean(), b))
    with pytest.raises(TypeError, match="BatchClosure"):
        opt.step(lambda: per_example(model, b).mean())


def test_sampa_micro_batch_gradients_resume_only_where_each_shard_has_its_own():
    """One process holds the m micro-batch gradients of the whole B_t; 2 data-parallel ranks would each cut their
    half of B_t into m/2 micro-batches of their own: refused, naming the layout (2 -> 2 resumes exactly:
    test_rules_distributed.py)."""
    from sam_hf.distributed.layouts import DataParallel
    from sam_hf.distributed.plan import ParallelPlan
    from sam_hf.methods import SAMPa

    _, saved = ours("sampa", f"rho={RHO},micro_batches=2", save_at=2)
    state = saved["optim"]["sam_hf"]
    assert len(state["a"]) == 2 and "held_parts" in state
    model = make()
    method = SAMPa(SharpnessConfig.from_optim_args("sampa", "micro_batches=2"), sgd(model), model=model,
                   layout=DataParallel(ParallelPlan(mode="data", world_size=2)))
    with pytest.raises(SharpnessConfigError, match="resume on the layout that saved it"):
        method.load_state_dict(state)
