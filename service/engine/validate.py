"""Checks on an incoming chunk, all done before any arithmetic so a bad chunk changes nothing.

Every failure is a ``ChunkError`` whose ``reason`` is a stable key and whose
message names the problem and the first offending index or value. Checks that
need a pass over the scores (non-finite values, log-probability rows) happen in
the reducer's fused pass; ``locate_non_finite`` turns its cheap per-row signal
into an exact position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from evalstream.service.engine.errors import ChunkError

SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int32, torch.int64)


def as_tensor(x: object, what: str) -> torch.Tensor:
    """A torch view of a numpy array or tensor, without copying."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype.byteorder == ">":
            x = x.astype(x.dtype.newbyteorder("<"))
        try:
            return torch.from_numpy(x)
        except TypeError as exc:
            reason = (
                "score_dtype"
                if what == "scores"
                else "label_dtype"
                if what == "labels"
                else "sample_id_dtype"
            )
            raise ChunkError(reason, f"{what} has unsupported dtype {x.dtype}") from exc
    raise ChunkError(
        "shape_mismatch", f"{what} must be a numpy array or torch tensor, got {type(x).__name__}"
    )


@dataclass
class Chunk:
    """A validated chunk: scores [n, C] (float32/16/bf16), labels [n] int64 on CPU, ids or None."""

    scores: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor | None


def validate(scores: object, labels: object, sample_ids: object, num_classes: int) -> Chunk:
    """Shape, dtype and range checks that need no pass over the scores."""
    s = as_tensor(scores, "scores")
    y = as_tensor(labels, "labels")
    if s.dtype not in SCORE_DTYPES:
        raise ChunkError("score_dtype", f"scores dtype {s.dtype} is not float32, float16 or bfloat16")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ChunkError(
            "label_dtype", f"labels dtype {y.dtype} is not an integer type (send int32 or int64)"
        )
    if y.dtype not in LABEL_DTYPES:
        raise ChunkError("label_dtype", f"labels dtype {y.dtype} is not int32 or int64")
    if s.dim() != 2:
        raise ChunkError("shape_mismatch", f"scores must be [n, C], got shape {list(s.shape)}")
    if y.dim() != 1:
        raise ChunkError("shape_mismatch", f"labels must be [n], got shape {list(y.shape)}")
    n, c = s.shape
    if y.shape[0] != n:
        raise ChunkError("shape_mismatch", f"scores have {n} rows but labels have {y.shape[0]}")
    if n > 0 and c != num_classes:
        raise ChunkError(
            "class_count_mismatch", f"scores have {c} classes but this evaluation has {num_classes}"
        )
    ids: torch.Tensor | None = None
    if sample_ids is not None:
        ids = as_tensor(sample_ids, "sample_ids")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ChunkError("sample_id_dtype", f"sample_ids dtype {ids.dtype} is not an integer type")
        if ids.dim() != 1 or ids.shape[0] != n:
            raise ChunkError(
                "sample_ids_length", f"sample_ids has shape {list(ids.shape)}, expected [{n}] (one per row)"
            )
        ids = ids.to("cpu", torch.int64)
        if n > 0:
            neg = ids < 0
            if bool(neg.any()):
                i = int(neg.nonzero()[0, 0])
                raise ChunkError("sample_id_negative", f"sample_ids[{i}] = {int(ids[i])} is negative")
    y64 = y.to("cpu", torch.int64)
    if n > 0:
        bad = (y64 < 0) | (y64 >= num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ChunkError(
                "label_out_of_range", f"labels[{i}] = {int(y64[i])} is outside [0, {num_classes})"
            )
    return Chunk(s, y64, ids)


def locate_non_finite(block: torch.Tensor, row_offset: int) -> ChunkError:
    """The error for the first NaN/Inf in ``block`` (rows offset by ``row_offset`` in the chunk)."""
    bad = ~torch.isfinite(block)
    if not bool(bad.any()):
        return ChunkError(
            "non_finite",
            f"scores in rows {row_offset}..{row_offset + block.shape[0] - 1} overflow float32 "
            "arithmetic (logit range above ~3e38)",
        )
    r, c = (int(v) for v in bad.nonzero()[0])
    value = float(block[r, c])
    return ChunkError("non_finite", f"scores[{row_offset + r}, {c}] = {value} is not finite")
