"""Method state in checkpoints: plain types read with weights_only=True, older files still read, and SAMPa's held
batch kept in units that do not depend on the number of processes."""

import sys
import types

import pytest
import torch

import sam_hf
from sam_hf.distributed import checkpoint
from sam_hf.distributed.layouts import Layout
from sam_hf.methods import SAMPa
from tests.helpers.tiny import MeanLossModel, args, vector_data


class _Shards(Layout):
    """A layout seen from one rank of `shards` data shards (no process group needed to read a checkpoint)."""

    def __init__(self, shards, index, fraction=1.0):
        super().__init__()
        self.shards, self.index, self.replica_fraction = shards, index, fraction

    @property
    def data_parallel_size(self):
        return self.shards

    @property
    def data_rank(self):
        return self.index


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_state_file_carrying_an_object_is_refused(tmp_path, capsys):
    path = tmp_path / checkpoint.STATE_FILE
    torch.save({"state": {"g": None, "extra": _RunsCode()}, "format": 2}, path)
    method = SAMPa(sam_hf.SharpnessConfig.create("sampa"), torch.optim.AdamW(MeanLossModel().parameters()))
    with pytest.raises(sam_hf.SharpnessConfigError, match="refusing to load .*could run code"):
        checkpoint.load_method_state(method, str(tmp_path))
    assert "this ran" not in capsys.readouterr().out


def test_an_older_per_rank_state_file_still_loads(tmp_path, monkeypatch):
    """FSDP2 checkpoints written before the layouts pickled `sam_hf.sharding._Slot` objects: read without
    unpickling code, converted, and refused on another world size (their held batch is one rank's share)."""
    from torch.distributed.tensor import Shard

    legacy = types.ModuleType("sam_hf.sharding")

    class _Slot:
        def __init__(self, key, shape, dtype, placements):
            self.key, self.shape, self.dtype, self.placements = key, shape, dtype, placements

    _Slot.__module__, _Slot.__qualname__ = "sam_hf.sharding", "_Slot"
    legacy._Slot = _Slot
    monkeypatch.setitem(sys.modules, "sam_hf.sharding", legacy)
    saved = {"state": {"g": [_Slot("state.g.0", (4, 3), torch.float32, (Shard(0),)), None], "held": None},
             "world_size": 1}
    torch.save(saved, tmp_path / "sam_hf_state.rank0.pt", pickle_protocol=5)  # as the older files were written
    monkeypatch.delitem(sys.modules, "sam_hf.sharding")
    state = checkpoint.read_state_file(str(tmp_path / "sam_hf_state.rank0.pt"))["state"]
    assert state["g"][0] == {checkpoint.SLOT: "state.g.0", "shape": [4, 3], "dtype": torch.float32,
                             "placements": [Shard(0)]}
    saved["world_size"] = 2
    monkeypatch.setitem(sys.modules, "sam_hf.sharding", legacy)
    torch.save(saved, tmp_path / "sam_hf_state.rank0.pt", pickle_protocol=5)  # as the older files were written
    monkeypatch.delitem(sys.modules, "sam_hf.sharding")
    with pytest.raises(sam_hf.SharpnessConfigError, match="saved by 2 processes.*resume with 2"):
        checkpoint.load_method_state(None, str(tmp_path))


def _parts(n, count=None):
    return [{"batch": {"x": torch.full((2, 6), float(i)), "labels": torch.zeros(2, dtype=torch.long)},
             "num_items": None if count is None else torch.tensor(count)} for i in range(n)]


@pytest.mark.parametrize("shards,index,want", [(1, 0, [0, 1, 2, 3]), (2, 0, [0, 1]), (2, 1, [2, 3]), (4, 3, [3])])
def test_the_held_batch_is_shared_by_this_runs_data_shards(shards, index, want):
    """B_t saved as 4 micro-batches: each of N data shards takes 4/N of them, normalised as N ranks accumulating
    4/N micro-batches each (a mean loss weighs each micro-batch 1/4 either way)."""
    method = SAMPa(sam_hf.SharpnessConfig.create("sampa"), torch.optim.AdamW(MeanLossModel().parameters()),
                   layout=_Shards(shards, index))
    method.load_state_dict({"g": None, "held_parts": _parts(4)})
    assert [int(b["x"][0, 0]) for b in method.held] == want
    assert all(b.accumulation_steps == 4 // shards and b.metrics_counted for b in method.held)


@pytest.mark.parametrize("index", [0, 1])
def test_a_held_micro_batch_is_cut_into_row_blocks_for_more_data_shards(index):
    """B_t saved by one process as one micro-batch of 2 rows, resumed on 2 data-parallel ranks: each takes its block
    of rows (what it would have held had it run on 2 ranks), as a whole step (accumulation 1), with the count over
    the whole micro-batch (data parallel normalises every rank's loss by the count over all ranks)."""
    parts = [{"batch": {"x": torch.arange(12.0).view(2, 6), "labels": torch.tensor([0, 1])},
              "num_items": torch.tensor(7)}]
    method = SAMPa(sam_hf.SharpnessConfig.create("sampa"), torch.optim.AdamW(MeanLossModel().parameters()),
                   layout=_Shards(2, index))
    method.load_state_dict({"g": None, "held_parts": parts})
    (held,) = method.held
    assert torch.equal(held["x"], parts[0]["batch"]["x"][index:index + 1]) and held["labels"].tolist() == [index]
    assert held.accumulation_steps == 1 and float(held.num_items_in_batch) == 7.0


def test_a_held_batch_that_cannot_be_shared_evenly_is_refused():
    method = SAMPa(sam_hf.SharpnessConfig.create("sampa"), torch.optim.AdamW(MeanLossModel().parameters()),
                   layout=_Shards(3, 0))
    with pytest.raises(sam_hf.SharpnessConfigError, match="4 micro-batch.*3 data-parallel ranks.*divides 4"):
        method.load_state_dict({"g": None, "held_parts": _parts(4)})


def test_the_count_is_kept_over_the_replicas():
    """Role mode halves the count Trainer gathers over all 2k ranks (each sample is on two ranks): the checkpoint
    keeps the count over the replicas, and a role-mode run gets twice it back to halve."""
    config = sam_hf.SharpnessConfig.create("sampa")
    roles = SAMPa(config, torch.optim.AdamW(MeanLossModel().parameters()), layout=_Shards(1, 0, fraction=0.5))
    roles.load_state_dict({"g": None, "held_parts": _parts(2, count=10)})
    assert [float(b.num_items_in_batch) for b in roles.held] == [20.0, 20.0]
    saved = roles._part(roles.held[0])
    assert float(saved["num_items"]) == 10.0
    one = SAMPa(config, torch.optim.AdamW(MeanLossModel().parameters()), layout=_Shards(1, 0))
    one.load_state_dict({"g": None, "held_parts": [saved]})
    assert float(one.held[0].num_items_in_batch) == 10.0


def test_a_trainer_checkpoint_keeps_the_whole_held_batch(tmp_path):
    trainer = sam_hf.SharpnessTrainer(model=MeanLossModel(), train_dataset=vector_data(),
                                      args=args(tmp_path, "sampa", "rho=0.1", max_steps=2, save_strategy="steps",
                                                save_steps=2, gradient_accumulation_steps=2,
                                                per_device_train_batch_size=4))
    trainer.train()
    state = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)["sam_hf"]
    assert len(state["held_parts"]) == 2 and state["held_parts"][0]["batch"]["x"].shape == (4, 6)
