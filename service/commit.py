"""The one commit path: chunks (a staging block, or one chunk) committed in order, then answered.

Every chunk a stream sends ends here, as a part of a batch: its records, or the
``ChunkError`` that refused it (a rejection is an outcome of the commit, stored
with the shard's next sequence like any other chunk). The batch is one store
transaction; only after it returns is any chunk of it acknowledged. Telemetry
of committed, rejected and duplicate chunks is counted here and nowhere else.

A sequence conflict means the store is ahead of the lease (a previous stream's
commit of the same chunks landed late): the lease is brought up to the store,
the chunks it already holds are answered as duplicates, and the rest of the
batch is committed after them in one more transaction.

A chunk below the committed sequence is a duplicate only if it is the same
input: its digest (``service/digest.py``) is compared with the one stored at its
first commit, by whichever replica made it. Other content under a committed
sequence ends the stream with FAILED_PRECONDITION (retrying the same thing
cannot help) and commits nothing more of it: the evaluation is left as it was.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from evalstream.service.digest import same_input
from evalstream.service.engine import ChunkError
from evalstream.service.errors import Aborted, FailedPrecondition, rejection_code
from evalstream.service.leases import Lease
from evalstream.service.reduction import Part, Reduced
from evalstream.service.store.base import ChunkCommit, Rejection, Store, StoredChunk
from evalstream.service.store.errors import SequenceConflict
from evalstream.service.telemetry import Telemetry

# The telemetry reason of a re-sent sequence whose content differs from the committed chunk.
RESENT_DIFFERENT = "resent_different_content"


@dataclass(frozen=True)
class ChunkRejection:
    """An in-band rejection as the client hears it: the stored reason and message, and its status."""

    sequence: int
    code: str
    reason: str
    message: str

    @classmethod
    def of(cls, rejection: Rejection) -> ChunkRejection:
        return cls(rejection.sequence, rejection_code(rejection.reason), rejection.reason, rejection.message)


@dataclass(frozen=True)
class ChunkOutcome:
    """What a chunk's acknowledgement says."""

    next_sequence: int
    samples_committed: int
    duplicate: bool = False
    rejection: ChunkRejection | None = None


@dataclass(frozen=True)
class Pending:
    """One chunk of a batch: its sequence, its bytes on the wire, its reduction, and the future its
    outcome is set on once committed."""

    sequence: int
    num_bytes: int
    part: Part
    outcome: asyncio.Future[ChunkOutcome]
    # The digest of the chunk's received input; None when it did not decode.
    digest: bytes | None = None


class Committer:
    """Commits batches of one server's streams and turns what the store kept into outcomes."""

    def __init__(self, store: Store, telemetry: Telemetry, in_io: Callable[..., Awaitable[Any]]) -> None:
        self._store = store
        self._telemetry = telemetry
        self._in_io = in_io

    async def commit(self, lease: Lease, batch: Sequence[Pending]) -> None:
        """Commit the batch in sequence order (one transaction per run without a conflict) and answer
        each chunk's outcome as its transaction returns; a failure is left to the caller to answer."""
        rest = list(batch)
        while rest:
            if lease.broken is not None:
                raise lease.broken
            while rest and rest[0].sequence < lease.next_sequence:  # committed before (resynced below)
                rest[0].outcome.set_result(await self.duplicate(lease, rest[0].sequence, rest[0].digest))
                rest = rest[1:]
            if not rest:
                break
            started = time.perf_counter()
            stored = await self._in_io(
                self._store.commit_chunks, lease.evaluation_id, lease.rank, [_commit_of(p) for p in rest]
            )
            self._telemetry.commit_seconds.observe(time.perf_counter() - started)
            if not stored:
                raise RuntimeError("the store committed nothing of a non-empty batch and named no conflict")
            for pending, result in zip(rest, stored, strict=False):
                if isinstance(result, SequenceConflict):
                    pending.outcome.set_result(await self._resync(lease, result, pending.digest))
                    break
                pending.outcome.set_result(self._outcome(lease, pending, result))
            rest = rest[len(stored) :]

    async def duplicate(self, lease: Lease, sequence: int, digest: bytes | None) -> ChunkOutcome:
        """A chunk below the committed sequence: answered as before and counted once more as a retry
        if it is the input committed then (``digest``); else the stream ends, changing nothing."""
        if lease.broken is not None:
            raise lease.broken
        committed = await self._in_io(self._store.chunk_digest, lease.evaluation_id, lease.rank, sequence)
        if not same_input(committed, digest):
            self._telemetry.rejected_chunks.labels(reason=RESENT_DIFFERENT).inc()
            lease.broken = FailedPrecondition(
                f"chunk {sequence} of rank {lease.rank} of evaluation {lease.key.name} was committed before "
                "with other content: a re-sent chunk must carry the data it carried the first time. "
                f"Nothing of this stream was committed from chunk {sequence} on and the evaluation is "
                f"unchanged; resend the original chunks from {sequence}, or stream different data as a new "
                "evaluation (another step or model)"
            )
            raise lease.broken
        self._telemetry.duplicate_chunks.inc()
        stored = await self._in_io(self._store.rejection, lease.evaluation_id, lease.rank, sequence)
        rejection = None if stored is None else ChunkRejection.of(stored)
        return ChunkOutcome(lease.next_sequence, lease.samples, duplicate=True, rejection=rejection)

    def _outcome(self, lease: Lease, pending: Pending, stored: StoredChunk) -> ChunkOutcome:
        """The acknowledgement of one stored chunk; counts it in telemetry."""
        shard, rejection = stored.shard, stored.rejection
        lease.advance(shard)
        if rejection is not None:
            self._telemetry.rejected_chunks.labels(reason=rejection.reason).inc()
            return ChunkOutcome(shard.next_sequence, shard.samples, rejection=ChunkRejection.of(rejection))
        assert isinstance(pending.part, Reduced)
        self._telemetry.chunks.inc()
        self._telemetry.samples.inc(pending.part.samples)
        self._telemetry.count_bytes(pending.part.mode, pending.part.num_bytes)
        return ChunkOutcome(shard.next_sequence, shard.samples)

    async def _resync(self, lease: Lease, conflict: SequenceConflict, digest: bytes | None) -> ChunkOutcome:
        """The store is ahead of the lease (a previous stream's commit landed late): it was a retry."""
        if conflict.got < conflict.expected:
            for shard in await self._in_io(self._store.shards, lease.evaluation_id):
                if shard.rank == lease.rank:
                    lease.advance(shard)
            return await self.duplicate(lease, conflict.got, digest)
        lease.broken = Aborted(f"rank {lease.rank} of {lease.key.name} changed under this stream; reopen it")
        raise lease.broken


def _commit_of(pending: Pending) -> ChunkCommit:
    part = pending.part
    if isinstance(part, ChunkError):
        rejection = Rejection(pending.sequence, part.reason, part.message)
        return ChunkCommit(pending.sequence, rejection=rejection, digest=pending.digest)
    return ChunkCommit(
        pending.sequence, part.samples, part.records, part.nll_sum, part.correct, digest=pending.digest
    )
