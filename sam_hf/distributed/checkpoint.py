"""Method state beside a sharded checkpoint (FSDP2): DTensors through torch.distributed.checkpoint.

accelerate saves an FSDP2 optimizer through `get_optimizer_state_dict`, which keeps only `state` and
`param_groups` and drops the method state that `SharpnessOptimizer.state_dict()` adds. So the sharded layouts
write it beside the optimizer: its DTensors through `torch.distributed.checkpoint` (every rank writes its shard,
and a different shard count can read them back), and per-rank values (SAMPa's held batch B_t is this rank's
share of the batch) to one small file per rank.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
import torch.distributed as dist

from ..config import SharpnessConfigError
from . import dtensor


STATE_DIR = "sam_hf_state"  # inside a checkpoint folder: the method state's DTensors (DCP)
RANK_FILE = "sam_hf_state.rank{rank}.pt"  # inside a checkpoint folder: each rank's own part of the method state


class _Slot:
    """Where a DTensor sat in the method state, with what is needed to allocate it again for loading."""

    def __init__(self, key: str, t):
        self.key, self.shape, self.dtype, self.placements = key, tuple(t.shape), t.dtype, tuple(t.placements)


def _split(obj, prefix: str, sharded: dict):
    """The state with each DTensor moved into `sharded` (under a path key) and replaced by a `_Slot`."""
    if dtensor.is_sharded(obj):
        sharded[prefix] = obj
        return _Slot(prefix, obj)
    if isinstance(obj, dict):
        return {k: _split(v, f"{prefix}.{k}", sharded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, f"{prefix}.{i}", sharded) for i, v in enumerate(obj))
    return obj


def _join(obj, loaded: dict):
    if isinstance(obj, _Slot):
        return loaded[obj.key]
    if isinstance(obj, dict):
        return {k: _join(v, loaded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, loaded) for v in obj)
    return obj


def _slots(obj, out: list):
    if isinstance(obj, _Slot):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _slots(v, out)
    return out


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_method_state(method, checkpoint_dir: str) -> None:
    """Write the method's state into `checkpoint_dir` (every rank calls it): DTensors through
    torch.distributed.checkpoint under `sam_hf_state/`, the rest (held batches: this rank's own data) to
    `sam_hf_state.rank{r}.pt`."""
    import torch.distributed.checkpoint as dcp

    sharded: dict[str, Any] = {}
    rest = _split(method.state_dict(), "state", sharded)
    os.makedirs(checkpoint_dir, exist_ok=True)
    torch.save({"state": rest, "world_size": dist.get_world_size() if dist.is_initialized() else 1},
               os.path.join(checkpoint_dir, RANK_FILE.format(rank=_rank())), pickle_protocol=pickle.HIGHEST_PROTOCOL)
    if sharded:
        dcp.save(sharded, checkpoint_id=os.path.join(checkpoint_dir, STATE_DIR))


def load_method_state(method, checkpoint_dir: str) -> bool:
    """Restore what `save_method_state` wrote (every rank calls it; the DTensors may be resharded, the per-rank
    part needs the world size it was saved with). Returns False where the checkpoint has no method state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import empty as dtensor_empty

    path = os.path.join(checkpoint_dir, RANK_FILE.format(rank=_rank()))
    if not os.path.exists(path):
        return False
    saved = torch.load(path, map_location="cpu", weights_only=False)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved.get("world_size", world) != world:
        raise SharpnessConfigError(
            f"sam_hf: the method state in {checkpoint_dir} was saved by {saved['world_size']} processes and this run "
            f"has {world}: each rank's held batch is its own share of the data; resume with {saved['world_size']}")
    method.rebind_params()
    mesh = next((p.device_mesh for p in method.params if dtensor.is_sharded(p)), None)
    slots = _slots(saved["state"], [])
    loaded = {}
    if slots:
        if mesh is None:
            raise SharpnessConfigError(f"sam_hf: {checkpoint_dir} holds sharded (FSDP2) method state, but this run's "
                                       "parameters are not sharded; resume under FSDP2")
        loaded = {s.key: dtensor_empty(s.shape, dtype=s.dtype, device_mesh=mesh, placements=s.placements)
                  for s in slots}
        dcp.load(loaded, checkpoint_id=os.path.join(checkpoint_dir, STATE_DIR))
    method.load_state_dict(_join(saved["state"], loaded))
    return True

