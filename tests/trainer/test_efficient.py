"""The efficient SAM variants of the SAMPa paper's Table 4 (LookSAM, AE-SAM, ESAM, SAF, MESA) and GSAM, each held to
its independent plain-PyTorch reference (tests/helpers/family_reference, written from the papers and checked against the
authors' code), through SharpnessTrainer and through the plain-loop API, with AdamW and SGD bases; the degenerate
settings equal the base optimizer; resuming from a checkpoint equals never stopping; what cannot run is refused.

Data: 16 samples in batches of 8 read in order, so 2 optimizer steps per epoch and 6 steps over 3 epochs (SAF and
MESA's epoch-based start is crossed). The models with BatchNorm train on SGD: the bias of the layer feeding
BatchNorm has a gradient of exactly zero (BatchNorm removes any shift), autograd returns round-off there, and AdamW
would normalise that round-off into steps of order lr (no evidence either way). Tolerances: the reference and sam_hf run the same float32 arithmetic in a
different order (a mean of per-example losses against the model's mean loss, sums of gradient pieces, norms from
norm() against sqrt(dot)), so they differ by float32 round-off (~1e-7 relative) per step; AdamW normalises every
coordinate's step to about lr = 1e-2, so a relative difference d in a gradient moves a weight by at most ~lr * d per
step: over 6 steps ATOL = 1e-6 bounds that with an order of magnitude to spare, while each tested rule differs from
its nearest wrong variant by 1e-3 or more (checked in the tests that say so).
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch.nn import functional as F
from transformers import TrainerCallback, get_linear_schedule_with_warmup

import sam_hf
from sam_hf.config import SharpnessConfig, SharpnessConfigError
from sam_hf.distributed.layouts import DataParallel, FSDP2
from sam_hf.distributed.plan import ParallelPlan
from tests.helpers.family_reference.aesam import aesam_step
from tests.helpers.family_reference.esam import esam_step
from tests.helpers.family_reference.gsam import gsam_rho, gsam_step
from tests.helpers.family_reference.looksam import looksam_step
from tests.helpers.family_reference.saf_mesa import LogitMemory, WeightEMA, mesa_step, saf_step
from tests.helpers.tiny import (MODELS, MeanLossModel, args as make_args, image_data, text_data, tiny_bert, tiny_vit,
                                vector_data, weights)

N, BATCH, STEPS = 16, 8, 6  # 2 steps per epoch, 3 epochs
LR = 1e-2
ATOL = 1e-6
SGD = ",base=sgd,momentum=0.9"


# ---- data, the reference runs, the two sam_hf paths -----------------------------------------------------------------
def dataset(n: int = N):
    return vector_data(n=n).add_column("idx", list(range(n)))


def batch_at(t: int, n: int = N, with_ids: bool = True) -> dict:
    rows = vector_data(n=n)
    start = (t * BATCH) % n
    part = rows[start:start + BATCH]
    out = {"x": torch.tensor(part["x"]), "labels": torch.tensor(part["labels"])}
    if with_ids:
        out["idx"] = torch.arange(start, start + BATCH)
    return out


def ref_batch(t: int) -> dict:
    b = batch_at(t)
    return {"x": b["x"], "y": b["labels"], "idx": b["idx"]}


def loss_fn(model, batch):  # the references' per-example losses
    return F.cross_entropy(model.net(batch["x"]), batch["y"], reduction="none")


def logits_fn(model, batch):
    return model.net(batch["x"])


def base_optimizer(model, base: str, params=None):
    params = list(model.parameters()) if params is None else params
    if base == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=0.9)
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def reference(step, base="adamw", steps=STEPS, batchnorm=False, schedule=False):
    """Weights after `steps` reference steps; `step(model, optimizer, t, batch)` runs one."""
    model = MeanLossModel(batchnorm=batchnorm)
    opt = base_optimizer(model, base)
    sched = get_linear_schedule_with_warmup(opt, 0, steps) if schedule else None
    for t in range(steps):
        step(model, opt, t, ref_batch(t))
        if sched is not None:
            sched.step()
    return weights(model)


def trainer_run(optim, optim_args, steps=STEPS, batchnorm=False, data=None, **kw):
    model = MeanLossModel(batchnorm=batchnorm)
    with tempfile.TemporaryDirectory() as out:
        a = make_args(out, optim, optim_args, max_steps=steps, per_device_train_batch_size=BATCH, max_grad_norm=0.0,
                      train_sampling_strategy="sequential", **kw)
        trainer = sam_hf.SharpnessTrainer(model=model, args=a, train_dataset=dataset() if data is None else data)
        trainer.train()
    return weights(model), trainer


def plain_run(optim, optim_args, base="adamw", steps=STEPS, batchnorm=False, outputs=False, ids=False,
              schedule=False, **kw):
    """The plain-loop API on the same batches; `outputs`: the loss_fn returns the model's outputs."""
    model = MeanLossModel(batchnorm=batchnorm)
    opt = sam_hf.SharpnessOptimizer(base_optimizer(model, base), optim, optim_args, model=model, total_steps=steps,
                                    **kw)
    sched = get_linear_schedule_with_warmup(opt.base, 0, steps) if schedule else None
    fn = (lambda b: model(**b)) if outputs else (lambda b: model(**b)["loss"])  # noqa: E731
    for t in range(steps):
        opt.step(sam_hf.BatchClosure(fn, batch_at(t, with_ids=ids)))
        if sched is not None:
            sched.step()
    return weights(model), opt


def assert_close(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def sam_hf_order(trainer) -> list[int]:
    """Indices into model.parameters() of the parameters in the order sam_hf's method holds them (Trainer's two
    parameter groups: the weights, then the biases)."""
    method = trainer.optimizer.optimizer.method
    position = {id(p): i for i, p in enumerate(trainer.model.parameters())}
    return [position[id(p)] for p in method.params]


# ---- LookSAM ----------------------------------------------------------------------------------------------------------
def looksam_reference(k, alpha, rho, base="adamw"):
    state = {}
    return reference(lambda m, o, t, b: looksam_step(m, loss_fn, b, o, state, k=k, alpha=alpha, rho=rho), base)


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_looksam_equals_its_reference(base):
    """k = 3 over 6 steps: SAM at steps 0 and 3, the reused direction at the four others."""
    want = looksam_reference(3, 0.7, 0.1, base)
    got, trainer = trainer_run("looksam", "rho=0.1,k=3,alpha=0.7" + (SGD if base == "sgd" else ""))
    assert_close(got, want)
    assert [h["sam/active"] for h in trainer.state.log_history if "sam/active" in h] == [1, 0, 0, 1, 0, 0]
    if base == "adamw":
        plain, _ = plain_run("looksam", "rho=0.1,k=3,alpha=0.7")
        assert_close(plain, want)
        # the reused direction matters: without it (alpha = 0) the weights are elsewhere
        assert max_diff(want, looksam_reference(3, 0.0, 0.1)) > 100 * ATOL


def test_looksam_k1_is_sam_and_alpha0_rho0_is_the_base_optimizer():
    sam, _ = trainer_run("sam", "rho=0.1")
    assert_close(trainer_run("looksam", "rho=0.1,k=1")[0], sam)
    base, _ = trainer_run("adamw_torch", None)
    assert_close(trainer_run("looksam", "rho=1e-12,k=3,alpha=0")[0], base)


# ---- AE-SAM -----------------------------------------------------------------------------------------------------------
def test_aesam_equals_its_reference_and_logs_its_decisions():
    decisions = []

    def step(m, o, t, b):
        state = step.state
        decisions.append(aesam_step(m, loss_fn, b, o, state, total_steps=STEPS, rho=0.2, delta=0.5))

    step.state = {}
    want = reference(step)
    assert 0 < sum(decisions) < STEPS  # both kinds of step happen
    got, trainer = trainer_run("aesam", "rho=0.2,delta=0.5")
    assert_close(got, want)
    assert [h["sam/active"] for h in trainer.state.log_history if "sam/active" in h] == [float(d) for d in decisions]
    plain, opt = plain_run("aesam", "rho=0.2,delta=0.5")
    assert_close(plain, want)
    assert opt.method.sam_steps == sum(decisions)


def test_aesam_with_sgd_and_its_extremes():
    """lam1 = lam2 = -100: SAM on every step (the sam method); +100: never (the base optimizer)."""
    state = {}
    want = reference(lambda m, o, t, b: aesam_step(m, loss_fn, b, o, state, total_steps=STEPS, rho=0.2), "sgd")
    assert_close(trainer_run("aesam", "rho=0.2" + SGD)[0], want)
    assert_close(trainer_run("aesam", "rho=0.2,lam1=-100,lam2=-100")[0], trainer_run("sam", "rho=0.2")[0])
    assert_close(trainer_run("aesam", "rho=0.2,lam1=100,lam2=100")[0], trainer_run("adamw_torch", None)[0])


# ---- ESAM -------------------------------------------------------------------------------------------------------------
def esam_reference(order, base="adamw", gamma=1.0, beta=0.5, rho=0.1, batchnorm=False):
    """The reference with the masks sam_hf draws: mask_seed 0, one draw per step over the parameters in sam_hf's
    order (`order`: their indices in model.parameters())."""
    generator = torch.Generator().manual_seed(0)

    def step(m, o, t, b):
        params = list(m.parameters())
        keep = (torch.rand(len(order), generator=generator, dtype=torch.float64) < beta).tolist()
        mask = [None] * len(params)
        for i, k in zip(order, keep):
            mask[i] = torch.full_like(params[i], float(k))
        esam_step(m, loss_fn, b, o, rho=rho, beta=beta, gamma=gamma, mask=mask)

    return reference(step, base, batchnorm=batchnorm)


@pytest.mark.parametrize("base,batchnorm", [("adamw", False), ("sgd", True)])
def test_esam_swp_equals_its_reference(base, batchnorm):
    got, trainer = trainer_run("esam", "rho=0.1,beta=0.5" + (SGD if base == "sgd" else ""), batchnorm=batchnorm)
    want = esam_reference(sam_hf_order(trainer), base, batchnorm=batchnorm)
    assert_close(got, want)
    shares = [h["sam/perturbed_share"] for h in trainer.state.log_history if "sam/perturbed_share" in h]
    assert 0 < min(shares) and max(shares) < 1  # the masks really drop tensors (and keep some)
    plain, opt = plain_run("esam", "rho=0.1,beta=0.5", base, batchnorm=batchnorm)
    assert_close(plain, esam_reference(list(range(len(opt.method.params))), base, batchnorm=batchnorm))
    # the mask matters: with every tensor perturbed (beta = 1: SAM) the weights are elsewhere
    assert max_diff(want, esam_reference(sam_hf_order(trainer), base, beta=1.0, batchnorm=batchnorm)) > 100 * ATOL


def test_esam_sds_equals_its_reference():
    got, trainer = trainer_run("esam", "rho=0.1,beta=0.5,gamma=0.5")
    want = esam_reference(sam_hf_order(trainer), gamma=0.5)
    assert_close(got, want)
    assert max_diff(want, esam_reference(sam_hf_order(trainer))) > 100 * ATOL  # the selection matters
    plain, opt = plain_run("esam", "rho=0.1,beta=0.5,gamma=0.5", outputs=True)
    assert_close(plain, esam_reference(list(range(len(opt.method.params))), gamma=0.5))


def test_esam_beta1_is_sam_and_rho0_is_the_base_optimizer():
    assert_close(trainer_run("esam", "rho=0.1,beta=1")[0], trainer_run("sam", "rho=0.1")[0])
    assert_close(trainer_run("esam", "rho=1e-12,beta=0.5")[0], trainer_run("adamw_torch", None)[0])


# ---- GSAM -------------------------------------------------------------------------------------------------------------
def gsam_reference(base="adamw", rho=0.1, rho_min=0.02, alpha=0.4):
    def step(m, o, t, b):
        r = gsam_rho(o.param_groups[0]["lr"], LR, 0.0, rho, rho_min)
        gsam_step(m, loss_fn, b, o, rho=r, alpha=alpha)

    return reference(step, base, schedule=True)


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_gsam_equals_its_reference_with_rho_following_the_schedule(base):
    """A linear schedule from lr = 1e-2 to 0: rho_t runs from rho = 0.1 towards rho_min = 0.02."""
    want = gsam_reference(base)
    got, trainer = trainer_run("gsam", "rho=0.1,rho_min=0.02,alpha=0.4" + (SGD if base == "sgd" else ""),
                               lr_scheduler_type="linear")
    assert_close(got, want)
    rhos = [h["sam/rho"] for h in trainer.state.log_history if "sam/rho" in h]
    assert rhos == pytest.approx([0.02 + 0.08 * (1 - t / STEPS) for t in range(STEPS)])
    if base == "adamw":
        assert_close(plain_run("gsam", "rho=0.1,rho_min=0.02,alpha=0.4", schedule=True)[0], want)
        # the decomposition matters (alpha = 0 is SAM), and so does its sign
        assert max_diff(want, gsam_reference(alpha=0.0)) > 100 * ATOL
        assert max_diff(want, gsam_reference(alpha=-0.4)) > 100 * ATOL


def test_gsam_alpha0_is_sam_and_rho0_is_the_base_optimizer():
    assert_close(trainer_run("gsam", "rho=0.1,rho_min=0.1,alpha=0")[0], trainer_run("sam", "rho=0.1")[0])
    assert_close(trainer_run("gsam", "rho=1e-12,alpha=0.4")[0], trainer_run("adamw_torch", None)[0])


# ---- SAF and MESA -----------------------------------------------------------------------------------------------------
SAF_ARGS = "kl_weight=0.5,epochs_back=1,start_epoch=0,temperature=2"  # epoch 0 records, epochs 1 and 2 use the record


def saf_reference(base="adamw"):
    memory = LogitMemory(N, 3, epochs_back=1)
    return reference(lambda m, o, t, b: saf_step(m, logits_fn, b, o, memory, t // 2, lam=0.5, tau=2.0, start_epoch=0),
                     base)


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_saf_equals_its_reference(base):
    want = saf_reference(base)
    got, trainer = trainer_run("saf", SAF_ARGS + (SGD if base == "sgd" else ""))
    assert_close(got, want)
    assert [h["sam/active"] for h in trainer.state.log_history if "sam/active" in h] == [0, 0, 1, 1, 1, 1]
    assert all(h["sam/trajectory_kl"] > 0 for h in trainer.state.log_history if h.get("sam/active") == 1)
    if base == "adamw":
        plain, _ = plain_run("saf", SAF_ARGS, outputs=True, ids=True, steps_per_epoch=2)
        assert_close(plain, want)
        assert max_diff(want, trainer_run("adamw_torch", None)[0]) > 100 * ATOL  # the term matters


def mesa_reference(base="adamw", batchnorm=False, decay=0.9):
    holder = {}

    def step(m, o, t, b):
        if "ema" not in holder:
            holder["ema"] = WeightEMA(m, beta=decay)
        mesa_step(m, logits_fn, b, o, holder["ema"], t // 2, lam=0.8, tau=2.0, start_epoch=0)

    return reference(step, base, batchnorm=batchnorm)


MESA_ARGS = "kl_weight=0.8,decay=0.9,start_epoch=0,temperature=2"


@pytest.mark.parametrize("base,batchnorm", [("adamw", False), ("sgd", True)])
def test_mesa_equals_its_reference(base, batchnorm):
    """With BatchNorm: the averaged model runs in eval mode on the averaged running statistics."""
    want = mesa_reference(base, batchnorm=batchnorm)
    got, trainer = trainer_run("mesa", MESA_ARGS + (SGD if base == "sgd" else ""), batchnorm=batchnorm)
    assert_close(got, want)
    plain, _ = plain_run("mesa", MESA_ARGS, base, batchnorm=batchnorm, outputs=True, steps_per_epoch=2)
    assert_close(plain, want)
    plain_base = trainer_run("adamw_torch" if base == "adamw" else "sgd", None if base == "adamw" else "momentum=0.9",
                             batchnorm=batchnorm)[0]
    assert max_diff(want, plain_base) > 100 * ATOL  # the term matters


@pytest.mark.parametrize("optim,optim_args", [("saf", "kl_weight=0,epochs_back=1,start_epoch=0"),
                                              ("mesa", "kl_weight=0,start_epoch=-1")])
def test_trajectory_loss_of_weight_zero_is_the_base_optimizer(optim, optim_args):
    assert_close(trainer_run(optim, optim_args)[0], trainer_run("adamw_torch", None)[0], atol=0)


def test_saf_and_mesa_log_the_models_own_loss():
    _, plain = trainer_run("adamw_torch", None)
    for optim, optim_args in [("saf", SAF_ARGS), ("mesa", MESA_ARGS)]:
        _, trainer = trainer_run(optim, optim_args)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert losses[:2] == [h["loss"] for h in plain.state.log_history if "loss" in h][:2]  # epoch 0: no term


# ---- gradient accumulation, loss kinds, bf16 ----------------------------------------------------------------------
ACCUMULATION_CASES = {"looksam": "rho=0.1,k=3,alpha=0.7", "aesam": "rho=0.2,delta=0.5", "esam": "rho=0.1,beta=0.5",
                      "gsam": "rho=0.1,rho_min=0.02", "saf": SAF_ARGS, "mesa": MESA_ARGS}


@pytest.mark.parametrize("kind", ["mean", "count"])
@pytest.mark.parametrize("optim", list(ACCUMULATION_CASES))
def test_accumulated_micro_batches_equal_one_batch(optim, kind):
    """B_t is the whole accumulated batch (2 micro-batches of 4): the same as one batch of 8. `count`: a loss that
    divides by Trainer's num_items_in_batch, so SAF's and MESA's term is summed over the cycle's count too."""
    optim_args = ACCUMULATION_CASES[optim]
    one, _ = trainer_run(optim, optim_args)
    model = MODELS[kind]()
    with tempfile.TemporaryDirectory() as out:
        a = make_args(out, optim, optim_args, max_steps=STEPS, per_device_train_batch_size=4,
                      gradient_accumulation_steps=2, max_grad_norm=0.0, train_sampling_strategy="sequential")
        sam_hf.SharpnessTrainer(model=model, args=a, train_dataset=dataset()).train()
    assert_close(weights(model), one)


@pytest.mark.parametrize("optim", list(ACCUMULATION_CASES))
def test_bf16_autocast_trains(optim):
    start = weights(MeanLossModel())
    got, trainer = trainer_run(optim, ACCUMULATION_CASES[optim], bf16=True)
    assert all(torch.isfinite(v).all() for v in got.values()) and max_diff(got, start) > 0
    assert torch.isfinite(torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])).all()


# ---- Hugging Face models ---------------------------------------------------------------------------------------------
HF_CASES = {"looksam": "k=2", "aesam": "", "esam": "gamma=0.5", "gsam": "rho_min=0.01",
            "saf": "epochs_back=1,start_epoch=0", "mesa": "start_epoch=-1"}


@pytest.mark.parametrize("optim", list(HF_CASES))
@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_tiny_hf_models_train_and_evaluate(tmp_path, optim, kind):
    """BERT takes **kwargs (Trainer passes the count, the loss is a mean that ignores it), ViT does not; 6 steps of 8
    out of 32 examples cross into epoch 1, where SAF's and MESA's term is active; the id column SAF reads is kept
    out of the model's inputs."""
    model, data = (tiny_bert(), text_data()) if kind == "bert" else (tiny_vit(), image_data(n=32))
    data = data.add_column("idx", list(range(len(data))))
    before = weights(model)
    trainer = sam_hf.SharpnessTrainer(model=model, args=make_args(tmp_path, optim, HF_CASES[optim], max_steps=6),
                                      train_dataset=data, eval_dataset=data)
    out = trainer.train()
    assert torch.isfinite(torch.tensor([out.training_loss, trainer.evaluate()["eval_loss"]])).all()
    after = weights(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    if optim in ("saf", "mesa"):
        assert [h["sam/active"] for h in trainer.state.log_history if "sam/active" in h][-1] == 1.0


def test_mesa_on_a_causal_lm_and_saf_refusing_it(tmp_path):
    """Token-level outputs: MESA's KL is per scored token (labels != -100, shifted as the LM's loss is); SAF's
    per-example memory would be tokens x vocabulary per example: refused."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from sam_hf.methods.trajectory import is_causal_lm, scored

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0))
    assert is_causal_lm(lm) and not is_causal_lm(MeanLossModel())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (16, 6), generator=g)
    labels = torch.where(torch.rand(16, 6, generator=g) > 0.3, ids, -100)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(), "idx": list(range(16))})
    # the scored positions: logits at t against the label at t + 1
    logits = torch.randn(2, 6, 40)
    kept, _ = scored(logits, logits, {"labels": labels[:2]}, causal=True)
    assert kept.shape[0] == int((labels[:2, 1:] != -100).sum())
    trainer = sam_hf.SharpnessTrainer(model=lm, args=make_args(tmp_path, "mesa", "start_epoch=-1,decay=0.5",
                                                                max_steps=4), train_dataset=data)
    trainer.train()
    kl = [h["sam/trajectory_kl"] for h in trainer.state.log_history if "sam/trajectory_kl" in h]
    assert len(kl) == 4 and kl[0] == 0.0 and all(v > 0 for v in kl[1:])  # v = x at the first step only
    with pytest.raises(SharpnessConfigError, match="token-level outputs"):
        sam_hf.SharpnessTrainer(model=lm, args=make_args(tmp_path, "saf", "epochs_back=1,start_epoch=0", max_steps=1),
                                train_dataset=data).train()


def test_mesa_with_peft_averages_the_adapters_only(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                            task_type="SEQ_CLS"))
    trainer = sam_hf.SharpnessTrainer(model=model, args=make_args(tmp_path, "mesa", "start_epoch=-1", max_steps=2),
                                      train_dataset=text_data(n=16))
    trainer.train()
    method = trainer.optimizer.optimizer.method
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(method.average) == len(trainable) < len(list(model.parameters()))
    assert sum(v.numel() for v in method.average) == sum(p.numel() for p in trainable)


# ---- resume -----------------------------------------------------------------------------------------------------------
class StopAt(TrainerCallback):
    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.n:
            control.should_training_stop = True


RESUME_CASES = {
    "looksam": "rho=0.1,k=4,alpha=0.7",  # g_v of step 0 is reused across the checkpoint at step 3
    "aesam": "rho=0.2,delta=0.5",
    "esam": "rho=0.1,beta=0.5",  # the mask generator's state
    "gsam": "rho=0.1,rho_min=0.02",
    "saf": SAF_ARGS,  # the logits of epoch 0 recorded before the checkpoint are the reference after it
    "mesa": "kl_weight=0.8,decay=0.5,start_epoch=0,temperature=2",  # the weight average
}


@pytest.mark.parametrize("optim", list(RESUME_CASES))
def test_resume_equals_never_stopping(tmp_path, optim):
    optim_args = RESUME_CASES[optim]
    kw = dict(lr_scheduler_type="linear", batchnorm=optim == "mesa")
    straight, _ = trainer_run(optim, optim_args, **kw)
    batchnorm = kw.pop("batchnorm")

    def trainer(model, **more):
        a = make_args(tmp_path / "run", optim, optim_args, max_steps=STEPS, per_device_train_batch_size=BATCH,
                      max_grad_norm=0.0, train_sampling_strategy="sequential", **kw, **more)
        return a, model

    a, model = trainer(MeanLossModel(batchnorm=batchnorm), save_strategy="steps", save_steps=3)
    sam_hf.SharpnessTrainer(model=model, args=a, train_dataset=dataset(), callbacks=[StopAt(3)]).train()
    a, model = trainer(MeanLossModel(batchnorm=batchnorm, seed=1), save_strategy="no")
    sam_hf.SharpnessTrainer(model=model, args=a, train_dataset=dataset()).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    resumed = weights(model)
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []


def test_plain_loop_resume_from_state_dict(tmp_path):
    """SAF's memory and epoch, MESA's average: a fresh optimizer loading state_dict() continues exactly."""
    for optim, optim_args in [("saf", SAF_ARGS), ("mesa", MESA_ARGS)]:
        full, _ = plain_run(optim, optim_args, outputs=True, ids=optim == "saf", steps_per_epoch=2)
        model = MeanLossModel()
        opt = sam_hf.SharpnessOptimizer(base_optimizer(model, "adamw"), optim, optim_args, model=model,
                                        steps_per_epoch=2)
        fn = lambda b: model(**b)  # noqa: E731
        for t in range(3):
            opt.step(sam_hf.BatchClosure(fn, batch_at(t, with_ids=optim == "saf")))
        saved = {"model": weights(model), "optim": opt.state_dict()}
        torch.save(saved, tmp_path / "ckpt.pt")
        saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
        model = MeanLossModel(seed=1)
        model.load_state_dict(saved["model"])
        opt = sam_hf.SharpnessOptimizer(base_optimizer(model, "adamw"), optim, optim_args, model=model,
                                        steps_per_epoch=2)
        opt.load_state_dict(saved["optim"])
        fn = lambda b: model(**b)  # noqa: E731
        for t in range(3, STEPS):
            opt.step(sam_hf.BatchClosure(fn, batch_at(t, with_ids=optim == "saf")))
        assert_close(weights(model), full, atol=0)


# ---- what is refused --------------------------------------------------------------------------------------------------
def test_saf_needs_unique_example_ids_in_the_training_data():
    with pytest.raises(SharpnessConfigError, match=r"lacks.*with_indices=True"):
        trainer_run("saf", SAF_ARGS, data=vector_data(n=N))
    duplicated = vector_data(n=N).add_column("idx", [i % 4 for i in range(N)])
    with pytest.raises(SharpnessConfigError, match="must be distinct integers"):
        trainer_run("saf", SAF_ARGS, data=duplicated)
    # an id column under another name
    renamed = vector_data(n=N).add_column("example", list(range(N)))
    got, _ = trainer_run("saf", SAF_ARGS + ",id_column=example", data=renamed)
    assert_close(got, saf_reference())


def test_saf_refuses_token_level_logits():
    model = torch.nn.Linear(4, 5)
    opt = sam_hf.SharpnessOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "saf", "start_epoch=2",
                                    steps_per_epoch=1)
    batch = {"x": torch.randn(2, 3, 4), "labels": torch.zeros(2, 3, dtype=torch.long), "idx": torch.arange(2)}

    def fn(b):
        logits = model(b["x"])
        return {"loss": F.cross_entropy(logits.reshape(-1, 5), b["labels"].reshape(-1)), "logits": logits}

    with pytest.raises(SharpnessConfigError, match="token-level outputs"):
        opt.step(sam_hf.BatchClosure(fn, batch))


def test_what_the_plain_loop_must_say():
    model = MeanLossModel()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SharpnessConfigError, match="give total_steps"):
        sam_hf.SharpnessOptimizer(base, "aesam")
    with pytest.raises(SharpnessConfigError, match="needs the model"):
        sam_hf.SharpnessOptimizer(base, "mesa")
    opt = sam_hf.SharpnessOptimizer(base, "saf", model=model)
    with pytest.raises(SharpnessConfigError, match="steps_per_epoch"):
        opt.step(sam_hf.BatchClosure(lambda b: model(**b), batch_at(0)))
    opt.set_epoch(0)
    with pytest.raises(TypeError, match="reads the model's outputs"):
        opt.step(lambda: model(**batch_at(0, with_ids=False))["loss"])
    with pytest.raises(TypeError, match="must return them"):
        opt.step(sam_hf.BatchClosure(lambda b: model(**b)["loss"], batch_at(0)))


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(SharpnessConfigError, match="rho=0.1 applies to .* not to --optim saf"):
        SharpnessConfig.from_optim_args("saf", "rho=0.1")
    with pytest.raises(SharpnessConfigError, match="start_epoch >= 1"):
        SharpnessConfig.from_optim_args("saf", "epochs_back=2,start_epoch=0")
    with pytest.raises(SharpnessConfigError, match="rho_min must be in"):
        SharpnessConfig.from_optim_args("gsam", "rho=0.05,rho_min=0.1")
    with pytest.raises(SharpnessConfigError, match="k must be"):
        SharpnessConfig.from_optim_args("looksam", "k=0")
    with pytest.raises(SharpnessConfigError, match="beta"):
        SharpnessConfig.from_optim_args("esam", "beta=0")


def test_layouts_refuse_what_they_cannot_run():
    from sam_hf import registry

    two = ParallelPlan(mode="data", world_size=2)
    for optim in ("gsam", "esam"):
        cfg = SharpnessConfig.from_optim_args(optim, "sync_ascent=false")
        registry.get(optim).method.check(cfg, DataParallel(two))  # per rank, as the authors: runs
        with pytest.raises(SharpnessConfigError, match="every backward pass averages"):
            registry.get(optim).method.check(cfg, FSDP2(two))
    cfg = SharpnessConfig.from_optim_args("esam", "gamma=0.5")
    with pytest.raises(SharpnessConfigError, match="depend on how the batch is split"):
        registry.get("esam").method.check(cfg, DataParallel(two))
