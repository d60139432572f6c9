"""Checkpoint and resume: stopping at step N and resuming gives, at step 2N, bitwise the weights of never
stopping, for every method; the method's state rides in Trainer's own optimizer.pt, and nothing else is
added to the checkpoint (no weight backups)."""

import os
import pathlib
import pickle

import pytest
import torch

from sam_hf.config import SharpnessConfigError
from sam_hf.distributed import checkpoint as sharding
from sam_hf.distributed.checkpoint import RANK_FILE
from sam_hf.optim import STATE_KEY
from tests.helpers.resume import N, StopAt, assert_bitwise, interrupted_and_resumed, make_trainer, uninterrupted
from tests.helpers.tiny import METHOD_CASES, MeanLossModel, text_data, tiny_bert, vector_data, weights

CASES = {k: METHOD_CASES[k] for k in ('sam', 'msam', 'sampa', 'asyncsam', 'asyncsam_r1')}


def tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_uninterrupted(tmp_path, case):
    optim, optim_args = CASES[case]
    data = vector_data()
    straight = uninterrupted(tmp_path, optim, optim_args, MeanLossModel, data)
    resumed, ckpt, trainer = interrupted_and_resumed(tmp_path, optim, optim_args, MeanLossModel, data)
    assert any(not torch.equal(straight[k], weights(MeanLossModel())[k]) for k in straight)
    assert_bitwise(straight, resumed)

    # The checkpoint: Trainer's files, with the method's state inside optimizer.pt and nothing more.
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert set(state) == {"state", "param_groups", STATE_KEY}
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    shapes = sorted(tuple(p.shape) for p in params)
    method_state = state[STATE_KEY]
    if optim in ("sam", "msam"):
        assert not list(tensors(method_state))  # stateless between steps: no weight backup saved
    elif optim == "sampa":
        assert set(method_state) == {"g", "held_parts"}
        assert sorted(tuple(g.shape) for g in method_state["g"]) == shapes  # g_t
        assert all(g.dtype == torch.float32 for g in method_state["g"])
        held = [part["batch"] for part in method_state["held_parts"]]  # B_t: the batch the next step perturbs on
        assert len(held) == 1 and set(held[0]) == {"x", "labels"} and len(held[0]["labels"]) == 8
        extra = sum(t.numel() for t in tensors(method_state))
        assert extra == sum(p.numel() for p in params) + 8 * 6 + 8  # g_t + B_t, nothing else
    else:
        assert "a" in method_state
        assert sorted(tuple(a.shape) for a in method_state["a"]) == shapes  # a_{t-1}
        assert sum(t.numel() for t in tensors(method_state)) == sum(p.numel() for p in params)


@pytest.mark.parametrize("case", ["sampa", "asyncsam"])
def test_resume_with_gradient_accumulation(tmp_path, case):
    """SAMPa holds a whole accumulation cycle (two micro-batches) across the checkpoint."""
    optim, optim_args = CASES[case]
    data = vector_data()
    kw = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2)

    def straight_run():
        model = MeanLossModel()
        make_trainer(tmp_path / "straight", optim, optim_args, model, data, **kw).train()
        return weights(model)

    first = make_trainer(tmp_path / "run", optim, optim_args, MeanLossModel(), data, callbacks=[StopAt(N)],
                         save_strategy="steps", save_steps=N, **kw)
    first.train()
    ckpt = tmp_path / "run" / f"checkpoint-{N}"
    if optim == "sampa":
        held = torch.load(ckpt / "optimizer.pt", weights_only=True)[STATE_KEY]["held_parts"]
        assert len(held) == 2 and all(len(b["batch"]["labels"]) == 4 for b in held)
    model = MeanLossModel(seed=1)
    make_trainer(tmp_path / "run", optim, optim_args, model, data, save_strategy="no", **kw).train(
        resume_from_checkpoint=str(ckpt))
    assert_bitwise(straight_run(), weights(model))


def test_checkpoint_layout_is_trainers(tmp_path):
    """Same files as a plain AdamW checkpoint; the base optimizer's state is exactly AdamW's."""
    dirs, states = {}, {}
    for optim, optim_args in [("adamw_torch", None), ("sampa", "rho=0.1")]:
        out = tmp_path / optim
        make_trainer(out, optim, optim_args, MeanLossModel(), vector_data(), callbacks=[StopAt(N)],
                     save_strategy="steps", save_steps=N).train()
        ckpt = out / f"checkpoint-{N}"
        dirs[optim] = sorted(os.listdir(ckpt))
        states[optim] = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert dirs["adamw_torch"] == dirs["sampa"]
    plain, ours = states["adamw_torch"], states["sampa"]
    # every hyper-parameter is AdamW's, but the schedule is one step behind: SAMPa's first step made no update,
    # so after N Trainer steps it is at the value of update N - 1 (linear: 0.01 * (2N - k) / (2N - 1) at k >= 1)
    without_lr = [[{k: v for k, v in g.items() if k != "lr"} for g in s["param_groups"]] for s in (ours, plain)]
    assert without_lr[0] == without_lr[1]
    assert [g["lr"] for g in plain["param_groups"]] == pytest.approx([0.01 * N / (2 * N - 1)] * 2)
    assert [g["lr"] for g in ours["param_groups"]] == pytest.approx([0.01 * (N + 1) / (2 * N - 1)] * 2)
    assert ours["state"].keys() == plain["state"].keys()
    for k in plain["state"]:
        assert ours["state"][k].keys() == plain["state"][k].keys()
        # SAMPa's first step is g_0 only, so after N Trainer steps AdamW has taken N - 1 steps
        assert float(ours["state"][k]["step"]) == N - 1


def test_resume_sampa_on_bert(tmp_path):
    """SAMPa's held batch with a real tokenised batch (input_ids, labels) and Trainer's num_items_in_batch."""
    optim, optim_args = "sampa", "rho=0.1,lam=0.2"

    def build(seed=0):
        return tiny_bert(seed=seed)

    data = text_data()
    straight = uninterrupted(tmp_path, optim, optim_args, build, data)
    resumed, _, _ = interrupted_and_resumed(tmp_path, optim, optim_args, build, data)
    assert_bitwise(straight, resumed)


# ---- method-state files (FSDP2 checkpoints): read with torch.load(weights_only=True) only

class _Payload:
    """A pickled object whose unpickling would run code (it would create `path`)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])  # torch's default; the previous format's
def test_method_state_file_with_a_pickled_object_is_refused(tmp_path, protocol):
    marker = tmp_path / "code_ran"
    torch.save({"state": {"g": [_Payload(str(marker))]}, "world_size": 1}, tmp_path / RANK_FILE.format(rank=0),
               pickle_protocol=protocol)
    with pytest.raises(SharpnessConfigError, match="refusing to load .*a pickled .*not a tensor or a plain container"):
        sharding.load_method_state(None, str(tmp_path))
    assert not marker.exists()
