"""The ingest protocol without gRPC: ``Coordinator`` wires its parts and is all the servicer calls.

Rules it enforces (the servicer only translates messages), and the module that owns each:

- One stream holds a rank at a time (a lease); a second open of the same rank
  is ABORTED until the first stream ends (``leases.py``); with replicas on one
  database, whichever replica the second stream reaches (``OwningStore``).
- A stream's chunks are staged, reduced off the event loop, and committed in
  sequence order by the shard's one writer (``shard_writer.py``); a chunk is
  acknowledged only after its records and the shard's next sequence are
  committed in one store transaction (``commit.py``, the one commit path). A
  refused chunk consumes its sequence number (its reason is stored) and changes
  nothing else; a chunk below the committed sequence is a retry, acknowledged as
  a duplicate and never counted again; a chunk above it is a gap: a protocol error.
- When every rank has closed (or on an explicit finalize) the committed records
  are merged into the result exactly once (``finalizer.py``); a restart finishes
  what a crash interrupted (``recovery.py``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from evalstream.service.commit import ChunkOutcome, ChunkRejection, Committer
from evalstream.service.decode import DecodedChunk
from evalstream.service.engine.reducer import resolve_backend, resolve_device
from evalstream.service.errors import FailedPrecondition, InvalidArgument
from evalstream.service.finalizations import Waiters, finalized_in
from evalstream.service.finalizer import Finalizer
from evalstream.service.leases import Lease, LeaseTable, OwningStore, SharedHolds
from evalstream.service.records_wire import Received
from evalstream.service.recovery import recover
from evalstream.service.reduction import Reduction
from evalstream.service.settings import Settings
from evalstream.service.shard_writer import ShardWriter, Shared
from evalstream.service.staging import MAX_BLOCKS, STAGING_BYTES, StagingBudget
from evalstream.service.status import SeriesKey, ShardProgress
from evalstream.service.store.base import EvaluationKey, EvaluationRow, ShardOpenRequest, ShardRow, Store
from evalstream.service.telemetry import Telemetry

__all__ = [
    "DEFAULT_SPLIT",
    "ChunkOutcome",
    "ChunkRejection",
    "Closed",
    "Coordinator",
    "Lease",
    "Opened",
    "evaluation_key",
    "validate_name",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Safe as a Prometheus label value, a file name component and a URL path segment.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+=@-]{0,127}$")
DEFAULT_SPLIT = "validation"
# Larger worlds are a mistake, not a job (and would never finalize): refused at open.
MAX_WORLD_SIZE = 1 << 16


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


@dataclass(frozen=True)
class Opened:
    lease: Lease | None  # None when the shard was closed before
    evaluation: EvaluationRow
    shard: ShardRow

    @property
    def already_closed(self) -> bool:
        return self.lease is None


@dataclass(frozen=True)
class Closed:
    evaluation: EvaluationRow
    shard: Lease
    finalized: bool


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
        self._tasks: set[asyncio.Future[Any]] = set()
        self._reduction = Reduction(self.engine_config, self.telemetry)
        # Every stream's staging blocks together; a block is at most half the budget, so that a
        # stream can always hold its two (one filling, one reducing) when it is alone.
        self.staging_budget = StagingBudget(settings.max_staging_bytes)
        self._shared = Shared(
            reduction=self._reduction,
            committer=Committer(store, self.telemetry, self._in_io),
            budget=self.staging_budget,
            block_rows=self.engine_config.block_rows,
            block_bytes=min(STAGING_BYTES, settings.max_staging_bytes // MAX_BLOCKS),
            telemetry=self.telemetry,
            in_worker=self._in_worker,
            track=self._track,
        )
        self._leases = LeaseTable(settings.max_open_shards, settings.max_open_shards_per_connection)
        # Replicas sharing a database: a rank's hold is also kept there (service/store/postgres_ownership.py).
        self._holds = SharedHolds(store, self._in_io, self._track) if isinstance(store, OwningStore) else None
        # GetEvaluation long polls, woken by this server's finalizes and the store's listener.
        self.waiters = Waiters(lambda ids: self._in_io(finalized_in, store, ids), self.telemetry)
        self._finalizer = Finalizer(
            store,
            self.engine_config,
            self.telemetry,
            self._in_io,
            self._in_worker,
            self._track,
            announce=self.waiters.announce,
        )

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
        library = self._reduction.warm_up(kernels)
        seconds = time.perf_counter() - started
        if library:
            log.info(
                "engine warm-up: the native row pass is ready after %.1f s (%s, one library for every "
                "class count and score dtype)",
                seconds,
                library,
            )
        else:
            log.info("engine warm-up: the compiler is ready after %.1f s", seconds)
        return seconds

    # -- executors ----------------------------------------------------------------------------

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

    # -- open and release ---------------------------------------------------------------------

    async def open(self, request: ShardOpenRequest, peer: str) -> Opened:
        """Lease the rank and tell the stream where to resume."""
        self._check_open(request)
        slot = (request.key, request.rank)
        self._leases.reserve(slot, peer)  # held while the store answers
        token = ""
        try:
            evaluation, shard = await self._in_io(self.store.open_shard, request)
            if not shard.closed and evaluation.finalized:
                raise FailedPrecondition(
                    f"{request.key.name} was finalized before rank {request.rank} closed its shard; "
                    "stream into a new step"
                )
            if not shard.closed and self._holds is not None:
                token = uuid.uuid4().hex
                shard = await self._holds.take(request.key, request.rank, evaluation.evaluation_id, token)
            if shard.closed:  # closed before, or by the stream that held it until now
                self._leases.drop(slot, peer)
                if self._holds is not None:
                    self._holds.give_back(evaluation.evaluation_id, request.rank, token)
                return Opened(None, evaluation, shard)
        except BaseException:
            self._leases.drop(slot, peer)
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
            owner_token=token,
        )
        lease.writer = ShardWriter(lease, self._shared)
        self._leases.grant(lease)
        return Opened(lease, evaluation, shard)

    def _check_open(self, request: ShardOpenRequest) -> None:
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

    def release(self, lease: Lease) -> None:
        """The stream ended: free the rank once what it sent has committed."""
        if not self._leases.holds(lease):
            return
        writer = _writer(lease)
        writer.end()  # chunks already received commit; a resent one is then a duplicate

        def settled() -> None:
            self._leases.drop(lease.slot, lease.peer)
            if self._holds is not None:
                self._holds.give_back(lease.evaluation_id, lease.rank, lease.owner_token)

        writer.when_settled(settled)

    # -- chunks -------------------------------------------------------------------------------

    async def submit_chunk(
        self, lease: Lease, sequence: int, decode: Callable[[], DecodedChunk]
    ) -> asyncio.Future[ChunkOutcome]:
        """Take one chunk and return its outcome's future (what the acknowledgement says).

        The chunk is checked and copied into the stream's staging block here, on
        the event loop (one memcpy; the message can go); the shard's writer
        reduces, commits and answers it in order (see ``shard_writer.py``).
        Waits while both of the stream's blocks are busy (backpressure).
        """
        if self._holds is not None:
            self._holds.check(lease)
        return await _writer(lease).submit(sequence, decode)

    def submit_records(
        self, lease: Lease, sequence: int, decode: Callable[[], Received]
    ) -> asyncio.Future[ChunkOutcome]:
        """Take one RecordsChunk (a client's records) and return its outcome's future; same sequence
        rules, commit path and acknowledgements as a chunk of scores (see ``shard_writer.py``)."""
        if self._holds is not None:
            self._holds.check(lease)
        return _writer(lease).submit_records(sequence, decode)

    async def chunk(self, lease: Lease, sequence: int, decode: Callable[[], DecodedChunk]) -> ChunkOutcome:
        """``submit_chunk``, flush, and wait for its outcome."""
        fut = await self.submit_chunk(lease, sequence, decode)
        self.flush(lease)
        return await asyncio.shield(fut)

    def flush(self, lease: Lease) -> None:
        """Start the reduction and commit of the stream's open block, if any."""
        _writer(lease).flush()

    # -- close and finalize -------------------------------------------------------------------

    async def close(self, lease: Lease, num_chunks: int) -> Closed:
        """Close the shard once its chunks have committed; the last rank to close finalizes."""
        writer = _writer(lease)
        writer.flush()
        await writer.settled()
        if lease.broken is not None:
            raise lease.broken
        if num_chunks != lease.next_sequence:
            raise FailedPrecondition(
                f"close says {num_chunks} chunks were sent but rank {lease.rank} of {lease.key.name} has "
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
        return await self._finalizer.finalize_key(key)

    async def finalize(self, evaluation_id: str) -> EvaluationRow:
        return await self._finalizer.finalize(evaluation_id)

    async def recover(self) -> None:
        """After a restart: finish finalizes a crash interrupted, and apply retention."""
        await recover(self.store, self._finalizer, self._in_io)

    # -- views and shutdown -------------------------------------------------------------------

    def open_progress(self) -> Iterable[ShardProgress]:
        """ProgressSource for the exporter: every shard of every open evaluation (safe off-loop)."""
        return [
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
            for ev, shard in self.store.open_shards()
        ]

    async def drain(self) -> None:
        """Wait for every commit and finalize already started (graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close_executors(self) -> None:
        self._workers.shutdown(wait=True)
        self._io.shutdown(wait=True)


def _writer(lease: Lease) -> ShardWriter:
    assert lease.writer is not None, "a lease gets its writer when it is granted"
    return lease.writer


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a failure as seen: a stream that already ended may never await it (its status was sent)."""
    if not fut.cancelled():
        fut.exception()
