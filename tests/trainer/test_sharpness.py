"""Hessian sharpness (sam_hf.sharpness): exact against dense Hessians (float64), weighted over uneven batches,
adapters only under PEFT; in the training loop it logs through Trainer and changes nothing, on 1 process or
2 (sharded sample, same figure on every rank); from `sam-hf launch --sharpness_every` and `sam-hf sharpness`."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, default_data_collator

import sam_hf
from sam_hf import launch, measure_sharpness
from sam_hf.sharpness import cli as sharpness_cli
from sam_hf.trainer import integration
from tests.helpers import dist_sharpness, processes
from tests.helpers.tiny import MeanLossModel, args, text_data, tiny_bert, vector_data

SCRIPTS = processes.ROOT / "tests" / "helpers"  # hf_example.py: a user's script, run by path


# ---- exactness against torch.autograd.functional.hessian ---------------------------------------------------------
def flat_loss(model: nn.Module, loss):
    """(f, x): f(x) = loss(model with its trainable parameters set to the flat vector x), x their values now."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(x):
        values, start = {}, 0
        for n, s in zip(names, shapes):
            values[n] = x[start:start + s.numel()].view(s)
            start += s.numel()
        return loss(lambda *a, **k: torch.func.functional_call(model, values, a, k))

    return f, flat


def dense_hessian(model: nn.Module, loss) -> torch.Tensor:
    """The Hessian of loss(model) w.r.t. the trainable parameters, flattened in parameter order."""
    f, flat = flat_loss(model, loss)
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        return torch.autograd.functional.hessian(f, flat)


def reference_product(model: nn.Module, loss, v: torch.Tensor) -> torch.Tensor:
    """H v by torch.autograd.functional.hvp on the flattened parameters (for models too big for dense_hessian)."""
    f, flat = flat_loss(model, loss)
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hvp(f, flat, v)[1]


def descending_eigenvalues(h: torch.Tensor) -> list[float]:
    return torch.linalg.eigvalsh(h).flip(0).tolist()


def softmax_regression():
    torch.manual_seed(0)
    return nn.Linear(6, 3).double()


def tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


CASES = {"convex": (softmax_regression, 6), "nonconvex": (tanh_mlp, 5)}


def data(dim, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * 2, torch.randint(0, 3, (n,), generator=g)


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("case", list(CASES))
def test_top_eigenvalues_match_the_dense_hessian(case):
    build, dim = CASES[case]
    model = build()
    x, y = data(dim)
    h = dense_hessian(model, lambda m: nn.functional.cross_entropy(m(x), y))
    exact = descending_eigenvalues(h)
    if case == "nonconvex":
        assert exact[-1] < -1e-3 * exact[0]  # indefinite: negative curvature present
    got = measure_sharpness(model, [(x, y)], loss_fn=ce, top_k=3)
    assert abs(got["lambda_max"] - exact[0]) <= 1e-3 * abs(exact[0])
    assert got["top_eigenvalues"] == sorted(got["top_eigenvalues"], reverse=True)
    assert max(abs(a - b) for a, b in zip(got["top_eigenvalues"], exact[:3])) <= 1e-2 * abs(exact[0])
    assert got["trace"] is None and got["num_samples"] == 40 and got["num_parameters"] == h.shape[0]
    assert 0 < got["hessian_vector_products"] < 200


@pytest.mark.parametrize("case", list(CASES))
def test_hutchinson_trace(case):
    build, dim = CASES[case]
    model = build()
    x, y = data(dim)
    exact = torch.trace(dense_hessian(model, lambda m: nn.functional.cross_entropy(m(x), y))).item()
    got = measure_sharpness(model, [(x, y)], loss_fn=ce, trace_samples=2000, seed=3)
    assert abs(got["trace"] - exact) <= 0.05 * abs(exact)
    assert abs(got["trace"] - exact) <= 4 * got["trace_stderr"]
    a, b = (measure_sharpness(model, [(x, y)], loss_fn=ce, trace_samples=20, seed=3) for _ in range(2))
    assert a["trace"] == b["trace"] and a["lambda_max"] == b["lambda_max"]  # seeded


def test_kept_graphs_give_the_same_products():
    """A product through each batch's kept gradient graph is bitwise the product rebuilt from a forward and two
    backwards (the old path, graph_memory=0), also when only some graphs fit; both are H v of the whole batch by
    torch.autograd.functional.hvp."""
    from sam_hf.sharpness.batches import model_loss
    from sam_hf.sharpness.hessian import HessianOperator
    from sam_hf.sharpness.state import math_attention, preserved_state

    model = tiny_bert().double()
    dataset = text_data(n=12)
    cuts = [(0, 5), (5, 7), (7, 12)]
    batches = [default_data_collator([dataset[i] for i in range(a, b)]) for a, b in cuts]
    whole = default_data_collator([dataset[i] for i in range(12)])
    with preserved_state(model), math_attention():
        kept = HessianOperator(model, batches, model_loss)
        kept.matvec(np.zeros(kept.n))  # builds and keeps every graph
        assert all(g is not None for g in kept.graphs) and kept.kept_bytes == sum(kept.graph_bytes) > 0
        some = HessianOperator(model, batches, model_loss, graph_memory=kept.graph_bytes[0])
        rebuilt = HessianOperator(model, batches, model_loss, graph_memory=0)
        vectors = np.random.default_rng(0).standard_normal((3, kept.n))
        for v in vectors:
            products = [op.matvec(v) for op in (kept, some, rebuilt)]
            assert all(np.array_equal(products[0], p) for p in products[1:])
            reference = reference_product(model, lambda m: m(**whole).loss, torch.from_numpy(v)).numpy()
            # float64 round-off: eps (2.2e-16) times the operations behind an entry (< 1e5 here) is < 2.2e-11 of
            # the size of its terms; 1e-9 of the largest entry leaves a factor 45 for cancellation among them
            np.testing.assert_allclose(products[0], reference, rtol=0, atol=1e-9 * np.abs(reference).max())
        assert [g is not None for g in some.graphs] == [True, False, False]
        assert rebuilt.kept_bytes == 0 and not any(g is not None for g in rebuilt.graphs)
        kept.release()
        assert kept.kept_bytes == 0 and not any(g is not None for g in kept.graphs)


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_equals_the_old_path(case):
    """The defaults (kept graphs, tol 1e-3 for lambda_max alone, few Lanczos vectors) against the old path
    (graphs rebuilt, tol 1e-4, ncv 20) and the dense Hessian: ARPACK stops when a Ritz value's residual is
    <= tol |theta|, which puts an eigenvalue within tol |theta| of it; so each figure is within its tol of
    lambda_max, and the two within the sum. Kept graphs alone change nothing: with the old settings, the
    figures are bitwise the old path's."""
    build, dim = CASES[case]
    model = build()
    x, y = data(dim)
    exact = descending_eigenvalues(dense_hessian(model, lambda m: nn.functional.cross_entropy(m(x), y)))[0]
    old = measure_sharpness(model, [(x[:15], y[:15]), (x[15:], y[15:])], loss_fn=ce, tol=1e-4, ncv=20,
                            graph_memory=0)
    kept = measure_sharpness(model, [(x[:15], y[:15]), (x[15:], y[15:])], loss_fn=ce, tol=1e-4, ncv=20)
    assert kept["lambda_max"] == old["lambda_max"] and kept["hessian_vector_products"] == old["hessian_vector_products"]
    fast = measure_sharpness(model, [(x[:15], y[:15]), (x[15:], y[15:])], loss_fn=ce)
    assert abs(fast["lambda_max"] - exact) <= 1e-3 * abs(fast["lambda_max"])
    assert abs(old["lambda_max"] - exact) <= 1e-4 * abs(old["lambda_max"])
    assert abs(fast["lambda_max"] - old["lambda_max"]) <= 1.1e-3 * abs(exact)
    assert fast["hessian_vector_products"] <= old["hessian_vector_products"]


def test_by_length_sorts_text_only():
    from sam_hf.sharpness.batches import by_length

    examples = [{"input_ids": [1] * n, "labels": i} for i, n in enumerate([3, 1, 2, 1])]
    assert [e["labels"] for e in by_length(examples)] == [1, 3, 2, 0]  # stable
    vectors = [{"x": [0.0] * n} for n in (3, 1)]
    assert by_length(vectors) == vectors and by_length([]) == []


def test_uneven_batches_weigh_by_their_size():
    """Batches of 1, 4 and 7 examples: the Hessian of the mean loss over all 12 examples, not of the mean of
    three batch means."""
    model = MeanLossModel().double()
    x, y = data(6, n=12, seed=1)
    cuts = [(0, 1), (1, 5), (5, 12)]
    batches = [{"x": x[a:b], "labels": y[a:b]} for a, b in cuts]  # the model's own loss (the default loss_fn)
    exact = descending_eigenvalues(dense_hessian(model, lambda m: m(x=x, labels=y)["loss"]))
    got = measure_sharpness(model, batches, top_k=2, tol=0)
    np.testing.assert_allclose(got["top_eigenvalues"], exact[:2], rtol=1e-9)
    unweighted = descending_eigenvalues(sum(dense_hessian(model, lambda m, a=a, b=b: m(x=x[a:b], labels=y[a:b])["loss"])
                                            for a, b in cuts) / 3)
    assert abs(unweighted[0] - exact[0]) > 1e-3 * exact[0]  # the weighting matters here


def test_peft_measures_the_adapters_only():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_bert().double(), cfg)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapters' Hessian less special
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    batch = default_data_collator([text_data(n=8)[i] for i in range(8)])
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n in adapters)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    exact = descending_eigenvalues(dense_hessian(model, lambda m: m(**batch).loss))
    got = measure_sharpness(model, [batch])
    assert got["num_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(got["lambda_max"] - exact[0]) <= 1e-3 * abs(exact[0])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_measuring_restores_the_training_state():
    """Whatever the loss function does (train mode, random draws, a backward into .grad, BatchNorm updates),
    modes, RNG states, BatchNorm statistics and gradients are as before; the loss sees eval mode."""
    model = MeanLossModel(batchnorm=True)
    model.train()
    x, y = data(6, n=16)
    x = x.float()
    model(x=x, labels=y)["loss"].backward()
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    model.net[0].bias.grad = None  # a missing gradient stays missing
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    seen = []

    def meddling_loss(m, batch):
        seen.append(m.training)
        m.train()
        torch.rand(3), random.random(), np.random.rand()
        loss = m(**batch)["loss"]
        loss.backward(retain_graph=True)  # accumulates into .grad
        return loss

    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    measure_sharpness(model, [{"x": x, "labels": y}], loss_fn=meddling_loss, trace_samples=2)
    assert seen and not seen[0]  # measured in eval mode
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(np.random.get_state(), states[2]))
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert {n: m.training for n, m in model.named_modules()} == modes
    for n, p in model.named_parameters():
        if n == "net.0.bias":
            assert p.grad is None
        else:
            assert p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1])


def test_bad_values_name_the_key():
    model = MeanLossModel()
    batch = {"x": torch.randn(4, 6), "labels": torch.tensor([0, 1, 2, 0])}
    for kwargs, key in [(dict(top_k=0), "top_k=0"), (dict(trace_samples=-1), "trace_samples=-1"),
                        (dict(top_k=200), "top_k=200"), (dict(tol=2.0), "tol=2.0")]:
        with pytest.raises(ValueError, match=key):
            measure_sharpness(model, [batch], **kwargs)
    with pytest.raises(ValueError, match="no scalar loss"):
        measure_sharpness(model, [{"x": batch["x"]}])
    for kwargs, key in [(dict(every=0), "every=0"), (dict(every=2, samples=0), "samples=0"),
                        (dict(every=2, top_k=0), "top_k=0"), (dict(every="5"), "every='5'")]:
        with pytest.raises(ValueError, match=key):
            sam_hf.SharpnessCallback(**kwargs)


# ---- in the training loop --------------------------------------------------------------------------------------
class Recorder(TrainerCallback):
    """What reaches Trainer's other callbacks (TensorBoard, W&B, the progress bar) through on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def sample_batch(dataset, indices):
    return default_data_collator([dataset[i] for i in indices])


def test_callback_logs_through_trainer(tmp_path):
    """AdamW (no sam_hf optimizer): every 2 steps and at the end; the last figure is the final model's on the
    callback's fixed sample."""
    dataset, recorder = vector_data(n=40), Recorder()
    callback = sam_hf.SharpnessCallback(every=2, samples=20, top_k=2, trace_samples=5, seed=1)
    model = MeanLossModel()
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=5), train_dataset=dataset,
                      callbacks=[recorder])
    trainer.add_callback(callback)  # added after construction: found through the model
    trainer.train()
    logged = [h for h in trainer.state.log_history if "sharpness/lambda_max" in h]
    assert [h["step"] for h in logged] == [2, 4, 5]
    assert all({"sharpness/lambda_2", "sharpness/trace", "sharpness/seconds"} <= h.keys() for h in logged)
    assert [r for r in recorder.logs if "sharpness/lambda_max" in r] == \
        [{k: v for k, v in h.items() if k != "step"} for h in logged]
    assert len(callback.indices) == 20 and len(set(callback.indices)) == 20
    final = measure_sharpness(model, [sample_batch(dataset, callback.indices)], top_k=2, seed=1)
    np.testing.assert_allclose(logged[-1]["sharpness/lambda_max"], final["lambda_max"], rtol=1e-5)
    np.testing.assert_allclose(logged[-1]["sharpness/lambda_2"], final["top_eigenvalues"][1], rtol=1e-4)
    assert logged[0]["sharpness/lambda_max"] != logged[1]["sharpness/lambda_max"]


def test_measuring_time_is_logged_apart_from_training(tmp_path):
    """Trainer's train_runtime (and so train_steps_per_second) includes the measurements made during training:
    their cumulative time is logged as sharpness/total_seconds, so training's own speed can be read off."""
    callback = sam_hf.SharpnessCallback(every=2, samples=12)
    trainer = Trainer(model=MeanLossModel(), args=args(tmp_path, max_steps=5), train_dataset=vector_data(n=40),
                      callbacks=[callback])
    trainer.train()
    history = trainer.state.log_history
    logged = [h for h in history if "sharpness/lambda_max" in h]
    seconds = [h["sharpness/seconds"] for h in logged]
    totals = [h["sharpness/total_seconds"] for h in logged]
    assert totals == pytest.approx(np.cumsum(seconds), abs=2e-3)
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    during = [h for h in logged if h["step"] < 5]  # steps 2 and 4; the one at the end runs after Trainer's figures
    assert runtime >= during[-1]["sharpness/total_seconds"] - 2e-3
    assert history.index(logged[-1]) > next(i for i, h in enumerate(history) if "train_runtime" in h)
    assert "sharpness/total_seconds" in (sam_hf.SharpnessCallback.__doc__ or "")
    assert "train_steps_per_second" in (sam_hf.SharpnessCallback.__doc__ or "")


def test_mixed_precision_is_measured_in_full_precision(tmp_path):
    """Under bf16 Trainer's accelerate wraps model.forward in autocast; the callback measures the fp32 loss
    (a bf16 Hessian differs by ~1e-3 here)."""
    dataset, callback = text_data(n=32), sam_hf.SharpnessCallback(every=2, samples=16)
    model = tiny_bert()
    trainer = Trainer(model=model, args=args(tmp_path, bf16=True, max_steps=2), train_dataset=dataset,
                      callbacks=[callback])
    trainer.train()
    assert "_original_forward" in model.__dict__  # the autocast wrapper is in place, and stays
    logged = [h for h in trainer.state.log_history if "sharpness/lambda_max" in h]
    plain = tiny_bert()
    plain.load_state_dict(model.state_dict())
    fp32 = measure_sharpness(plain, [sample_batch(dataset, callback.indices)])
    np.testing.assert_allclose(logged[-1]["sharpness/lambda_max"], fp32["lambda_max"], rtol=1e-5)


def dropout_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(cfg)


def masking_collator(features):
    """Masks random tokens (as an MLM collator does): building the callback's sample draws from the RNG."""
    batch = default_data_collator(features)
    batch["input_ids"] = batch["input_ids"].masked_fill(torch.rand(batch["input_ids"].shape) < 0.2, 0)
    return batch


# name: (model, data, collator, optim, optim_args)
UNCHANGED = {"bert_dropout_adamw": (dropout_bert, text_data, masking_collator, "adamw_torch", None),
             "batchnorm_sam": (lambda: MeanLossModel(batchnorm=True), vector_data, None, "sam", "rho=0.1")}


@pytest.mark.parametrize("case", list(UNCHANGED))
def test_measuring_does_not_change_training(tmp_path, case):
    """Bitwise the same weights, buffers and losses with and without measuring at every step (dropout and the
    collator draw from the RNG, BatchNorm keeps running statistics, the sampler shuffles)."""
    build, make_data, collator, optim, optim_args = UNCHANGED[case]
    runs = []
    for callbacks in ([], [sam_hf.SharpnessCallback(every=1, samples=12, top_k=2, trace_samples=2)]):
        model = build()
        trainer = sam_hf.SharpnessTrainer(model=model, args=args(tmp_path / str(len(callbacks)), optim, optim_args,
                                                                 max_steps=4), train_dataset=make_data(),
                                          data_collator=collator, callbacks=callbacks)
        trainer.train()
        runs.append((model.state_dict(), trainer.state.log_history))
    (plain, plain_log), (measured, measured_log) = runs
    assert len([h for h in measured_log if "sharpness/lambda_max" in h]) == 4
    assert plain.keys() == measured.keys() and all(torch.equal(plain[k], measured[k]) for k in plain)
    assert [h["loss"] for h in plain_log if "loss" in h] == [h["loss"] for h in measured_log if "loss" in h]


# ---- two processes -------------------------------------------------------------------------------------------
@pytest.mark.slow  # a torchrun launch
def test_two_processes_shard_the_sample(tmp_path):
    """Each rank holds half the sample (uneven batches): the figures are the 1-process ones, the same on both
    ranks; a plain AdamW Trainer under DDP logs the same figures on both ranks as 1 process does with the
    same global batch."""
    cmd = processes.torchrun(2, "-m", "tests.helpers.dist_sharpness", "--out_dir", tmp_path)
    proc = subprocess.Popen(cmd, cwd=processes.ROOT, env=processes.ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # meanwhile, the 1-process references
    one = dist_sharpness.measure()
    _, one_logged = dist_sharpness.train_with_callback(str(tmp_path / "one"), batch=8, distributed=False)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["measure"] == rank1["measure"]  # every rank returns the same dict
    two = rank0["measure"]
    assert two["num_samples"] == one["num_samples"] == 13
    np.testing.assert_allclose(two["top_eigenvalues"], one["top_eigenvalues"], rtol=1e-9)
    np.testing.assert_allclose(two["trace"], one["trace"], rtol=1e-9)
    assert rank0["wrapper"] == "DistributedDataParallel"
    assert rank0["logged"] == rank1["logged"] and [h["step"] for h in rank0["logged"]] == [2, 4]
    for a, b in zip(rank0["logged"], one_logged):
        for key in ("sharpness/lambda_max", "sharpness/lambda_2", "sharpness/trace"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4)


# ---- sam-hf launch --sharpness_every ---------------------------------------------------------------------------
@pytest.mark.parametrize("optim", [["--optim", "adamw_torch"], ["--optim", "sam", "--optim_args", "rho=0.1"]])
def test_launcher_adds_the_callback_to_an_unmodified_script(tmp_path, monkeypatch, optim):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    rc = launch.main(["--sharpness_every", "2", "--sharpness_samples=8", str(SCRIPTS / "hf_example.py"),
                      "--output_dir", str(tmp_path), "--max_steps", "4", "--per_device_train_batch_size", "8",
                      "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
                      "--disable_tqdm", "true", *optim])
    assert rc == 0
    assert integration.sharpness_callback_options is None  # only that script's Trainers
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["optim"] == optim[1]
    logged = [h for h in info["log_history"] if "sharpness/lambda_max" in h]
    assert [h["step"] for h in logged] == [2, 4] and all(h["sharpness/lambda_max"] > 0 for h in logged)


def test_launcher_rejects_bad_sharpness_options(capsys):
    script = str(SCRIPTS / "hf_example.py")
    for argv, message in [(["--sharpness_every", "0", script], "every=0"),
                          (["--sharpness_every", "x", script], "expected an integer"),
                          (["--sharpness_samples", "8", script], "need --sharpness_every"),
                          (["--sharpness_often", "3", script], "unknown launcher option --sharpness_often")]:
        assert launch.main(argv) == 2
        assert message in capsys.readouterr().err


# ---- the package's layout ---------------------------------------------------------------------------------------
def test_public_names_and_one_way_imports(capsys):
    """`sam_hf.sharpness` keeps its public names, `sam-hf sharpness` reaches its CLI, and the package imports
    nothing of sam_hf but the recipes' data reader and the leaf tensor helpers (integration imports it, never the
    reverse)."""
    import ast

    import sam_hf.cli
    from sam_hf.sharpness import SharpnessCallback, measure_sharpness as measure

    assert sam_hf.SharpnessCallback is SharpnessCallback and sam_hf.measure_sharpness is measure
    assert integration.SharpnessCallback is SharpnessCallback
    with pytest.raises(SystemExit) as exit_:
        sam_hf.cli.main(["sharpness", "--help"])
    assert exit_.value.code == 0 and "MODEL_DIR" in capsys.readouterr().out
    source = Path(sam_hf.sharpness.__file__)
    package = sam_hf.sharpness.__name__ if source.name == "__init__.py" else "sam_hf"
    for module in source.parent.glob("*.py") if source.name == "__init__.py" else [source]:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolved from the file's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            inside = [n for n in names if n.split(".")[0] == "sam_hf"]
            assert all(n.startswith(("sam_hf.sharpness", "sam_hf.recipes", "sam_hf.tensors")) for n in inside), \
                f"{module.name} imports {inside}"


def test_the_trainer_is_found_through_its_model(tmp_path):
    from sam_hf.sharpness import remember_trainer, trainer_of

    model = MeanLossModel()
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=vector_data(n=8))
    assert trainer_of(model) is trainer  # `import sam_hf` remembers every Trainer built
    later = Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=vector_data(n=8))
    assert trainer_of(model) is later  # the last one built wins
    remember_trainer(trainer)
    assert trainer_of(model) is trainer and trainer_of(MeanLossModel()) is None and trainer_of(None) is None


# ---- sam-hf sharpness ------------------------------------------------------------------------------------------
WORDS = ["good", "bad", "film", "plot", "actors", "great", "boring", "fun", "the", "a", "was", "is"]


def saved_classifier(directory: Path, labels=("negative", "positive")) -> Path:
    from transformers import BertTokenizerFast

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    model = tiny_bert()
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    out = directory / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def glue_rows(n=10, pairs=True, seed=0):
    rng = random.Random(seed)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))  # noqa: E731
    rows = []
    for i in range(n):
        row = {"sentence1": sentence(), "sentence2": sentence()} if pairs else {"sentence": sentence()}
        rows.append({**row, "label": i % 2, "idx": i})
    return rows


def test_cli_on_a_saved_classifier(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = saved_classifier(tmp_path)
    rows = glue_rows()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = sharpness_cli.main([str(model_dir), "--train_file", str(train), "--samples", "50", "--batch_size", "3",
                                "--top_k", "2", "--trace_samples", "4", "--output", str(tmp_path / "s.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "lambda_max" in printed and "trace" in printed and "wrote" in printed
    got = json.loads((tmp_path / "s.json").read_text())
    assert got["num_samples"] == 10 and got["text_columns"] == ["sentence1", "sentence2"]
    # the same figure from the model, tokenizer and rows directly, in one padded batch
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    batch = dict(tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True,
                           return_tensors="pt"))
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    direct = measure_sharpness(model, [batch], top_k=2)
    np.testing.assert_allclose(got["top_eigenvalues"], direct["top_eigenvalues"], rtol=1e-4)
    assert got["trace"] is not None and got["lambda_max"] > 0


def test_cli_reads_csv_with_label_names(tmp_path, capsys):
    model_dir = saved_classifier(tmp_path)
    rows = glue_rows(n=6, pairs=False, seed=1)
    names = ["negative", "positive"]
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\n" + "".join(f"{r['sentence']},{names[r['label']]}\n" for r in rows))
    assert sharpness_cli.main([str(model_dir), "--train_file", str(train)]) == 0
    got = json.loads((model_dir / "sharpness.json").read_text())  # the default output
    assert got["num_samples"] == 6 and got["text_columns"] == ["sentence", None]
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\ngood film,neutral\n")
    assert sharpness_cli.main([str(model_dir), "--train_file", str(bad)]) == 2
    assert "label 'neutral'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        sharpness_cli.main(["--help"])
    assert exit_.value.code == 0 and "sentence1" in capsys.readouterr().out
