"""`import sam_hf` wires the names into transformers without changing anything else."""

import math

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import sam_hf
from sam_hf.trainer.integration import install
from tests.helpers.tiny import (KwargsMeanModel, MeanLossModel, args, assert_same_weights, image_data, text_data,
                                tiny_bert, tiny_vit, vector_data, weights)

METHOD_ARGS = {"sam": "rho=0.05", "msam": "micro_batches=4", "sampa": "rho=0.1,lam=0.2",
               "asyncsam": "ascent_batch_ratio=0.5"}


def test_names_registered_idempotently():
    install()
    install()
    values = [m.value for m in OptimizerNames]
    for name in sam_hf.METHODS:
        assert values.count(name) == 1
        assert OptimizerNames(name).value == name
    assert values.count("adamw_torch") == 1


def test_hf_argument_parser_accepts_the_names():
    parser = HfArgumentParser(TrainingArguments)
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--optim", "sampa", "--optim_args", "rho=0.05,lam=0.2", "--report_to", "none"])
    assert parsed.optim == "sampa" and parsed.optim_args == "rho=0.05,lam=0.2"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "x", "--optim", "sampaa"])


def test_plain_trainer_gets_the_method(tmp_path):
    trainer = Trainer(model=MeanLossModel(), args=args(tmp_path, "sam"), train_dataset=vector_data())
    assert isinstance(trainer, sam_hf.SharpnessMixin) and isinstance(trainer, Trainer)
    trainer.train()
    assert any("sam/perturbed_loss" in h for h in trainer.state.log_history)
    plain = Trainer(model=MeanLossModel(), args=args(tmp_path, "adamw_torch"), train_dataset=vector_data())
    assert type(plain) is Trainer


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_other_optimizers_unchanged(tmp_path, optim):
    runs = []
    for cls in (Trainer, sam_hf.SharpnessTrainer):
        model = MeanLossModel()
        cls(model=model, args=args(tmp_path, optim), train_dataset=vector_data()).train()
        runs.append(weights(model))
    assert_same_weights(*runs)


@pytest.mark.parametrize("method", list(METHOD_ARGS))  # the efficient variants: tests/trainer/test_efficient.py
@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_tiny_models_train_and_evaluate(tmp_path, method, kind):
    model, data = (tiny_bert(), text_data()) if kind == "bert" else (tiny_vit(), image_data())
    before = weights(model)
    trainer = sam_hf.SharpnessTrainer(model=model, args=args(tmp_path, method, METHOD_ARGS[method], max_steps=3),
                                      train_dataset=data, eval_dataset=data)
    out = trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(out.training_loss) and math.isfinite(metrics["eval_loss"])
    after = weights(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("sam/perturbed_loss" in h for h in logged)
    if method != "sampa" or len(logged) > 1:
        assert any("sam/ascent_grad_norm" in h for h in logged)
    if method == "sampa":
        assert any("sam/grad_cosine" in h for h in logged)


@pytest.mark.parametrize("log_level,shown", [("info", True), ("warning", False)])
def test_info_lines_follow_the_scripts_log_level(tmp_path, log_level, shown):
    """sam_hf's decisions print where Trainer's own info lines do (transformers' handler), at the level the script
    set (--log_level)."""
    import io

    from transformers.utils import logging as hf_logging

    before, handler = hf_logging.get_verbosity(), hf_logging.get_logger().handlers[0]
    stream = handler.setStream(io.StringIO())
    try:
        trainer = sam_hf.SharpnessTrainer(model=KwargsMeanModel(), train_dataset=vector_data(),
                                          args=args(tmp_path, "msam", "micro_batches=3", max_steps=1,
                                                    log_level=log_level))
        trainer.train()
        text = handler.stream.getvalue()
    finally:
        handler.setStream(stream)
        hf_logging.set_verbosity(before)
    assert ("sam_hf: the loss ignores num_items_in_batch" in text) == shown, text[-2000:]
