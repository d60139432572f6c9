"""Edge cases a real run meets: label smoothing, an epoch's short last batch, a second train() call,
the units of the logged loss, and combinations refused before training."""

import pytest
import torch
from torch import nn

import sam_hf
from sam_hf.parallel import ParallelPlan
from tiny import METHOD_CASES, MeanLossModel, args, text_data, tiny_bert, vector_data


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
    trainer = sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=vector_data(),
                                      args=args(tmp_path, "sampa", "rho=0.1", max_steps=2))
    trainer.train()
    trainer.train()
    assert trainer.state.global_step == 2


def test_torch_compile_and_trl_are_refused_on_several_processes(tmp_path):
    trainer = sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=vector_data(),
                                      args=args(tmp_path, "sam", "rho=0.1"))
    two = ParallelPlan(mode="data", world_size=2)
    trainer.args.torch_compile = True
    with pytest.raises(sam_hf.SharpnessConfigError, match="--torch_compile on 2 processes"):
        trainer._check_world(trainer.sharpness_config, two)
    trainer.args.torch_compile = False
    trainer._check_world(trainer.sharpness_config, two)  # a plain trainer on 2 processes is fine

    trl = pytest.importorskip("trl")
    fake_trl_trainer = type("FakeTRL", (sam_hf.SharpnessTrainer,), {})
    fake_trl_trainer.__module__ = trl.__name__ + ".trainer.fake"
    trainer.__class__ = fake_trl_trainer
    with pytest.raises(sam_hf.SharpnessConfigError, match="TRL trainer runs in one process only"):
        trainer._check_world(trainer.sharpness_config, two)


def test_broadcasts_go_in_bounded_buckets_per_dtype(monkeypatch):
    # the start-up weight broadcast must not need a second copy of a large model at once
    from sam_hf import parallel

    sent = []

    class Done:
        def wait(self, timeout=None):
            pass

    def fake_broadcast(flat, src, async_op):
        sent.append((flat.dtype, flat.numel()))
        flat.add_(1.0)  # what rank 0's values look like on arrival
        return Done()

    monkeypatch.setattr(parallel.dist, "broadcast", fake_broadcast)
    monkeypatch.setattr(parallel, "BROADCAST_BUCKET_BYTES", 64)
    tensors = [torch.zeros(8), torch.zeros(8), torch.zeros(4, dtype=torch.float64), torch.zeros(20),
               torch.zeros(3, dtype=torch.float64)]
    parallel.broadcast_tensors(ParallelPlan(world_size=2), tensors, 0, "a test")
    assert sent == [(torch.float32, 16), (torch.float64, 7), (torch.float32, 20)]
    assert all(bool((t == 1.0).all()) for t in tensors)  # every tensor received its values in place
