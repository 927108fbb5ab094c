"""One writer per shard: a stream's chunks staged, reduced, and committed in sequence order.

Ordering follows from one structure: the shard's *queue*. Every chunk the
stream sends becomes (part of) one work item appended to it in arrival order:
a staging block of consecutive chunks, one chunk on its own (empty, larger
than a block, or refused while decoding), or a duplicate to answer. A single
drain task per shard takes the items from the front, one at a time, and hands
each to the commit path; so commits, and the acknowledgements that follow
them, happen in sequence order by construction.

Reductions are pipelined: an item's engine work starts on a worker thread the
moment it is queued (the next block fills and reduces while the previous one
commits); the drain task only waits for it when the item reaches the front.
The same worker call takes each chunk's digest (``service/digest.py``), which
is committed with it; a re-sent chunk is decoded and digested too, so the
commit path can tell the same input resent from other content.

A staging block is flushed (queued) when it is full, when anything but the
next chunk arrives, when the stream closes or ends, or ``FLUSH_DELAY_S`` after
its last chunk, so a slow (or lock-step) stream still hears its
acknowledgements. A stream whose two blocks are both busy waits for one
(backpressure: it reads nothing meanwhile). Queued work runs to its end even if
the stream is cancelled, so a chunk is committed whole or not at all.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from evalstream.service.commit import ChunkOutcome, Committer, Pending
from evalstream.service.decode import DecodedChunk
from evalstream.service.digest import records_digest, scores_digest
from evalstream.service.engine import ChunkError
from evalstream.service.errors import FailedPrecondition
from evalstream.service.leases import Lease
from evalstream.service.records_wire import Received
from evalstream.service.reduction import Part, Reduced, Reduction
from evalstream.service.staging import StagingBlock, StagingBudget, StagingPool
from evalstream.service.telemetry import Telemetry

# A staged block is reduced after this long without a new chunk; a streaming client sends the
# next chunk well within it.
FLUSH_DELAY_S = 0.005
# Queued items already reduced commit together up to this many chunks and this many bytes of records
# (a transaction much larger than the store's page cache spills pages before it commits).
MERGE_CHUNKS = 64
MERGE_BYTES = 8 << 20


@dataclass(frozen=True)
class Shared:
    """What every shard's writer of one server uses."""

    reduction: Reduction
    committer: Committer
    budget: StagingBudget
    block_rows: int
    block_bytes: int
    telemetry: Telemetry
    in_worker: Callable[..., Awaitable[Any]]
    # Keeps a task referenced until done, so shutdown can wait for it (Coordinator.drain).
    track: Callable[[asyncio.Future[Any]], asyncio.Future[Any]]


@dataclass(frozen=True)
class _Received:
    """What a worker made of an item's chunks: their parts (None for a re-sent chunk, which is
    answered and never committed again) and each chunk's digest (None if it did not decode)."""

    parts: list[Part] | None
    digests: list[bytes | None]


@dataclass
class _Work:
    """One item of the shard's queue: chunks to commit once reduced, or a duplicate to judge."""

    sequences: list[int]
    num_bytes: list[int]
    outcomes: list[asyncio.Future[ChunkOutcome]]
    received: asyncio.Future[_Received]


class ShardWriter:
    """The writer of one lease's shard; all methods run on the event loop."""

    def __init__(self, lease: Lease, shared: Shared) -> None:
        self._lease = lease
        self._shared = shared
        self._staging: StagingPool | None = None
        self._block: StagingBlock | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_append = 0.0
        self._queue: deque[_Work] = deque()
        self._drainer: asyncio.Future[None] | None = None

    # -- intake -------------------------------------------------------------------------------

    def _check_sequence(self, sequence: int) -> None:
        """Chunks of scores and of records follow the same rules: an open shard, no gap."""
        lease = self._lease
        if lease.broken is not None:
            raise lease.broken
        if lease.closed:
            raise FailedPrecondition(f"rank {lease.rank} of {lease.key.name} is closed; open a new stream")
        if sequence > lease.accepted:
            raise FailedPrecondition(
                f"sequence gap on rank {lease.rank} of {lease.key.name}: "
                f"expected chunk {lease.accepted}, got {sequence}; resend from {lease.accepted}"
            )

    async def submit(self, sequence: int, decode: Callable[[], DecodedChunk]) -> asyncio.Future[ChunkOutcome]:
        """Take one chunk and return the future of its outcome (what its acknowledgement says)."""
        lease = self._lease
        self._check_sequence(sequence)
        if sequence < lease.accepted:
            self.flush()
            return self._enqueue([sequence], [0], asyncio.ensure_future(self._digest_resent(decode)))[0]
        lease.accepted += 1
        t0 = time.perf_counter()
        try:
            chunk = decode()
        except ChunkError as exc:
            self.flush()
            return self._enqueue([sequence], [0], _done(_Received([exc], [None])))[0]
        dtype = chunk.dtype
        s = self._shared
        staging = self._staging or StagingPool(lease.num_classes, s.block_rows, s.budget, s.block_bytes)
        self._staging = staging
        if chunk.rows == 0 or chunk.rows > staging.capacity(dtype):
            # Empty or larger than a block: reduced on its own, from views over the message bytes.
            self.flush()
            parts = asyncio.ensure_future(self._reduce_chunk(chunk))
            return self._enqueue([sequence], [chunk.num_bytes], parts)[0]
        block = self._block
        if block is not None and not block.accepts(chunk, dtype):
            self.flush()
            block = None
        if block is None:
            block = await staging.acquire(dtype)
            self._block = block
            self._arm(block, FLUSH_DELAY_S)
        outcome = _outcome_future()
        block.append(chunk, sequence, outcome)
        self._last_append = time.monotonic()
        s.telemetry.decode_seconds.observe(time.perf_counter() - t0)
        if block.full:
            self.flush()
        return outcome

    def submit_records(self, sequence: int, decode: Callable[[], Received]) -> asyncio.Future[ChunkOutcome]:
        """Take one RecordsChunk (records a client reduced): the sequence rules of ``submit``; the
        records are validated on a worker thread and committed in order like any chunk."""
        lease = self._lease
        self._check_sequence(sequence)
        self.flush()
        if sequence < lease.accepted:
            resent = asyncio.ensure_future(self._shared.in_worker(_digest_resent_records, decode))
            return self._enqueue([sequence], [0], resent)[0]
        lease.accepted += 1
        parts = asyncio.ensure_future(self._reduce_records(decode))
        return self._enqueue([sequence], [0], parts)[0]

    def flush(self) -> None:
        """Queue the open block (its reduction starts now), if there is one."""
        block = self._block
        if block is None:
            return
        self._block = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        segments = list(block.segments)
        received = asyncio.ensure_future(self._reduce_block(block))
        self._queue_work(
            _Work(
                [s.sequence for s in segments],
                [s.num_bytes for s in segments],
                [s.outcome for s in segments],
                received,
            )
        )

    def end(self) -> None:
        """The stream ended: what it sent is committed; idle staging blocks go back to the budget."""
        self.flush()
        if self._staging is not None:
            self._staging.close()  # the flushed block goes back once reduced

    async def settled(self) -> None:
        """Wait until every queued item has been committed and answered."""
        if self._drainer is not None:
            await asyncio.wait([self._drainer])

    def when_settled(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every queued item has been committed (now, if nothing is queued)."""
        if self._drainer is not None and not self._drainer.done():
            self._drainer.add_done_callback(lambda _f: callback())
        else:
            callback()

    # -- the flush timer ----------------------------------------------------------------------

    def _arm(self, block: StagingBlock, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._idle, block)

    def _idle(self, block: StagingBlock) -> None:
        """Flush a block that got no chunk for FLUSH_DELAY_S, so a slow stream still hears acks."""
        if self._block is not block:
            return
        waited = time.monotonic() - self._last_append
        if waited >= FLUSH_DELAY_S:
            self._timer = None
            self.flush()
        else:
            self._arm(block, FLUSH_DELAY_S - waited)

    # -- reductions (started when queued, on worker threads) ----------------------------------

    async def _reduce_chunk(self, chunk: DecodedChunk) -> _Received:
        lease, reduction = self._lease, self._shared.reduction

        def work() -> _Received:
            part = reduction.chunk(lease.num_classes, lease.score_kind, chunk)
            return _Received([part], [scores_digest(chunk.host, chunk.labels, chunk.sample_ids, chunk.dtype)])

        received: _Received = await self._shared.in_worker(work)
        return received

    async def _reduce_records(self, decode: Callable[[], Received]) -> _Received:
        reduction = self._shared.reduction

        def work() -> _Received:
            decoded: list[Received] = []

            def kept() -> Received:
                decoded.append(decode())
                return decoded[0]

            part = reduction.records(kept)
            return _Received([part], [records_digest(decoded[0].records) if decoded else None])

        received: _Received = await self._shared.in_worker(work)
        return received

    async def _digest_resent(self, decode: Callable[[], DecodedChunk]) -> _Received:
        """A re-sent chunk of scores: only its digest, to judge it against the committed one."""
        try:
            chunk = decode()
        except ChunkError:
            return _Received(None, [None])
        digest: bytes = await self._shared.in_worker(
            scores_digest, chunk.host, chunk.labels, chunk.sample_ids, chunk.dtype
        )
        return _Received(None, [digest])

    async def _reduce_block(self, block: StagingBlock) -> _Received:
        lease, reduction = self._lease, self._shared.reduction

        def work() -> _Received:
            parts = reduction.block(lease.num_classes, lease.score_kind, block)
            digests: list[bytes | None] = [
                scores_digest(*block.views(s.start, s.stop), block.dtype) for s in block.segments
            ]
            return _Received(parts, digests)

        try:
            received: _Received = await self._shared.in_worker(work)
            return received
        finally:
            assert self._staging is not None
            self._staging.release(block)

    # -- the queue ----------------------------------------------------------------------------

    def _enqueue(
        self, sequences: list[int], num_bytes: list[int], received: asyncio.Future[_Received]
    ) -> list[asyncio.Future[ChunkOutcome]]:
        outcomes = [_outcome_future() for _ in sequences]
        self._queue_work(_Work(sequences, num_bytes, outcomes, received))
        return outcomes

    def _queue_work(self, work: _Work) -> None:
        self._queue.append(work)
        if self._drainer is None or self._drainer.done():
            self._drainer = self._shared.track(asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        """Commit the queued items in order, front first (the only place that commits).

        Once the front item is reduced, the items behind it whose reductions have already
        finished join its commit (up to ``MERGE_CHUNKS`` chunks and ``MERGE_BYTES``): one store
        transaction and one trip through the store's threads for all of them. A stream the store
        keeps up with commits one item at a time as before; one that runs ahead of the store
        (records messages arrive far faster than a transaction of ~1 MiB commits) is committed
        in groups, so per-transaction work does not grow with the message rate. Order is
        unchanged: only a run of consecutive items merges, each chunk answered as before."""
        while self._queue:
            work = self._queue.popleft()
            await asyncio.wait([work.received])
            while self._queue and _ready(work) and _ready(self._queue[0]) and _room(work):
                work = _merged(work, self._queue.popleft())
            await self._run(work)

    async def _run(self, work: _Work) -> None:
        lease, committer = self._lease, self._shared.committer
        try:
            received = await work.received
            if received.parts is None:
                answer = await committer.duplicate(lease, work.sequences[0], received.digests[0])
                work.outcomes[0].set_result(answer)
                return
            each = (work.sequences, work.num_bytes, received.parts, work.outcomes, received.digests)
            batch = [Pending(*fields) for fields in zip(*each, strict=True)]
            await committer.commit(lease, batch)
        except BaseException as exc:
            for outcome in work.outcomes:
                if not outcome.done():
                    outcome.set_exception(exc)
            if not isinstance(exc, Exception):
                raise


def _ready(work: _Work) -> bool:
    """Reduced without an error (and not a re-sent chunk): it can join another item's commit."""
    fut = work.received
    if not fut.done() or fut.cancelled() or fut.exception() is not None:
        return False
    return fut.result().parts is not None


def _room(work: _Work) -> bool:
    """Whether a reduced item may take in another: under both merge limits."""
    parts = work.received.result().parts or []
    size = sum(len(p.records or b"") for p in parts if isinstance(p, Reduced))
    return len(work.sequences) < MERGE_CHUNKS and size < MERGE_BYTES


def _merged(first: _Work, second: _Work) -> _Work:
    """Two consecutive reduced items as one (committed in one transaction, answered as before)."""
    a, b = first.received.result(), second.received.result()
    assert a.parts is not None and b.parts is not None
    return _Work(
        first.sequences + second.sequences,
        first.num_bytes + second.num_bytes,
        first.outcomes + second.outcomes,
        _done(_Received(a.parts + b.parts, a.digests + b.digests)),
    )


def _outcome_future() -> asyncio.Future[ChunkOutcome]:
    fut: asyncio.Future[ChunkOutcome] = asyncio.get_running_loop().create_future()
    fut.add_done_callback(_retrieve)
    return fut


def _done(received: _Received) -> asyncio.Future[_Received]:
    fut: asyncio.Future[_Received] = asyncio.get_running_loop().create_future()
    fut.set_result(received)
    return fut


def _digest_resent_records(decode: Callable[[], Received]) -> _Received:
    """A re-sent RecordsChunk (on a worker thread): only its digest, None if it does not decode."""
    try:
        return _Received(None, [records_digest(decode().records)])
    except ChunkError:
        return _Received(None, [None])


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a failure as seen: a stream that already ended may never await it (its status was sent)."""
    if not fut.cancelled():
        fut.exception()
