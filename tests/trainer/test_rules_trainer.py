"""The ascent rules inside SharpnessTrainer: BiSAM's lower bound from a Trainer's model outputs (classification,
causal LM with shifted tokens and -100 labels), SAM-ON's normalization layers on Hugging Face models, what is
refused before training, and resume from Trainer's optimizer.pt.

References: tests/helpers/reference.py (Trainer's loss units and base optimizer, restated) with BiSAM's ascent from
tests/helpers/family_reference/bisam.py; fp32, tolerance 1e-5 as the conformance matrix (differences measured: printed).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainingArguments

import sam_hf
from sam_hf import SharpnessConfigError
from tests.helpers import reference as R
from tests.helpers.conformance_cases import lm_rows, stack, tiny_bert, tiny_gpt2, tiny_llama
from tests.helpers.family_reference import bisam
from tests.helpers.parity import ListDataset, bert_rows
from tests.helpers.resume import assert_bitwise, interrupted_and_resumed, uninterrupted
from tests.helpers.tiny import MeanLossModel, args, vector_data, weights

BS, STEPS, RHO = 5, 3, 0.5
BASE = R.Base("adamw", lr=0.02, weight_decay=0.1, eps=1e-3)


def run_trainer(tmp_path, model, rows, optim_args, acc=1, bs=BS, steps=STEPS, **kw):
    targs = TrainingArguments(
        output_dir=str(tmp_path), optim="sam", optim_args=optim_args, per_device_train_batch_size=bs,
        gradient_accumulation_steps=acc, max_steps=steps, learning_rate=BASE.lr, weight_decay=BASE.weight_decay,
        adam_epsilon=BASE.eps, max_grad_norm=0.0, lr_scheduler_type="constant", train_sampling_strategy="sequential",
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        remove_unused_columns=False, **kw)
    trainer = sam_hf.SharpnessTrainer(model=model, args=targs, train_dataset=ListDataset(rows))
    trainer.train()
    return trainer


def bisam_reference(model, rows, loss_kind, shift: bool, mu=1.0):
    """SAM with BiSAM's ascent, one micro-batch per step: q = grad of the mean lower bound over the scored examples
    (tokens after the shift), e = rho q/||q||; the descent is Trainer's loss at x + e (tests/helpers/reference.py)."""
    ref = R.Reference(model, BASE, loss=loss_kind)
    for t in range(STEPS):
        batch = stack(rows[t * BS:(t + 1) * BS])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits, labels = ref.forward(inputs)["logits"].float(), batch["labels"]
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels.reshape(-1) != -100
        q = bisam.lower_bound(logits.reshape(-1, logits.shape[-1])[keep], labels.reshape(-1)[keep], mu).mean()
        grads = torch.autograd.grad(q, ref.params, allow_unused=True)
        n = ref.norm([g for g in grads if g is not None])
        e = [None if g is None else RHO * g.float() / n for g in grads]
        ref.optimizer_step(ref.grad_at(e, [batch]))
    return ref


def gap(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_bisam_in_trainer_equals_the_reference(tmp_path, kind):
    """Sequence classification (BERT, labels [n]) and causal LMs (GPT-2, Llama: logits [n, L, V] against the shifted
    labels, -100 dropped): Trainer's ascent pass bounds the 0-1 loss of the right logits."""
    if kind == "bert":
        model, rows, loss, shift = tiny_bert(), bert_rows(BS * STEPS), R.ModelMean(divide_by_steps=False), False
    else:
        model = tiny_gpt2() if kind == "gpt2" else tiny_llama()
        rows, loss, shift = lm_rows(BS * STEPS), R.TokenNormalised(count_shifted=kind == "llama"), True
    ref_model = copy.deepcopy(model)
    trainer = run_trainer(tmp_path, model, rows, f"rho={RHO},rule=bisam")
    bisam_reference(ref_model, rows, loss, shift)
    diff = gap(trainer.model, ref_model)
    print(f"RULES bisam-trainer-{kind}: max |diff| = {diff:.3g}")
    assert diff < 1e-5
    # the lower bound, not the training loss, gave the perturbation: SAM ends elsewhere
    assert gap(run_trainer(tmp_path / "sam", _fresh(kind), rows, f"rho={RHO}").model, ref_model) > 1e-3


def _fresh(kind):
    return {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}[kind]()


def test_bisam_units_under_gradient_accumulation(tmp_path):
    """Two micro-batches of 4 per step equal one batch of 8: the lower bound is a mean over the step's examples, as
    the training loss is (MeanLossModel: Trainer divides its mean by the accumulation steps)."""
    data = vector_data(n=24)
    a = sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=data,
                                args=args(tmp_path / "a", "sam", "rho=0.5,rule=bisam", max_steps=3,
                                          per_device_train_batch_size=8, train_sampling_strategy="sequential"))
    b = sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=data,
                                args=args(tmp_path / "b", "sam", "rho=0.5,rule=bisam", max_steps=3,
                                          per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                          train_sampling_strategy="sequential"))
    a.train()
    b.train()
    wa, wb = weights(a.model), weights(b.model)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    # the logged loss is the training loss at x (not the lower bound), as for SAM
    sam = sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=data,
                                  args=args(tmp_path / "c", "sam", "rho=0.5", max_steps=1,
                                            per_device_train_batch_size=8, train_sampling_strategy="sequential"))
    sam.train()
    first = lambda t: next(h["loss"] for h in t.state.log_history if "loss" in h)
    assert first(a) == pytest.approx(first(sam), rel=1e-6)


# ------------------------------------------------------------------------------------------------- SAM-ON's layers
def perturbed_names(model, optim_args="rule=sam_on"):
    opt = sam_hf.SharpnessOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                                    "sam", optim_args, model=model)
    rule, params = opt.method.rule, opt.method.params
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(p)] for i, p in enumerate(params) if rule.perturbs(i))


def test_sam_on_finds_the_normalization_layers_of_hugging_face_models():
    """By module type: BERT's LayerNorm (named `LayerNorm`), GPT-2's ln_1 / ln_2 / ln_f, Llama's RMSNorm classes
    (LlamaRMSNorm); weights and biases, nothing else."""
    bert = perturbed_names(tiny_bert())
    assert bert == sorted(f"{p}.LayerNorm.{w}" for p in ("bert.embeddings", "bert.encoder.layer.0.attention.output",
                                                         "bert.encoder.layer.0.output") for w in ("weight", "bias"))
    gpt2 = perturbed_names(tiny_gpt2())
    assert gpt2 == sorted([f"transformer.h.0.{ln}.{w}" for ln in ("ln_1", "ln_2") for w in ("weight", "bias")]
                          + ["transformer.ln_f.weight", "transformer.ln_f.bias"])
    llama = perturbed_names(tiny_llama())
    assert llama == sorted(["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                            "model.norm.weight"])
    # the authors' name rule ('norm' or 'bn' in the name) finds Llama's, and none of BERT's or GPT-2's: refused
    assert perturbed_names(tiny_llama(), "rule=sam_on,sam_on_params=name") == llama
    for model in (tiny_bert(), tiny_gpt2()):
        with pytest.raises(SharpnessConfigError, match="none of the .* trainable parameters is one"):
            perturbed_names(model, "rule=sam_on,sam_on_params=name")


def test_sam_on_with_lora_adapters_only_is_refused_with_the_reason(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    trainer = sam_hf.SharpnessTrainer(model=model, train_dataset=ListDataset(bert_rows(10)),
                                      args=args(tmp_path, "sam", "rule=sam_on", remove_unused_columns=False))
    with pytest.raises(SharpnessConfigError, match="only the adapters train"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------- refusals
def test_bisam_refuses_a_regression_model_before_training(tmp_path):
    with pytest.raises(SharpnessConfigError, match="regression"):
        sam_hf.SharpnessTrainer(model=_regression_bert(),
                                args=args(tmp_path, "sam", "rule=bisam"), train_dataset=ListDataset(bert_rows(10)))


def _regression_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=16, num_labels=1)
    return BertForSequenceClassification(cfg)


class NoLogits(MeanLossModel):
    def forward(self, x, labels=None):
        return {"loss": super().forward(x, labels)["loss"]}


def test_bisam_on_outputs_without_logits_fails_at_the_first_step_with_the_reason(tmp_path):
    trainer = sam_hf.SharpnessTrainer(model=NoLogits(), args=args(tmp_path, "sam", "rule=bisam"),
                                      train_dataset=vector_data())
    with pytest.raises(SharpnessConfigError, match="no `logits`"):
        trainer.train()


# ------------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("optim,optim_args", [
    ("sam", "rho=0.1,rule=vasso"),
    ("sampa", "rho=0.1,rule=bisam"),
    ("sampa", "rho=0.1,micro_batches=2"),
    ("asyncsam", "rho=0.1,rule=vasso,staleness=2,ascent_samples=random,ascent_batch_ratio=0.5"),
], ids=["sam-vasso", "sampa-bisam", "sampa-msam2", "asyncsam-vasso-tau2-random"])
def test_trainer_resume_equals_uninterrupted(tmp_path, optim, optim_args):
    """The rule's state (VaSSO's average), SAMPa's held directions and Asynchronous SAM's queue ride in Trainer's
    optimizer.pt: stopping at step 3 and resuming gives bitwise the weights of never stopping."""
    data = vector_data()  # tests/helpers/resume.py: 6 steps, linear schedule, the checkpoint at step 3
    resumed, _, _ = interrupted_and_resumed(tmp_path, optim, optim_args, MeanLossModel, data)
    assert_bitwise(uninterrupted(tmp_path, optim, optim_args, MeanLossModel, data), resumed)
