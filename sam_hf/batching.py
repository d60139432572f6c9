"""Cutting Trainer batches into sample ranges, for mSAM and Asynchronous SAM.

A step's batch B is the list of micro-batches Trainer hands in over one
gradient-accumulation cycle. mSAM's micro-batches and Asynchronous SAM's ascent
batch are sample ranges of B that may cross micro-batch boundaries, so a range
becomes a list of *pieces*: (sub-batch, share of its micro-batch's samples, the
micro-batch it was cut from, or None when it is the whole micro-batch). The
parent is what fixes a slice's units: a slice contributes exactly its part of
the loss Trainer computes for the whole micro-batch (trainer.TrainerPasses).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

Batch = Mapping[str, Any]


class TrainerBatch(dict):
    """A micro-batch as Trainer handed it in, with the `num_items_in_batch` of its accumulation cycle
    (Trainer's loss normaliser), so a batch held for a later step keeps its own."""

    num_items_in_batch = None
    accumulation_steps = None  # micro-batches in its accumulation cycle (Trainer's loss divisor without a count)
    metrics_counted = False  # a pass over it already counted in the per-pass metrics (TRL's), see TrainerPasses

    @classmethod
    def of(cls, batch: Mapping, num_items_in_batch=None, accumulation_steps=None) -> "TrainerBatch":
        out = cls(batch)
        out.num_items_in_batch = num_items_in_batch
        out.accumulation_steps = accumulation_steps
        return out


def batch_size(batch: Batch) -> int:
    """Number of samples: the first dimension of the first tensor in the batch."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"sam_hf needs dict-like batches (as Trainer's collators produce), got {type(batch).__name__}")
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"cannot find the batch dimension: no tensor in batch keys {list(batch)}")


def slice_batch(batch: Batch, start: int, stop: int) -> dict[str, Any]:
    """Samples [start, stop) of a batch; per-sample lists are cut too, other values kept as they are."""
    n = batch_size(batch)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[start:stop]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = value[start:stop]
        else:
            out[key] = value
    return out


def take_rows(batch: Batch, rows: torch.Tensor) -> "TrainerBatch":
    """The samples at indices `rows` (a 1-D index tensor) of a batch (ESAM's selected rows); per-sample lists are cut
    too, other values kept as they are."""
    n = batch_size(batch)
    out = TrainerBatch()
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


class Piece(NamedTuple):
    batch: Batch  # the samples of this piece
    fraction: float  # their share of the parent micro-batch's samples
    parent: Batch | None  # the micro-batch they were cut from; None: the piece is that whole micro-batch


def sample_range(batches: list[Batch], start: int, stop: int) -> list[Piece]:
    """Samples [start, stop) of the concatenation of `batches`, as pieces."""
    pieces: list[Piece] = []
    offset = 0
    for batch in batches:
        n = batch_size(batch)
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            if lo == offset and hi == offset + n:
                pieces.append(Piece(batch, 1.0, None))
            else:
                pieces.append(Piece(TrainerBatch(slice_batch(batch, lo - offset, hi - offset)), (hi - lo) / n, batch))

        offset += n
    return pieces


def split_samples(batches: list[Batch], parts: int) -> list[list[Piece]]:
    """`parts` consecutive sample ranges of the batches, sizes differing by at most one."""
    total = sum(batch_size(b) for b in batches)
    if parts > total:
        raise ValueError(f"cannot split {total} samples into {parts} non-empty micro-batches")
    base, extra = divmod(total, parts)
    ranges, start = [], 0
    for j in range(parts):
        stop = start + base + (1 if j < extra else 0)
        ranges.append(sample_range(batches, start, stop))
        start = stop
    return ranges


def select_batch(batch: Batch, rows: list[int]) -> dict[str, Any]:
    """Samples `rows` (sorted) of a batch; per-sample lists are cut too, other values kept as they are."""
    n = batch_size(batch)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[torch.as_tensor(rows, dtype=torch.long, device=value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = type(value)(value[i] for i in rows)
        else:
            out[key] = value
    return out


def chosen_samples(batches: list[Batch], rows) -> list[Piece]:
    """The samples `rows` (indices into the concatenation of `batches`) as pieces, one per micro-batch they fall in."""
    rows = sorted(int(r) for r in rows)
    pieces: list[Piece] = []
    offset = 0
    for batch in batches:
        n = batch_size(batch)
        mine = [r - offset for r in rows if offset <= r < offset + n]
        if len(mine) == n:
            pieces.append(Piece(batch, 1.0, None))
        elif mine:
            pieces.append(Piece(TrainerBatch(select_batch(batch, mine)), len(mine) / n, batch))
        offset += n
    return pieces


def ascent_count(batches: list[Batch], ratio: float) -> int:
    """ceil(ratio * |B|) samples (at least one): the size of Asynchronous SAM's A_t."""
    return max(1, math.ceil(ratio * sum(batch_size(b) for b in batches) - 1e-9))


def leading_samples(batches: list[Batch], ratio: float) -> list[Piece]:
    """The first ceil(ratio * |B|) samples of the step's batch B (Asynchronous SAM's A_t)."""
    return sample_range(batches, 0, ascent_count(batches, ratio))
