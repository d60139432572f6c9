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
STATE_FILE = "sam_hf_state.pt"  # inside a checkpoint folder: the rest of the method state (rank 0 writes it)
RANK_FILE = "sam_hf_state.rank{rank}.pt"  # the per-rank files of checkpoints written before STATE_FILE existed
SLOT = "__sam_hf_dtensor__"  # marks where a DTensor sat in the state


def _placement_text(p) -> str:
    if p.is_shard():
        return f"S{p.dim}"
    if p.is_replicate():
        return "R"
    raise ValueError(f"sam_hf: cannot checkpoint a DTensor with placement {p}")


def _placement(text: str):
    from torch.distributed.tensor import Replicate, Shard

    return Replicate() if text == "R" else Shard(int(text[1:]))


def _split(obj, prefix: str, sharded: dict):
    """The state with each DTensor moved into `sharded` (under a path key) and replaced by a plain slot: what is
    needed to allocate it again for loading (shape, dtype, placements), in types `weights_only` loading accepts."""
    if dtensor.is_sharded(obj):
        sharded[prefix] = obj
        return {SLOT: prefix, "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch."),
                "placements": [_placement_text(p) for p in obj.placements]}
    if isinstance(obj, dict):
        return {k: _split(v, f"{prefix}.{k}", sharded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, f"{prefix}.{i}", sharded) for i, v in enumerate(obj))
    return obj


def _walk(obj, visit):
    """`obj` with each slot replaced by visit(slot)."""
    if isinstance(obj, dict) and SLOT in obj:
        return visit(obj)
    if isinstance(obj, dict):
        return {k: _walk(v, visit) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_walk(v, visit) for v in obj)
    return obj


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_method_state(method, checkpoint_dir: str) -> None:
    """Write the method's state into `checkpoint_dir` (every rank calls it; it gathers per-shard state first):
    DTensors through torch.distributed.checkpoint under `sam_hf_state/` (every rank its shard), the rest, the same on
    every rank once gathered, to `sam_hf_state.pt` by rank 0."""
    import torch.distributed.checkpoint as dcp

    method.prepare_checkpoint()
    sharded: dict[str, Any] = {}
    rest = _split(method.state_dict(), "state", sharded)
    os.makedirs(checkpoint_dir, exist_ok=True)
    if _rank() == 0:
        torch.save({"state": rest, "format": 2}, os.path.join(checkpoint_dir, STATE_FILE))
    if sharded:
        dcp.save(sharded, checkpoint_id=os.path.join(checkpoint_dir, STATE_DIR))


def load_method_state(method, checkpoint_dir: str) -> bool:
    """Restore what `save_method_state` wrote (every rank calls it; the DTensors may be resharded onto another
    number of ranks). Returns False where the checkpoint has no method state. Files are read with
    `weights_only=True`: a checkpoint that carries anything but tensors and plain containers is refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import empty as dtensor_empty

    path = os.path.join(checkpoint_dir, STATE_FILE)
    if os.path.exists(path):
        saved = _load(path)
    else:
        path = os.path.join(checkpoint_dir, RANK_FILE.format(rank=_rank()))
        if not os.path.exists(path):
            return False
        saved = _load_legacy(path, checkpoint_dir)
    method.rebind_params()
    mesh = next((p.device_mesh for p in method.params if dtensor.is_sharded(p)), None)
    slots = []
    _walk(saved["state"], lambda slot: slots.append(slot))
    loaded = {}
    if slots:
        if mesh is None:
            raise SharpnessConfigError(f"sam_hf: {checkpoint_dir} holds sharded (FSDP2) method state, but this run's "
                                       "parameters are not sharded; resume under FSDP2")
        loaded = {s[SLOT]: dtensor_empty(s["shape"], dtype=getattr(torch, s["dtype"]), device_mesh=mesh,
                                         placements=[_placement(p) for p in s["placements"]]) for s in slots}
        dcp.load(loaded, checkpoint_id=os.path.join(checkpoint_dir, STATE_DIR))
    method.load_state_dict(_walk(saved["state"], lambda slot: loaded[slot[SLOT]]))
    return True


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SharpnessConfigError(
            f"sam_hf: {path} holds more than tensors and plain containers, so it is not loaded (unpickling it "
            f"could run code from the file). If you wrote it yourself and trust it, convert it with "
            f"torch.load(..., weights_only=False) and save plain types. ({err})") from None


class _LegacySlot:
    """How sam_hf before the layouts recorded a DTensor's place in the method state (`sam_hf.sharding._Slot`):
    plain data, allowed by name to `weights_only` loading so that older FSDP2 checkpoints still resume."""


_LegacySlot.__module__, _LegacySlot.__qualname__, _LegacySlot.__name__ = "sam_hf.sharding", "_Slot", "_Slot"


def _load_legacy(path: str, checkpoint_dir: str):
    """A per-rank file of an older checkpoint: its held batch is this rank's own share of the data, so it
    resumes only with the number of processes that wrote it."""
    from torch.distributed.tensor import Replicate, Shard

    with torch.serialization.safe_globals([_LegacySlot, Shard, Replicate]):
        saved = _load(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved.get("world_size", world) != world:
        raise SharpnessConfigError(
            f"sam_hf: the method state in {checkpoint_dir} was saved by {saved['world_size']} processes (an older "
            f"sam_hf, one file per rank) and this run has {world}: each rank's held batch is its own share of the "
            f"data; resume with {saved['world_size']}")

    def convert(obj):
        if isinstance(obj, _LegacySlot):
            return {SLOT: obj.key, "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch."),
                    "placements": [_placement_text(p) for p in obj.placements]}
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(convert(v) for v in obj)
        return obj

    return {"state": convert(saved["state"])}
