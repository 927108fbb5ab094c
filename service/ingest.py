"""Shard leases, sequence numbers, commit and finalize: the ingest protocol without gRPC.

Rules it enforces (the servicer only translates messages):

- One stream holds a rank at a time (a lease); a second open of the same rank
  is ABORTED until the first stream ends.
- A chunk below the shard's next sequence is a retry: acknowledged as a
  duplicate, never counted again. A chunk above it is a gap: a protocol error.
- A chunk is decoded and reduced off the event loop, then its records and the
  shard's next sequence are committed in one store transaction; only then is
  the acknowledgement produced. A rejected chunk consumes its sequence number
  (and its reason is stored) and changes nothing else.
- When every rank has closed (or on an explicit finalize) the committed
  records are merged, deduplicated by sample id, ``compute_metrics`` runs, and
  the result replaces the chunk rows in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from evalstream.service.convert import result_from_report
from evalstream.service.engine import ChunkError, EngineConfig, Records
from evalstream.service.engine.metrics import compute_metrics, running_summary
from evalstream.service.engine.records import FIELDS
from evalstream.service.engine.reducer import ChunkReducer, resolve_backend, resolve_device
from evalstream.service.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from evalstream.service.settings import Settings
from evalstream.service.staging import (
    MAX_BLOCKS,
    STAGING_BYTES,
    Segment,
    StagingBlock,
    StagingBudget,
    StagingPool,
)
from evalstream.service.status import SeriesKey, ShardProgress
from evalstream.service.store.base import (
    ChunkCommit,
    EvaluationKey,
    EvaluationRow,
    Rejection,
    SequenceConflict,
    ShardOpenRequest,
    ShardRow,
    Store,
    StoredChunk,
)
from evalstream.service.telemetry import Telemetry
from evalstream.service.wire import DecodedChunk

log = logging.getLogger(__name__)
T = TypeVar("T")

# Safe as a Prometheus label value, a file name component and a URL path segment.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+=@-]{0,127}$")
DEFAULT_SPLIT = "validation"
# Codes of in-band rejections by reason; everything else a bad chunk can be is INVALID_ARGUMENT.
# Larger worlds are a mistake, not a job (and would never finalize): refused at open.
MAX_WORLD_SIZE = 1 << 16
REJECTION_CODES = {"chunk_too_large": "RESOURCE_EXHAUSTED", "evaluation_too_large": "RESOURCE_EXHAUSTED"}
# Classes of the throwaway kernel compiled at start: any count works, the point is the compiler's
# process-wide start-up (dynamo, inductor, the C++ toolchain), ~4-6 s of the first compile.
WARM_UP_CLASSES = 2
# A staged block is reduced after this long without a new chunk, so a slow (or lock-step) stream
# still hears its acknowledgements; a streaming client sends the next chunk well within it.
FLUSH_DELAY_S = 0.005


def validate_name(what: str, value: str) -> str:
    """Run, model and split names end up in label values and paths; refuse anything unsafe."""
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{what} {value!r} is not a valid name: use 1-128 characters from letters, digits "
            "and . _ : + = @ -, "
            "starting with a letter or digit"
        )
    return value


def evaluation_key(run: str, model: str, split: str, step: int) -> EvaluationKey:
    """A validated key; an empty split means "validation"."""
    split = split or DEFAULT_SPLIT
    if step < 0:
        raise InvalidArgument(f"step must be >= 0, got {step}")
    return EvaluationKey(
        validate_name("run", run), validate_name("model", model), validate_name("split", split), step
    )


@dataclass
class Lease:
    """One stream's hold on one rank of one evaluation."""

    evaluation_id: str
    key: EvaluationKey
    rank: int
    world_size: int
    num_classes: int
    score_kind: str
    peer: str
    next_sequence: int
    samples: int
    chunks: int
    rejected: int
    closed: bool = False
    # Chunks accepted for processing (>= next_sequence while some are in flight).
    accepted: int = 0
    # The last chunk's work: the next chunk commits only after it (commits stay in order).
    tail: asyncio.Future[Any] | None = field(default=None, repr=False)
    # The staging block now filling, the stream's blocks, and the idle-flush timer (see submit_chunk).
    block: StagingBlock | None = field(default=None, repr=False)
    staging: StagingPool | None = field(default=None, repr=False)
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    last_append: float = 0.0

    def __post_init__(self) -> None:
        self.accepted = max(self.accepted, self.next_sequence)


@dataclass(frozen=True)
class Opened:
    lease: Lease | None  # None when the shard was closed before
    evaluation: EvaluationRow
    shard: ShardRow

    @property
    def already_closed(self) -> bool:
        return self.lease is None


@dataclass(frozen=True)
class ChunkOutcome:
    next_sequence: int
    samples_committed: int
    duplicate: bool = False
    rejection: Rejection | None = None


@dataclass(frozen=True)
class Closed:
    evaluation: EvaluationRow
    shard: Lease
    finalized: bool


@dataclass(frozen=True)
class _Reduced:
    records: bytes | None
    samples: int
    nll_sum: float
    correct: int
    num_bytes: int


class ReducerPool:
    """Reducers keyed by (classes, score kind), one per concurrent user.

    A reducer holds [rows, C] scratch buffers (tens of MB at C=3,000), so they
    are shared across streams and bounded by the worker threads, not created
    per stream.
    """

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._free: dict[tuple[int, str], list[ChunkReducer]] = {}
        self._tlock = threading.Lock()  # the pool is used from worker threads

    def run(self, num_classes: int, score_kind: str, fn: Callable[[ChunkReducer], T]) -> T:
        key = (num_classes, score_kind)
        with self._tlock:
            free = self._free.setdefault(key, [])
            reducer = free.pop() if free else None
        if reducer is None:
            reducer = ChunkReducer(num_classes, self._config, score_kind)
        try:
            return fn(reducer)
        finally:
            with self._tlock:
                self._free[key].append(reducer)


class Coordinator:
    """Ingest state of one server process; all methods are called from the event loop."""

    def __init__(self, store: Store, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self.store = store
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.engine_config = settings.engine_config()
        self._workers = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="evalstream-worker")
        # Store calls block on the writer's commit; they get their own threads so compute never waits on them.
        self._io = ThreadPoolExecutor(16, thread_name_prefix="evalstream-store")
        self._reducers = ReducerPool(self.engine_config)
        # Every stream's staging blocks together; a block is at most half the budget, so that a
        # stream can always hold its two (one filling, one reducing) when it is alone.
        self.staging_budget = StagingBudget(settings.max_staging_bytes)
        self._block_bytes = min(STAGING_BYTES, settings.max_staging_bytes // MAX_BLOCKS)
        self._leases: dict[tuple[EvaluationKey, int], Lease | None] = {}
        self._per_peer: dict[str, int] = {}
        self._finalize_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    # -- engine -------------------------------------------------------------------------------

    @property
    def engine_backend(self) -> str:
        """The backend the engine runs: "compiled" or "eager" ("auto" resolved for this machine)."""
        return resolve_backend(self.engine_config.backend, resolve_device(self.engine_config.device))

    def warm_up(self, kernels: Sequence[tuple[int, torch.dtype]] = ()) -> asyncio.Future[float] | None:
        """With the compiled backend, compile a throwaway kernel on a worker thread now.

        The kernel of a real evaluation depends on its class count and score dtype, known only at
        its first chunk, so it cannot be compiled ahead. But most of a first compile is the
        compiler's own process-wide start-up; paying that here, while no stream waits, leaves the
        first chunk of each (class count, dtype) only its kernel's compile (measured in
        docs/performance.md). ``kernels`` (class count, score dtype) known ahead (``warm_kernels``)
        are compiled instead, through the path a real chunk takes. Returns the future of the
        seconds it took; None with eager.
        """
        if self.engine_backend != "compiled":
            return None
        loop = asyncio.get_running_loop()
        return self._track(loop.run_in_executor(self._workers, self._warm_up, tuple(kernels)))

    def _warm_up(self, kernels: tuple[tuple[int, torch.dtype], ...] = ()) -> float:
        started = time.perf_counter()
        for classes, dtype in kernels or ((WARM_UP_CLASSES, torch.float32),):
            scores = torch.zeros((16, classes), dtype=dtype)
            labels = torch.zeros(16, dtype=torch.int64)
            self._reducers.run(classes, "logits", lambda r: r.reduce(scores, labels, None))  # noqa: B023
            if kernels:
                log.info("engine warm-up: kernel for %d classes, %s ready", classes, str(dtype)[6:])
        seconds = time.perf_counter() - started
        log.info("engine warm-up: the compiler is ready after %.1f s", seconds)
        return seconds

    # -- helpers ------------------------------------------------------------------------------

    async def _in_io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    def _track(self, fut: asyncio.Future[T]) -> asyncio.Future[T]:
        """Keep a reference so shutdown can wait for work a cancelled stream left running."""
        self._tasks.add(fut)
        fut.add_done_callback(self._tasks.discard)
        fut.add_done_callback(_retrieve)
        return fut

    # -- open ---------------------------------------------------------------------------------

    async def open(self, request: ShardOpenRequest, peer: str) -> Opened:
        """Lease the rank and tell the stream where to resume."""
        if request.world_size < 1:
            raise InvalidArgument("world_size must be >= 1")
        if request.rank >= request.world_size:
            raise InvalidArgument(
                f"rank {request.rank} is out of range for world_size {request.world_size} (ranks are 0..."
                f"{request.world_size - 1})"
            )
        if request.world_size > MAX_WORLD_SIZE:
            raise InvalidArgument(f"world_size {request.world_size} is over the maximum {MAX_WORLD_SIZE}")
        if request.num_classes < 2:
            raise InvalidArgument(f"num_classes must be >= 2, got {request.num_classes}")
        # One row of float16 scores must fit in a message, or no chunk could ever be sent.
        max_classes = self.settings.max_message_bytes // 2
        if request.num_classes > max_classes:
            raise InvalidArgument(
                f"num_classes {request.num_classes} is over {max_classes}: one row of scores would not fit "
                f"in a message of max_message_bytes={self.settings.max_message_bytes}"
            )
        slot = (request.key, request.rank)
        if slot in self._leases:
            raise Aborted(
                f"rank {request.rank} of {_name(request.key)} is held by another open stream; "
                "retry once that stream has ended (a dropped connection is noticed within seconds)"
            )
        if len(self._leases) >= self.settings.max_open_shards:
            raise ResourceExhausted(
                f"this server already streams {len(self._leases)} shards (max_open_shards="
                f"{self.settings.max_open_shards}); retry later or raise the limit"
            )
        if self._per_peer.get(peer, 0) >= self.settings.max_open_shards_per_connection:
            raise ResourceExhausted(
                f"this connection already streams {self._per_peer[peer]} shards "
                f"(max_open_shards_per_connection="
                f"{self.settings.max_open_shards_per_connection}); close some first"
            )
        self._leases[slot] = None  # reserved while the store answers
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        try:
            evaluation, shard = await self._in_io(self.store.open_shard, request)
            if shard.closed:
                self._drop(slot, peer)
                return Opened(None, evaluation, shard)
            if evaluation.finalized:
                raise FailedPrecondition(
                    f"{_name(request.key)} was finalized before rank {request.rank} closed its shard; "
                    "stream into a new step"
                )
        except BaseException:
            self._drop(slot, peer)
            raise
        lease = Lease(
            evaluation_id=evaluation.evaluation_id,
            key=request.key,
            rank=request.rank,
            world_size=evaluation.world_size,
            num_classes=evaluation.num_classes,
            score_kind=evaluation.score_kind,
            peer=peer,
            next_sequence=shard.next_sequence,
            samples=shard.samples,
            chunks=shard.chunks,
            rejected=shard.rejected_chunks,
        )
        self._leases[slot] = lease
        return Opened(lease, evaluation, shard)

    def release(self, lease: Lease) -> None:
        """The stream ended: free the rank once its in-flight commit (if any) has landed."""
        slot = (lease.key, lease.rank)
        if self._leases.get(slot) is not lease:
            return
        self.flush(lease)  # chunks already received commit; a resent one is then a duplicate
        if lease.staging is not None:
            lease.staging.close()  # idle blocks back to the budget; the flushed one once reduced
        if lease.tail is not None and not lease.tail.done():
            lease.tail.add_done_callback(lambda _f: self._drop(slot, lease.peer))
        else:
            self._drop(slot, lease.peer)

    def _drop(self, slot: tuple[EvaluationKey, int], peer: str) -> None:
        if slot not in self._leases:
            return
        del self._leases[slot]
        left = self._per_peer.get(peer, 0) - 1
        if left > 0:
            self._per_peer[peer] = left
        else:
            self._per_peer.pop(peer, None)

    # -- chunks -------------------------------------------------------------------------------

    async def submit_chunk(
        self, lease: Lease, sequence: int, decode: Callable[[], DecodedChunk]
    ) -> asyncio.Future[ChunkOutcome]:
        """Take one chunk and return its outcome's future (what the acknowledgement says).

        The chunk is checked and copied into the stream's open staging block
        here, on the event loop (one memcpy; the message can go). The block is
        reduced in one engine call when it is full, when something other than
        the next chunk arrives (a retry, a bad chunk, close), or after
        FLUSH_DELAY_S without a new chunk. Blocks are pipelined (the next one
        fills and reduces while the previous one commits), commits stay in
        sequence order, and each chunk is acknowledged only after its records
        are committed. Waits while both of the stream's blocks are busy
        (backpressure). Block work runs to its end even if the stream is
        cancelled, so a chunk is committed whole or not at all.
        """
        if lease.closed:
            raise FailedPrecondition(f"rank {lease.rank} of {_name(lease.key)} is closed; open a new stream")
        if sequence > lease.accepted:
            raise FailedPrecondition(
                f"sequence gap on rank {lease.rank} of {_name(lease.key)}: "
                f"expected chunk {lease.accepted}, got {sequence}; resend from {lease.accepted}"
            )
        if sequence < lease.accepted:
            self.flush(lease)
            return self._chain(lease, self._after(lease.tail, lambda: self._duplicate(lease, sequence)))
        lease.accepted += 1
        t0 = time.perf_counter()
        try:
            chunk = decode()
        except ChunkError as exc:
            self.flush(lease)
            reason, message = exc.reason, exc.message
            return self._chain(
                lease, self._after(lease.tail, lambda: self._reject(lease, sequence, reason, message))
            )
        dtype = chunk.dtype
        staging = lease.staging or StagingPool(
            lease.num_classes, self.engine_config.block_rows, self.staging_budget, self._block_bytes
        )
        lease.staging = staging
        if chunk.rows == 0 or chunk.rows > staging.capacity(dtype):
            # Empty or larger than a block: reduced on its own, from views over the message bytes.
            self.flush(lease)
            return self._chain(lease, self._pipeline(lease, sequence, chunk, lease.tail))
        block = lease.block
        if block is not None and not block.accepts(chunk, dtype):
            self.flush(lease)
            block = None
        if block is None:
            block = await staging.acquire(dtype)
            lease.block = block
            self._arm(lease, block, FLUSH_DELAY_S)
        outcome: asyncio.Future[ChunkOutcome] = asyncio.get_running_loop().create_future()
        block.append(chunk, sequence, outcome)
        lease.last_append = time.monotonic()
        self.telemetry.decode_seconds.observe(time.perf_counter() - t0)
        if block.full:
            self.flush(lease)
        return outcome

    async def chunk(self, lease: Lease, sequence: int, decode: Callable[[], DecodedChunk]) -> ChunkOutcome:
        """``submit_chunk``, flush, and wait for its outcome."""
        fut = await self.submit_chunk(lease, sequence, decode)
        self.flush(lease)
        return await asyncio.shield(fut)

    def flush(self, lease: Lease) -> None:
        """Start the reduction and commit of the stream's open block, if any."""
        block = lease.block
        if block is None:
            return
        lease.block = None
        if lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None
        self._chain(lease, self._pipeline_block(lease, block, lease.tail))

    def _arm(self, lease: Lease, block: StagingBlock, delay: float) -> None:
        lease.timer = asyncio.get_running_loop().call_later(delay, self._idle, lease, block)

    def _idle(self, lease: Lease, block: StagingBlock) -> None:
        """Flush a block that got no chunk for FLUSH_DELAY_S, so a slow stream still hears acks."""
        if lease.block is not block:
            return
        waited = time.monotonic() - lease.last_append
        if waited >= FLUSH_DELAY_S:
            lease.timer = None
            self.flush(lease)
        else:
            self._arm(lease, block, FLUSH_DELAY_S - waited)

    def _chain(self, lease: Lease, work: Awaitable[T]) -> asyncio.Future[T]:
        """Run ``work`` as the stream's new tail (the next work commits after it)."""
        fut = self._track(asyncio.ensure_future(work))
        lease.tail = fut
        return fut

    @staticmethod
    async def _settle(previous: asyncio.Future[Any] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])

    async def _after(
        self, previous: asyncio.Future[Any] | None, then: Callable[[], Awaitable[ChunkOutcome]]
    ) -> ChunkOutcome:
        await self._settle(previous)
        return await then()

    async def _pipeline(
        self, lease: Lease, sequence: int, chunk: DecodedChunk, previous: asyncio.Future[Any] | None
    ) -> ChunkOutcome:
        """One chunk on its own (empty, or bigger than a block), reduced from the message bytes."""
        try:
            reduced: _Reduced | ChunkError = await self._in_worker(self._reduce, lease, chunk)
        except ChunkError as exc:
            reduced = exc
        await self._settle(previous)
        if isinstance(reduced, ChunkError):
            return await self._reject(lease, sequence, reduced.reason, reduced.message)
        return await self._commit(lease, sequence, reduced)

    async def _pipeline_block(
        self, lease: Lease, block: StagingBlock, previous: asyncio.Future[Any] | None
    ) -> None:
        """Reduce a block in a worker, then commit its chunks in order and answer each chunk's future."""
        segments = block.segments
        try:
            try:
                parts = await self._in_worker(self._reduce_staged, lease, block)
            finally:
                assert lease.staging is not None
                lease.staging.release(block)
            await self._settle(previous)
            started = time.perf_counter()
            stored = await self._in_io(self._store_block, lease, segments, parts)
            self.telemetry.commit_seconds.observe(time.perf_counter() - started)
            for i, (segment, part, result) in enumerate(zip(segments, parts, stored, strict=False)):
                if isinstance(result, SequenceConflict):
                    # The store is ahead of the lease (a late commit of an earlier stream): rare, so the
                    # rest of the block goes chunk by chunk, each sorting out its own conflict.
                    for seg, rest in zip(segments[i:], parts[i:], strict=True):
                        seg.outcome.set_result(await self._one(lease, seg.sequence, rest))
                    return
                segment.outcome.set_result(self._outcome(lease, segment, part, result))
        except BaseException as exc:
            for segment in segments:
                if not segment.outcome.done():
                    segment.outcome.set_exception(exc)
            raise

    async def _one(self, lease: Lease, sequence: int, part: _Reduced | ChunkError) -> ChunkOutcome:
        if isinstance(part, ChunkError):
            return await self._reject(lease, sequence, part.reason, part.message)
        return await self._commit(lease, sequence, part)

    def _store_block(
        self, lease: Lease, segments: list[Segment], parts: list[_Reduced | ChunkError]
    ) -> list[StoredChunk | SequenceConflict]:
        """In a store thread: the block's commits and rejections in sequence order, in one transaction.

        Every chunk still commits its records together with the shard's next
        sequence, and none is acknowledged before the transaction commits, so
        exactly-once is per chunk as before; a block costs one store call.
        Stops at a sequence conflict (the loop sorts the rest out chunk by chunk).
        """
        chunks = [
            ChunkCommit(s.sequence, rejection=_rejection(s.sequence, p.reason, p.message))
            if isinstance(p, ChunkError)
            else ChunkCommit(s.sequence, p.samples, p.records, p.nll_sum, p.correct)
            for s, p in zip(segments, parts, strict=True)
        ]
        return self.store.commit_chunks(
            lease.evaluation_id, lease.rank, chunks, self.settings.max_samples_per_evaluation
        )

    def _outcome(
        self, lease: Lease, segment: Segment, part: _Reduced | ChunkError, stored: StoredChunk
    ) -> ChunkOutcome:
        """The acknowledgement of one stored chunk; counts it in telemetry."""
        shard, rejection = stored.shard, stored.rejection
        self._update(lease, shard)
        if rejection is not None:
            self.telemetry.rejected_chunks.labels(reason=rejection.reason).inc()
            return ChunkOutcome(shard.next_sequence, shard.samples, rejection=rejection)
        assert isinstance(part, _Reduced)
        self.telemetry.chunks.inc()
        self.telemetry.samples.inc(part.samples)
        self.telemetry.bytes.inc(segment.num_bytes)
        return ChunkOutcome(shard.next_sequence, shard.samples)

    async def _duplicate(self, lease: Lease, sequence: int) -> ChunkOutcome:
        self.telemetry.duplicate_chunks.inc()
        rejection = await self._in_io(self.store.rejection, lease.evaluation_id, lease.rank, sequence)
        return ChunkOutcome(lease.next_sequence, lease.samples, duplicate=True, rejection=rejection)

    async def _commit(self, lease: Lease, sequence: int, reduced: _Reduced) -> ChunkOutcome:
        started = time.perf_counter()
        try:
            shard = await self._in_io(
                self.store.commit_chunk,
                lease.evaluation_id,
                lease.rank,
                sequence,
                reduced.samples,
                reduced.records,
                reduced.nll_sum,
                reduced.correct,
                self.settings.max_samples_per_evaluation,
            )
        except ResourceExhausted as exc:
            return await self._reject(lease, sequence, "evaluation_too_large", exc.message)
        except SequenceConflict as exc:
            return await self._resync(lease, exc)
        self.telemetry.commit_seconds.observe(time.perf_counter() - started)
        self._update(lease, shard)
        self.telemetry.chunks.inc()
        self.telemetry.samples.inc(reduced.samples)
        self.telemetry.bytes.inc(reduced.num_bytes)
        return ChunkOutcome(shard.next_sequence, shard.samples)

    def _reduce(self, lease: Lease, chunk: DecodedChunk) -> _Reduced:
        """Reduce one chunk in a worker thread: zero-copy views in, a records blob out."""
        t0 = time.perf_counter()
        if chunk.rows == 0:
            return _Reduced(None, 0, 0.0, 0, chunk.num_bytes)
        records = self._reducers.run(
            lease.num_classes,
            lease.score_kind,
            lambda r: r.reduce(chunk.scores, chunk.labels, chunk.sample_ids),
        )
        self.telemetry.compute_seconds.observe(time.perf_counter() - t0)
        return _packed(records, chunk.num_bytes)

    def _reduce_staged(self, lease: Lease, block: StagingBlock) -> list[_Reduced | ChunkError]:
        """Reduce a block in one engine call and split its records by chunk.

        If the block is refused (a label out of range, a NaN, ...), each chunk is
        reduced on its own instead, so only the bad chunks are rejected, with
        positions relative to their own chunk.
        """
        t0 = time.perf_counter()

        def each(r: ChunkReducer) -> list[_Reduced | ChunkError]:
            try:
                records = r.reduce(*block.views())
                return [_packed(_rows(records, s.start, s.stop), s.num_bytes) for s in block.segments]
            except ChunkError:
                pass
            out: list[_Reduced | ChunkError] = []
            for s in block.segments:
                try:
                    out.append(_packed(r.reduce(*block.views(s.start, s.stop)), s.num_bytes))
                except ChunkError as exc:
                    out.append(exc)
            return out

        parts = self._reducers.run(lease.num_classes, lease.score_kind, each)
        self.telemetry.compute_seconds.observe(time.perf_counter() - t0)
        return parts

    async def _reject(self, lease: Lease, sequence: int, reason: str, message: str) -> ChunkOutcome:
        rejection = _rejection(sequence, reason, message)
        try:
            shard = await self._in_io(self.store.reject_chunk, lease.evaluation_id, lease.rank, rejection)
        except SequenceConflict as exc:
            return await self._resync(lease, exc)
        self.telemetry.rejected_chunks.labels(reason=reason).inc()
        self._update(lease, shard)
        return ChunkOutcome(shard.next_sequence, shard.samples, rejection=rejection)

    async def _resync(self, lease: Lease, exc: SequenceConflict) -> ChunkOutcome:
        """The store is ahead of the lease (a previous stream's commit landed late): it was a retry."""
        if exc.got < exc.expected:
            shards = await self._in_io(self.store.shards, lease.evaluation_id)
            for shard in shards:
                if shard.rank == lease.rank:
                    self._update(lease, shard)
            return await self._duplicate(lease, exc.got)
        raise Aborted(f"rank {lease.rank} of {_name(lease.key)} changed under this stream; reopen it")

    @staticmethod
    def _update(lease: Lease, shard: ShardRow) -> None:
        lease.next_sequence = shard.next_sequence
        lease.samples = shard.samples
        lease.chunks = shard.chunks
        lease.rejected = shard.rejected_chunks
        lease.accepted = max(lease.accepted, shard.next_sequence)

    # -- close and finalize -------------------------------------------------------------------

    async def close(self, lease: Lease, num_chunks: int) -> Closed:
        """Close the shard once its chunks have committed; the last rank to close finalizes."""
        self.flush(lease)
        await self._settle(lease.tail)
        if num_chunks != lease.next_sequence:
            raise FailedPrecondition(
                f"close says {num_chunks} chunks were sent but rank {lease.rank} of {_name(lease.key)} has "
                f"{lease.next_sequence} committed; resend from chunk {lease.next_sequence} before closing"
            )
        # From here the close is one unit: if the stream is cancelled while the store commits it (the
        # connection dropped), the last rank's close must still finalize, or the evaluation would
        # stay open with every rank closed and the reconnecting client would wait for it forever.
        return await asyncio.shield(self._track(asyncio.ensure_future(self._close(lease))))

    async def _close(self, lease: Lease) -> Closed:
        evaluation = await self._in_io(self.store.close_shard, lease.evaluation_id, lease.rank)
        lease.closed = True
        self.release(lease)
        finalized = False
        if evaluation.ranks_closed >= evaluation.world_size and not evaluation.finalized:
            evaluation = await self.finalize(lease.evaluation_id)
            finalized = True
        return Closed(evaluation, lease, finalized)

    async def finalize_key(self, key: EvaluationKey) -> EvaluationRow:
        """FinalizeEvaluation: merge whatever every rank committed so far."""
        row = await self._in_io(self.store.find, key.run, key.model, key.split, key.step)
        if row is None:
            raise NotFound(f"no evaluation {_name(key)}; open a shard first")
        return await self.finalize(row.evaluation_id)

    async def finalize(self, evaluation_id: str) -> EvaluationRow:
        lock = self._finalize_locks.setdefault(evaluation_id, asyncio.Lock())
        async with lock:
            row = await self._in_io(self.store.get, evaluation_id)
            if row is None:
                raise NotFound(f"no evaluation with id {evaluation_id!r}")
            if row.finalized:
                return row
            work = self._track(asyncio.ensure_future(self._finalize(row)))
            out = await asyncio.shield(work)
        self._finalize_locks.pop(evaluation_id, None)
        return out

    async def _finalize(self, row: EvaluationRow) -> EvaluationRow:
        result, merged, num_samples = await self._in_worker(self._merge, row)
        finalized = await self._in_io(
            self.store.finalize,
            row.evaluation_id,
            result,
            merged,
            num_samples,
            self.settings.retention_keep_latest,
        )
        self.telemetry.finalized.inc()
        log.info("finalized %s (%d samples)", _name(row.key), num_samples)
        return finalized

    def _merge(self, row: EvaluationRow) -> tuple[bytes, bytes, int]:
        # The chunk blobs are freed once concatenated: finalize holds the records about twice, not thrice.
        records = Records.concat(
            (Records.from_bytes(b) for b in self.store.chunk_records(row.evaluation_id)),
            inverse_temperatures=self.engine_config.inverse_temperatures,
        )
        if len(records) == 0:
            raise FailedPrecondition(f"{_name(row.key)} has no committed samples; nothing to finalize")
        # Deduplicated once: the metrics and the stored records are the same kept samples.
        kept, dropped = records.dedupe()
        del records
        report = compute_metrics(kept, row.num_classes, self.engine_config, dedupe=False)
        report = replace(report, duplicates_dropped=dropped)
        return result_from_report(report).SerializeToString(), kept.to_bytes(), report.num_samples

    async def recover(self) -> None:
        """After a restart: finish finalizes a crash interrupted, and apply retention."""
        for row in await self._in_io(self.store.pending_finalize):
            try:
                await self.finalize(row.evaluation_id)
            except ServiceError as exc:
                log.warning("could not finalize %s after restart: %s", _name(row.key), exc.message)
        keep = self.settings.retention_keep_latest
        if keep > 0:
            dropped = await self._in_io(self.store.apply_retention, keep)
            if dropped:
                log.info("retention (keep latest %d): dropped records of %d evaluations", keep, len(dropped))

    # -- views and shutdown -------------------------------------------------------------------

    def open_progress(self) -> Iterable[ShardProgress]:
        """ProgressSource for the exporter: every shard of every open evaluation (safe off-loop)."""
        out = []
        for ev, shard in self.store.open_shards():
            out.append(
                ShardProgress(
                    key=SeriesKey(ev.key.run, ev.key.model, ev.key.split),
                    step=ev.key.step,
                    rank=shard.rank,
                    world_size=ev.world_size,
                    ranks_closed=ev.ranks_closed,
                    samples=shard.samples,
                    nll_sum=shard.nll_sum,
                    correct=shard.correct,
                    updated_at=shard.updated_at,
                )
            )
        return out

    async def drain(self) -> None:
        """Wait for every commit and finalize already started (graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close_executors(self) -> None:
        self._workers.shutdown(wait=True)
        self._io.shutdown(wait=True)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a failure as seen: a stream that already ended may never await it (its status was sent)."""
    if not fut.cancelled():
        fut.exception()


def _name(key: EvaluationKey) -> str:
    return f"{key.run}/{key.model}/{key.split}@{key.step}"


def _rejection(sequence: int, reason: str, message: str) -> Rejection:
    return Rejection(sequence, REJECTION_CODES.get(reason, "INVALID_ARGUMENT"), reason, message)


def _rows(records: Records, start: int, stop: int) -> Records:
    """Rows [start, stop) of records, as views."""
    return Records(
        **{name: getattr(records, name)[start:stop] for name in FIELDS},
        inverse_temperatures=records.inverse_temperatures,
    )


def _packed(records: Records, num_bytes: int) -> _Reduced:
    """What a chunk commits: its records blob and the running summary of its samples."""
    nll_sum, correct = running_summary(records)
    return _Reduced(records.to_bytes(), len(records), nll_sum, correct, num_bytes)
