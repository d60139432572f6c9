"""Identities the family references must satisfy (each reduces to SAM or to the base optimizer at one setting).

They keep the references honest when edited; the comparisons with the authors' code are recorded in the
notes of issue 19 (the authors' code stays outside the repository). fp64 throughout, a two-layer MLP; every
identity is exact up to a few ulps (the same operations in the same order), hence the 1e-12 bound.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.helpers.family_reference import aesam, bisam, esam, grouped, gsam, looksam, sam_on, sampa, vasso
from tests.helpers.family_reference.common import base_step, direction, dot, gradient, gradient_at, trainable

TOL = 1e-12
STEPS = 4


class MLP(nn.Module):
    def __init__(self, bn: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.norm1 = nn.LayerNorm(8)
        self.bn1 = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn1(torch.relu(self.norm1(self.fc1(x))))))


def ce(model, b):
    return F.cross_entropy(model(b["x"]), b["y"], reduction="none")


def make(bn=True):
    torch.manual_seed(0)
    return MLP(bn).double()


def batches(n=12, steps=STEPS + 1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, 5, generator=g, dtype=torch.float64), "y": torch.randint(0, 3, (n,), generator=g)}
            for _ in range(steps)]


def run(step, bn=True, data=None):
    model = make(bn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    state = {}
    for b in data or batches():
        step(model, opt, b, state)
    return model


def sam(model, opt, b, state, rho=0.05):
    params = trainable(model)
    g = gradient(model, ce, b, params)
    base_step(opt, params, gradient_at(model, ce, b, params, direction(g, rho)))


def plain(model, opt, b, state):
    base_step(opt, trainable(model), gradient(model, ce, b))


def gap(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(scope="module")
def sam_model():
    return run(sam)


@pytest.mark.parametrize("name, step", [
    ("AE-SAM, threshold -inf", lambda m, o, b, s: aesam.aesam_step(m, ce, b, o, s, STEPS, rho=0.05,
                                                                   lam1=-1e9, lam2=-1e9)),
    ("LookSAM, k = 1", lambda m, o, b, s: looksam.looksam_step(m, ce, b, o, s, k=1, rho=0.05)),
    ("GSAM, alpha = 0", lambda m, o, b, s: gsam.gsam_step(m, ce, b, o, rho=0.05, alpha=0.0)),
    ("ESAM, beta = gamma = 1", lambda m, o, b, s: esam.esam_step(m, ce, b, o, rho=0.05, beta=1.0, gamma=1.0)),
    ("VaSSO, theta = 1", lambda m, o, b, s: vasso.vasso_step(m, ce, b, o, s, rho=0.05, theta=1.0)),
])
def test_reduces_to_sam(sam_model, name, step):
    assert gap(sam_model, run(step)) < TOL, name


def test_aesam_infinite_threshold_is_the_base_optimizer():
    never = run(lambda m, o, b, s: aesam.aesam_step(m, ce, b, o, s, STEPS, lam1=1e9, lam2=1e9))
    assert gap(run(plain), never) < TOL


def test_rules_change_the_step(sam_model):
    """The identities above are not vacuous: away from them each rule moves differently from SAM."""
    for step in (lambda m, o, b, s: looksam.looksam_step(m, ce, b, o, s, k=2, rho=0.05),
                 lambda m, o, b, s: gsam.gsam_step(m, ce, b, o, rho=0.05, alpha=0.5),
                 lambda m, o, b, s: vasso.vasso_step(m, ce, b, o, s, rho=0.05, theta=0.4)):
        assert gap(sam_model, run(step)) > 1e-6


def test_gsam_removes_the_part_orthogonal_to_the_perturbed_gradient():
    g = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    g_p = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    d = gsam.gsam_direction(g, g_p, alpha=0.3)
    g_perp = [(u - v) / 0.3 for u, v in zip(g_p, d)]  # d = g_p - alpha g_perp
    assert abs(float(dot(g_perp, g_p))) < TOL  # g_perp is orthogonal to g_p ...
    resid = [u - w for u, w in zip(g, g_perp)]  # ... and g - g_perp is parallel to it
    cos = dot(resid, g_p) / (torch.sqrt(dot(resid, resid)) * torch.sqrt(dot(g_p, g_p)))
    assert abs(abs(float(cos)) - 1) < TOL


def test_grouped_perturbations():
    """One group of all replicas is SAM on their union; one group per replica is mSAM(m = replicas)."""
    replicas = [batches(n=4, seed=10 + r) for r in range(4)]
    union = [{k: torch.cat([rep[t][k] for rep in replicas]) for k in ("x", "y")} for t in range(STEPS + 1)]
    model, own = make(bn=False), make(bn=False)
    opt, opt_own = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, own))
    msam = make(bn=False)
    opt_msam = torch.optim.SGD(msam.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS + 1):
        grouped.grouped_sam_step(model, ce, [rep[t] for rep in replicas], opt, 0.05)
        grouped.grouped_sam_step(own, ce, [rep[t] for rep in replicas], opt_own, 0.05, sync_perturbations=False)
        params = trainable(msam)
        hs = [gradient_at(msam, ce, rep[t], params, direction(gradient(msam, ce, rep[t], params), 0.05))
              for rep in replicas]
        base_step(opt_msam, params, [sum(h[i] for h in hs) / len(hs) for i in range(len(params))])
    sam_union = make(bn=False)
    opt_sam = torch.optim.SGD(sam_union.parameters(), lr=0.1, momentum=0.9)
    for b in union:
        sam(sam_union, opt_sam, b, {})
    assert gap(sam_union, model) < TOL
    assert gap(msam, own) < TOL


def test_samon_selects_normalization_parameters_both_ways():
    model = make()
    expected = {"norm1.weight", "norm1.bias", "bn1.weight", "bn1.bias"}
    assert sam_on.norm_parameter_names(model, "module") == sam_on.norm_parameter_names(model, "name") == expected


def test_sampa_rules_reduce_to_the_sam_rule():
    data = batches()
    base = run(lambda m, o, b, s: sampa.sampa_step(m, ce, b, o, s, lam=0.2, rho=0.1), bn=False, data=data)
    names = {n for n, _ in make(bn=False).named_parameters()}
    for rule in (sampa.vasso_rule(0.1, theta=1.0), sampa.samon_rule(0.1, names)):
        other = run(lambda m, o, b, s, rule=rule: sampa.sampa_step(m, ce, b, o, s, lam=0.2, rule=rule),
                    bn=False, data=data)
        assert gap(base, other) < TOL


def test_bisam_surrogate_shape():
    z = torch.tensor([[0.0, -50.0, 50.0]], dtype=torch.float64)
    phi = bisam.phi(z)
    assert abs(float(phi[0, 0])) < TOL and float(phi[0, 2]) == pytest.approx(1.0, abs=1e-12)
    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    q1 = bisam.lower_bound(logits, y, mu=3.0)
    q2 = bisam.lower_bound(logits, y, mu=3.0, paper_scale=False)
    assert torch.allclose(3.0 * q1, q2, rtol=0, atol=TOL)
