"""PEFT/LoRA: only the adapters are perturbed and updated; the frozen base model never moves, not even
during a perturbed pass."""

import pytest
import torch
from transformers import TrainerCallback

import sam_hf
from tests.helpers.tiny import METHOD_CASES, args, text_data, tiny_bert

peft = pytest.importorskip("peft")

CASES = {k: METHOD_CASES[k] for k in ('sam', 'asam', 'msam', 'sampa', 'asyncsam')}
STEPS = 3


def lora_bert(task_type=None):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, task_type=task_type)
    return peft.get_peft_model(tiny_bert(), cfg)


class Watch(TrainerCallback):
    """At every forward: the frozen weights are bitwise their initial values; records the trainable ones."""

    def __init__(self, model):
        self.model = model
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.forwards, self.step_starts, self.frozen_moved = [], [], []
        model.register_forward_pre_hook(self._pre_forward)

    def _flat(self):
        return torch.cat([p.detach().flatten().clone() for p in self.trainable])

    def _pre_forward(self, module, inputs):
        for n, p in self.model.named_parameters():
            if n in self.frozen and not torch.equal(p, self.frozen[n]):
                self.frozen_moved.append(n)
        if module.training:
            self.forwards.append(self._flat())

    def on_step_begin(self, args, state, control, **kw):
        self.step_starts.append(self._flat())


def run(tmp_path, case, task_type=None):
    optim, optim_args = CASES[case]
    model = lora_bert(task_type)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    watch = Watch(model)
    trainer = sam_hf.SharpnessTrainer(model=model, args=args(tmp_path, optim, optim_args, max_steps=STEPS,
                                                             learning_rate=5e-2),
                                      train_dataset=text_data(), callbacks=[watch])
    trainer.train()
    return model, before, watch, trainer


@pytest.mark.parametrize("case", list(CASES))
def test_only_adapters_perturbed_and_updated(tmp_path, case):
    model, before, watch, trainer = run(tmp_path, case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    # The method works on exactly the trainable (LoRA) parameters.
    method = trainer.optimizer.optimizer.method
    assert {id(p) for p in method.params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(method.params) == len(trainable)

    # Base weights: bitwise unchanged after training and at every forward pass (perturbed ones included).
    assert not watch.frozen_moved, f"frozen weights moved during a pass: {sorted(set(watch.frozen_moved))}"
    after = dict(model.named_parameters())
    for n, p in after.items():
        if n not in trainable:
            assert torch.equal(p.detach(), before[n]), n
    assert any(not torch.equal(after[n].detach(), before[n]) for n in trainable)  # adapters trained

    # Some pass ran away from the step's starting point (the perturbation / lookahead), on the adapters.
    starts = watch.step_starts
    assert any(all(not torch.equal(f, s) for s in starts) for f in watch.forwards)


def test_seq_cls_task_head_is_trainable_too(tmp_path):
    """task_type=SEQ_CLS also trains the classifier (PEFT's modules_to_save): the method follows
    requires_grad, whatever PEFT marks trainable, and the base model stays frozen."""
    model, before, watch, trainer = run(tmp_path, "sampa", task_type="SEQ_CLS")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable) and any("lora_" in n for n in trainable)
    method = trainer.optimizer.optimizer.method
    assert {id(p) for p in method.params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not watch.frozen_moved
