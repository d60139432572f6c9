"""Method state beside a sharded checkpoint (FSDP2): DTensors through torch.distributed.checkpoint.

accelerate saves an FSDP2 optimizer through `get_optimizer_state_dict`, which keeps only `state` and
`param_groups` and drops the method state that `SharpnessOptimizer.state_dict()` adds. So the sharded layouts
write it beside the optimizer: its DTensors through `torch.distributed.checkpoint` (every rank writes its shard,
and a different shard count can read them back), and per-rank values (SAMPa's held batch B_t is this rank's
share of the batch) to one small file per rank.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import types
import warnings
from typing import Any

import torch
import torch.distributed as dist

from ..config import SharpnessConfigError
from . import dtensor


STATE_DIR = "sam_hf_state"  # inside a checkpoint folder: the method state's DTensors (DCP)
STATE_FILE = "sam_hf_state.pt"  # inside a checkpoint folder: the rest of the method state (rank 0 writes it)
RANK_FILE = "sam_hf_state.rank{rank}.pt"  # the per-rank files of checkpoints written before STATE_FILE existed
SLOT = "__sam_hf_dtensor__"  # the marker key of a plain dict that stands where a DTensor sat in the method state


def _slot(key: str, t) -> dict:
    """Where a DTensor sat in the method state, with what is needed to allocate it again for loading: a plain dict
    (torch.load(weights_only=True) reads it; placements and dtypes are on torch's own allow-list)."""
    return {SLOT: key, "shape": list(t.shape), "dtype": t.dtype, "placements": list(t.placements)}


def _is_slot(obj) -> bool:
    return isinstance(obj, dict) and SLOT in obj


def _split(obj, prefix: str, sharded: dict):
    """The state with each DTensor moved into `sharded` (under a path key) and replaced by a slot."""
    if dtensor.is_sharded(obj):
        sharded[prefix] = obj
        return _slot(prefix, obj)
    if isinstance(obj, dict):
        return {k: _split(v, f"{prefix}.{k}", sharded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, f"{prefix}.{i}", sharded) for i, v in enumerate(obj))
    return obj


def _join(obj, loaded: dict):
    if _is_slot(obj):
        return loaded[obj[SLOT]]
    if isinstance(obj, dict):
        return {k: _join(v, loaded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, loaded) for v in obj)
    return obj


def _slots(obj, out: list):
    if _is_slot(obj):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _slots(v, out)
    return out


class _LegacySlot:
    """Files sam_hf wrote before its slots were plain dicts hold pickled `sam_hf.sharding._Slot` objects (attributes
    key, shape, dtype, placements) in pickle protocol 5, which torch's weights_only unpickler does not read. They
    are read by `_LegacyUnpickler`, which resolves only the globals such a file holds: this class (built without
    running any of its code: the unpickler sets its attributes), tensors, dtypes and DTensor placements."""

    def as_dict(self) -> dict:
        return {SLOT: self.key, "shape": list(self.shape), "dtype": self.dtype, "placements": list(self.placements)}


class _LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        from torch.distributed.tensor import placement_types

        if (module, name) == ("sam_hf.sharding", "_Slot"):
            return _LegacySlot
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == placement_types.__name__ and name in ("Shard", "Replicate", "Partial", "_StridedShard"):
            return getattr(placement_types, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not a tensor, a dtype or a "
                                     "placement")


_legacy_pickle = types.SimpleNamespace(__name__="sam_hf_legacy_pickle", Unpickler=_LegacyUnpickler,
                                       load=pickle.load)


def _from_legacy(obj):
    if isinstance(obj, _LegacySlot):
        return obj.as_dict()
    if isinstance(obj, dict):
        return {k: _from_legacy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_legacy(v) for v in obj)
    return obj


def read_state_file(path: str) -> dict:
    """One rank's method-state file, read with `torch.load(weights_only=True)`: tensors, plain containers and
    torch's allow-listed types only, so a file carrying any other pickled object is refused, never run. A file of
    the previous format (pickle protocol 5, `_Slot` objects) is read by `_LegacyUnpickler`, as restricted."""
    try:
        try:
            with warnings.catch_warnings():  # torch warns about protocol 5 before it fails on it
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                saved = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Unsupported operand 149" not in str(err):  # 149: FRAME, pickle protocol 4+: the previous format
                raise
            saved = _from_legacy(torch.load(path, map_location="cpu", weights_only=False,
                                            pickle_module=_legacy_pickle))
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"a pickled {found.group(1)}" if found else "a pickled object"
        raise SharpnessConfigError(
            f"sam_hf: refusing to load {path}: it holds {what}, which is not a tensor or a plain container, and "
            "unpickling it could run code from the file. sam_hf writes only tensors and plain "
            "containers there; if the checkpoint is yours, delete the file to resume without the method state (the "
            "method starts its state afresh), or resume from a checkpoint sam_hf wrote") from None
    if not (isinstance(saved, dict) and "state" in saved):
        raise SharpnessConfigError(f"sam_hf: {path} is not a method-state file sam_hf wrote (no 'state' entry)")
    return saved


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_method_state(method, checkpoint_dir: str) -> None:
    """Write the method's state into `checkpoint_dir` (every rank calls it; it gathers per-shard state first, so
    the state does not depend on the number of processes): DTensors through torch.distributed.checkpoint under
    `sam_hf_state/` (every rank its shard), the rest, the same on every rank once gathered, to `sam_hf_state.pt`
    by rank 0, in torch's default pickle protocol (the one `torch.load(weights_only=True)` reads)."""
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
    number of ranks). Returns False where the checkpoint has no method state. An older checkpoint's per-rank file
    holds that rank's own share of the data: it resumes with the number of processes that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import empty as dtensor_empty

    path = os.path.join(checkpoint_dir, STATE_FILE)
    if os.path.exists(path):
        saved = read_state_file(path)
    else:
        path = os.path.join(checkpoint_dir, RANK_FILE.format(rank=_rank()))
        if not os.path.exists(path):
            return False
        saved = read_state_file(path)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if saved.get("world_size", world) != world:
            raise SharpnessConfigError(
                f"sam_hf: the method state in {checkpoint_dir} was saved by {saved['world_size']} processes (one "
                f"file per rank, an older sam_hf) and this run has {world}: each rank's held batch is its own share of "
                f"the data; resume with {saved['world_size']}")
    method.rebind_params()
    mesh = next((p.device_mesh for p in method.params if dtensor.is_sharded(p)), None)
    slots = _slots(saved["state"], [])
    loaded = {}
    if slots:
        if mesh is None:
            raise SharpnessConfigError(f"sam_hf: {checkpoint_dir} holds sharded (FSDP2) method state, but this run's "
                                       "parameters are not sharded; resume under FSDP2")
        loaded = {s[SLOT]: dtensor_empty(s["shape"], dtype=s["dtype"], device_mesh=mesh, placements=s["placements"])
                  for s in slots}
        dcp.load(loaded, checkpoint_id=os.path.join(checkpoint_dir, STATE_DIR))
    method.load_state_dict(_join(saved["state"], loaded))
    return True
