"""The digest of a chunk's received input: what judges a re-sent sequence on any replica.

A sequence is committed once; when it arrives again (a replay after a lost
acknowledgement or a reconnect, perhaps to another replica) the server must tell
the same chunk resent (a duplicate, acknowledged) from different content under a
committed sequence (a conflict, refused). The records cannot judge it: two
replicas, or two engine backends, may reduce the same scores to floats that
differ in the last bit. So the judge is a digest of the input as decoded,
stored with the chunk in its commit.

The canonical form hashed is independent of how the request was encoded
(protobuf or the hand-written wire form, packed or unpacked shape, field order,
int32 or int64 labels): for a chunk of scores, a header naming the score dtype,
rows, classes and whether ids are present, then the scores' little-endian bytes
(bfloat16 as its bit patterns), the labels as int64 and the ids as int64; for a
records chunk (``reduce="client"``), a header with the row count and every
column of ``records.FIELDS`` in order, as received. Both are exactly the bytes
the staging copy or the records decoder already produced, so hashing reads
them once more and copies nothing.

The hash is XXH3-128: a chunk's digest must cost next to nothing on the ingest
path, and it does (0.04 ms a MiB, 5% of the compiled engine's time on the same
rows; blake2b costs 2.3 ms a MiB and sha256 1.5, more than the engine itself:
``bench/digest.py``, figures in bench/RESULTS.md). It guards against accidents (a client that re-sends other
data under a committed sequence), not against an adversary who could write to
the stream anyway. The first byte names the algorithm, so a later change of hash
compares only digests of the same kind (``same_input``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import xxhash

from evalstream.service.engine import Records
from evalstream.service.engine.records import FIELDS
from evalstream.wire import host_array

# The algorithm tag, the digest's first byte: 1 = XXH3-128 over the canonical form above.
XXH3_128 = b"\x01"


def scores_digest(
    scores: npt.NDArray[Any] | torch.Tensor,
    labels: npt.NDArray[Any] | torch.Tensor,
    sample_ids: npt.NDArray[Any] | torch.Tensor | None,
    dtype: torch.dtype,
) -> bytes:
    """The digest of one chunk of scores [n, C], labels [n] and optional ids [n] as decoded."""
    host = np.ascontiguousarray(host_array(scores))
    rows, classes = host.shape
    h = xxhash.xxh3_128()
    kind = str(dtype).removeprefix("torch.")
    h.update(f"scores {kind} {rows}x{classes} ids={sample_ids is not None};".encode())
    h.update(host.data)
    h.update(_int64(labels).data)
    if sample_ids is not None:
        h.update(_int64(sample_ids).data)
    return XXH3_128 + h.digest()


def records_digest(records: Records) -> bytes:
    """The digest of one RecordsChunk's records as received (every column, in ``FIELDS`` order)."""
    h = xxhash.xxh3_128()
    h.update(f"records {len(records)};".encode())
    for name in FIELDS:
        h.update(np.ascontiguousarray(getattr(records, name)).data)
    return XXH3_128 + h.digest()


def same_input(stored: bytes | None, resent: bytes | None) -> bool:
    """Whether a re-sent chunk is the one committed under its sequence.

    A stored digest of None (a chunk refused before it decoded, or committed before digests were
    kept) or of another algorithm judges nothing: the resend is taken as the duplicate it claims to
    be, as it always was. Otherwise the resend must have decoded to the same input.
    """
    if stored is None or stored[:1] != XXH3_128:
        return True
    return resent == stored


def _int64(values: npt.NDArray[Any] | torch.Tensor) -> npt.NDArray[np.int64]:
    array = values.numpy() if isinstance(values, torch.Tensor) else values
    return np.ascontiguousarray(array, dtype=np.dtype("<i8"))
