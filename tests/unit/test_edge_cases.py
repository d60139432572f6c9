"""Edge cases a real run meets: label smoothing, an epoch's short last batch, a second train() call,
the units of the logged loss, and combinations refused before training."""

import copy

import pytest
import torch
from torch import nn

import sam_hf
from sam_hf.distributed.layouts import DataParallel, Roles
from sam_hf.distributed.plan import ParallelPlan
from tests.helpers.tiny import METHOD_CASES, MeanLossModel, args, text_data, tiny_bert, vector_data


@pytest.mark.parametrize("case", ["sam", "msam", "sampa", "asyncsam"])
def test_label_smoothing_keeps_the_labels_for_every_pass(tmp_path, case):
    # Trainer's compute_loss pops "labels" when a label smoother is set; the second pass (and SAMPa's held
    # batch on the next step) must still have them.
    optim, optim_args = METHOD_CASES[case]
    trainer = sam_hf.SharpnessTrainer(model=tiny_bert(), train_dataset=text_data(),
                                      args=args(tmp_path, optim, optim_args, max_steps=3, label_smoothing_factor=0.1))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "sam/perturbed_loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(h["sam/perturbed_loss"])) for h in logged)


def test_msam_on_a_short_last_batch_uses_one_micro_batch_per_sample(tmp_path):
    # 36 samples in batches of 8: the fifth step has 4 samples, fewer than micro_batches=8
    model = MeanLossModel()
    trainer = sam_hf.SharpnessTrainer(model=model, train_dataset=vector_data(n=36),
                                      args=args(tmp_path, "msam", "rho=0.1,micro_batches=8", max_steps=6))
    trainer.train()
    assert trainer.state.global_step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_asyncsam_logs_the_mean_loss_of_its_ascent_batch(tmp_path):
    model, data = MeanLossModel(), vector_data()
    start = MeanLossModel()
    trainer = sam_hf.SharpnessTrainer(
        model=model, train_dataset=data,
        args=args(tmp_path, "asyncsam", "rho=0.1,ascent_batch_ratio=0.5", max_steps=1,
                  train_sampling_strategy="sequential"))
    trainer.train()
    first = data[:4]  # A_0: the first ceil(0.5 * 8) samples of the first batch, at x_0
    expected = start(torch.tensor(first["x"]), torch.tensor(first["labels"]))["loss"].item()
    logged = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert abs(logged - expected) < 1e-5, (logged, expected)


def test_a_second_train_call_continues(tmp_path):
    """A second train() continues from where the first left the model, the base optimizer and the method: the
    same optimizer (not wrapped again), AdamW's step count going on, SAMPa's g_t kept (no second skipped first
    step), the weights moving on. A restart (a new optimizer or method) would fail each of these."""
    model = MeanLossModel()
    trainer = sam_hf.SharpnessTrainer(model=model, train_dataset=vector_data(),
                                      args=args(tmp_path, "sampa", "rho=0.1", max_steps=2, logging_steps=1))
    trainer.train()
    first = trainer._sharpness_optimizer
    after_first = [p.detach().clone() for p in model.parameters()]
    assert [int(s["step"]) for s in first.base.state.values()] == [1] * 4  # 2 steps, the first one skipped
    trainer.train()
    assert trainer._sharpness_optimizer is first and trainer.optimizer.optimizer is first
    assert [int(s["step"]) for s in first.base.state.values()] == [3] * 4  # both steps of the second call update
    assert sum(h.get("sam/skipped_update", 0.0) for h in trainer.state.log_history) == 0.0  # second call's log
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), after_first))


def test_batch_rebalance_is_refused_in_role_mode(tmp_path):
    """transformers' batch_rebalance sampler shards by rank itself: the two roles would read different batches."""
    trainer = sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=vector_data(),
                                      args=args(tmp_path, "sampa", "rho=0.1", train_sampling_strategy="batch_rebalance"))
    roles = Roles(ParallelPlan(mode="roles", world_size=2, dp_size=1))
    with pytest.raises(sam_hf.SharpnessConfigError, match="batch_rebalance.*group_by_length.*parallel=off"):
        roles.check_trainer(trainer)
    DataParallel(ParallelPlan(mode="data", world_size=2)).check_trainer(trainer)  # data parallel: fine


def test_broadcasts_go_in_bounded_buckets_per_dtype(monkeypatch):
    # the start-up weight broadcast must not need a second copy of a large model at once
    from sam_hf.distributed import collectives

    sent = []

    class Done:
        def wait(self, timeout=None):
            pass

    def fake_broadcast(flat, src, async_op, group=None):
        sent.append((flat.dtype, flat.numel()))
        flat.add_(1.0)  # what rank 0's values look like on arrival
        return Done()

    monkeypatch.setattr(collectives.dist, "broadcast", fake_broadcast)
    monkeypatch.setattr(collectives, "BROADCAST_BUCKET_BYTES", 64)
    tensors = [torch.zeros(8), torch.zeros(8), torch.zeros(4, dtype=torch.float64), torch.zeros(20),
               torch.zeros(3, dtype=torch.float64)]
    collectives.broadcast_tensors(ParallelPlan(world_size=2), tensors, 0, "a test")
    assert sent == [(torch.float32, 16), (torch.float64, 7), (torch.float32, 20)]
    assert all(bool((t == 1.0).all()) for t in tensors)  # every tensor received its values in place


# --------------------------------------------------------------------------- a term whose weight is 0


@pytest.mark.parametrize("lam,bad", [(0.0, "g_next"), (1.0, "g_tilde")])
def test_sampa_a_non_finite_term_of_weight_zero_stays_out_of_g(lam, bad):
    """G = (1 - lam) g~_t + lam g_{t+1}: with lam = 0 a non-finite g_{t+1} (or with lam = 1 a non-finite g~_t) is
    not computed into G (0 * inf would be NaN); the kept term passes through unchanged."""
    from sam_hf.methods import SAMPa

    model = MeanLossModel()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    method = SAMPa(sam_hf.SharpnessConfig.create("sampa", lam=lam), opt)
    good = [torch.randn_like(p) for p in method.params]
    nonfinite = [torch.full_like(p, float("inf")) for p in method.params]
    method.g = [torch.ones_like(p) for p in method.params]  # not the first step
    g_tilde, g_next = (good, nonfinite) if bad == "g_next" else (nonfinite, good)
    method.finish([t.clone() for t in g_tilde], [t.clone() for t in g_next], [{}], {}, 1.0)
    for p, want in zip(method.params, good):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- the lookahead is the optimizer's step


@pytest.mark.parametrize("kind", ["single", "foreach", "fused", "amsgrad", "adam_l2"])
def test_adam_lookahead_is_the_optimizers_own_step(kind):
    """ModelUpdate in closed form equals the step torch takes from the same state, with bias corrections in
    float64 as torch computes them (they were float32: ~1e-5 relative off), here after 30 steps."""
    from sam_hf.methods.lookahead import apply_lookahead_

    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    options = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True),
               "amsgrad": dict(amsgrad=True, foreach=False), "adam_l2": dict(foreach=False)}[kind]
    cls = torch.optim.Adam if kind == "adam_l2" else torch.optim.AdamW
    opt = cls(model.parameters(), lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), **options)
    for _ in range(30):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    grads = {p: torch.randn_like(p) for p in model.parameters()}
    stepped = {id(p): p.detach().clone() for p in model.parameters()}
    twin = torch.optim.AdamW if cls is torch.optim.AdamW else torch.optim.Adam
    # the real step, on copies of the weights and the state
    copies = [p.detach().clone().requires_grad_() for p in model.parameters()]
    real = twin(copies, lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), **options)
    real.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict alone would share the state tensors
    for c, p in zip(copies, model.parameters()):
        c.grad = grads[p].clone()
    real.step()
    apply_lookahead_(opt, grads, "optimizer")
    for c, p in zip(copies, model.parameters()):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=0, atol=1e-7 if kind in ("fused", "foreach") else 0)
        assert not torch.equal(p.detach(), stepped[id(p)])  # it moved
    assert all(int(s["step"]) == 30 for s in opt.state.values())  # the state is untouched


# --------------------------------------------------------------------------- ASAM leaves biases unscaled


def test_asam_rescales_weights_not_biases(tmp_path):
    """e = rho T^2 g/||T g|| with T = |w| + eta on weights and T = 1 on biases, as the ASAM authors' code does."""
    from sam_hf.methods.rules import AscentRule

    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    params = [lin.weight, lin.bias]
    grads = [torch.randn_like(p) for p in params]
    before = [p.detach().clone() for p in params]
    cfg = sam_hf.SharpnessConfig.create("sam", rho=0.5, adaptive=True, eta=0.1)
    AscentRule(cfg, sam_hf.distributed.layouts.Layout(), names=["weight", "bias"]).perturb_(params, grads)
    T = [before[0].abs() + 0.1, torch.ones_like(before[1])]
    norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(T, grads)))
    for p, b, t, g in zip(params, before, T, grads):
        torch.testing.assert_close(p.detach() - b, 0.5 * t * t * g / norm, rtol=1e-5, atol=1e-7)
