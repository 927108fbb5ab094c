"""Staging blocks: consecutive chunks of one stream, copied into one preallocated buffer, reduced at once.

A ~1 MiB message carries only ~87 rows at C=3,000 float32, too few for the
engine: its fixed cost per call (validation, output columns, records blob,
executor hand-off, store commit) would dominate. So each stream copies its
chunks' rows (one copy per chunk, from the message bytes) into a block of
``capacity`` rows and the block is reduced in one engine call. A stream owns
at most ``MAX_BLOCKS`` blocks (one filling while the previous one is reduced),
allocated on first use and reused.

All streams' blocks together stay within one ``StagingBudget`` (the
``max_staging_bytes`` setting): two 16 MiB blocks for each of 1,024 open
shards would otherwise be 32 GiB. A stream that needs a block while the budget
is spent first takes back blocks other streams hold idle, then waits (in
order of asking), and while it waits it reads nothing from its gRPC stream, so
HTTP/2 flow control holds the client back. It cannot deadlock: a stream waits
only when it holds no filling block (it flushed it first), and every block in
use is released once reduced; a filling block is flushed when full, on
anything but the next chunk, or FLUSH_DELAY_S after its last chunk.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evalstream.service.decode import DecodedChunk
from evalstream.wire import host_array

# One block's scores buffer stays at or under this size (rows shrink for very large class counts).
STAGING_BYTES = 16 << 20
# Chunks per block at most: keeps acknowledgements flowing when chunks are tiny.
MAX_SEGMENTS = 64
# Blocks per stream: one filling while one is reduced.
MAX_BLOCKS = 2


def capacity_rows(block_rows: int, num_classes: int, itemsize: int, max_bytes: int = STAGING_BYTES) -> int:
    """Rows of one block: ``block_rows``, fewer where the scores would exceed ``max_bytes``."""
    return max(1, min(block_rows, max_bytes // (num_classes * itemsize)))


class StagingBudget:
    """Bytes of staging blocks all streams of one server may hold, shared first come first served.

    ``used`` counts every allocated block: in use (filling or being reduced) and idle (kept by its
    stream for reuse). Idle blocks are reclaimed, oldest first, when a reservation needs room.
    One reservation is always granted when nothing else is held, so a block larger than the whole
    budget still streams (alone). Used from the event loop only.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"staging budget must be >= 1 byte, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waits = 0
        self._idle: OrderedDict[int, tuple[StagingPool, StagingBlock]] = OrderedDict()
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Streams waiting for room now."""
        return sum(1 for _, fut in self._waiters if not fut.done())

    async def reserve(self, nbytes: int) -> None:
        """Take ``nbytes``; waits (behind earlier askers) until idle blocks or releases make room."""
        if not self._waiters and self._make_room(nbytes):
            self._grant(nbytes)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, fut))
        self.waits += 1
        self._wake()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(nbytes)  # granted just as the stream went away
            else:
                self._wake()  # the next in line may fit now
            raise

    def release(self, nbytes: int) -> None:
        """Give back a block's bytes (its stream dropped it)."""
        self.used -= nbytes
        self._wake()

    def park(self, pool: StagingPool, block: StagingBlock) -> None:
        """A stream keeps ``block`` idle for reuse; reclaimable until ``unpark``."""
        self._idle[id(block)] = (pool, block)
        self._wake()

    def unpark(self, block: StagingBlock) -> None:
        self._idle.pop(id(block), None)

    def _grant(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def _fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit or self.used == 0

    def _make_room(self, nbytes: int) -> bool:
        """Reclaim idle blocks, oldest first, until ``nbytes`` fit; False if they cannot."""
        while not self._fits(nbytes) and self._idle:
            _, (pool, block) = self._idle.popitem(last=False)
            pool.evict(block)
            self.used -= block.nbytes
        return self._fits(nbytes)

    def _wake(self) -> None:
        while self._waiters:
            nbytes, fut = self._waiters[0]
            if fut.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if not self._make_room(nbytes):
                return
            self._waiters.popleft()
            self._grant(nbytes)
            fut.set_result(None)


@dataclass
class Segment:
    """One chunk's rows [start, stop) in a block, and the future of its acknowledgement."""

    sequence: int
    start: int
    stop: int
    num_bytes: int
    outcome: asyncio.Future[Any]


def block_bytes(capacity: int, num_classes: int, dtype: torch.dtype) -> int:
    """Bytes of one block's buffers: scores, int64 labels and int64 ids."""
    return capacity * (num_classes * dtype.itemsize + 16)


class StagingBlock:
    """A [capacity, C] scores buffer of one dtype with int64 labels and ids, filled chunk by chunk."""

    def __init__(self, capacity: int, num_classes: int, dtype: torch.dtype) -> None:
        self.capacity = capacity
        self.dtype = dtype
        self.scores = torch.empty((capacity, num_classes), dtype=dtype)
        self.labels = torch.empty(capacity, dtype=torch.int64)
        self.ids = torch.empty(capacity, dtype=torch.int64)
        # numpy views of the same buffers for the staging copy: numpy copies unaligned views (the
        # payloads sit at odd offsets of the received message) and costs ~0.4 µs a call against
        # torch's ~6 µs of dispatch.
        self._host = (host_array(self.scores), host_array(self.labels), host_array(self.ids))
        self.nbytes = block_bytes(capacity, num_classes, dtype)
        self.rows = 0
        self.has_ids = False
        self.segments: list[Segment] = []

    def accepts(self, chunk: DecodedChunk, dtype: torch.dtype) -> bool:
        """Whether the chunk can join this block (room, same dtype, ids present alike)."""
        if dtype != self.dtype or len(self.segments) >= MAX_SEGMENTS:
            return False
        if self.segments and self.has_ids != (chunk.sample_ids is not None):
            return False
        return self.rows + chunk.rows <= self.capacity

    @property
    def full(self) -> bool:
        return self.rows >= self.capacity or len(self.segments) >= MAX_SEGMENTS

    def append(self, chunk: DecodedChunk, sequence: int, outcome: asyncio.Future[Any]) -> None:
        """Copy the chunk's rows in (the message bytes are not needed afterwards)."""
        start, stop = self.rows, self.rows + chunk.rows
        scores, labels, ids = self._host
        np.copyto(scores[start:stop], chunk.host)
        np.copyto(labels[start:stop], chunk.labels)
        if chunk.sample_ids is not None:
            np.copyto(ids[start:stop], chunk.sample_ids)
        if not self.segments:
            self.has_ids = chunk.sample_ids is not None
        self.segments.append(Segment(sequence, start, stop, chunk.num_bytes, outcome))
        self.rows = stop

    def views(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Scores, labels and ids (None when the chunks had none) of rows [start, stop)."""
        stop = self.rows if stop is None else stop
        ids = self.ids[start:stop] if self.has_ids else None
        return self.scores[start:stop], self.labels[start:stop], ids

    def reset(self) -> None:
        self.rows = 0
        self.has_ids = False
        self.segments = []


class StagingPool:
    """At most ``MAX_BLOCKS`` blocks for one stream, their bytes taken from the server's budget.

    ``acquire`` waits while both of the stream's blocks are in use, then reuses an idle block of
    the dtype or reserves room for a new one. ``close`` (the stream ended) gives idle blocks back;
    blocks still being reduced go back when released.
    """

    def __init__(
        self,
        num_classes: int,
        block_rows: int,
        budget: StagingBudget | None = None,
        max_block_bytes: int = STAGING_BYTES,
    ) -> None:
        self.num_classes = num_classes
        self.block_rows = block_rows
        self.budget = budget or StagingBudget(
            MAX_BLOCKS * block_bytes(block_rows, num_classes, torch.float32)
        )
        self.max_block_bytes = max_block_bytes
        self.closed = False
        self._free: list[StagingBlock] = []
        self._in_use = 0
        self._released: asyncio.Event | None = None

    async def acquire(self, dtype: torch.dtype) -> StagingBlock:
        while self._in_use >= MAX_BLOCKS:
            if self._released is None:
                self._released = asyncio.Event()
            self._released.clear()
            await self._released.wait()
        self._in_use += 1
        try:
            for i, block in enumerate(self._free):
                if block.dtype == dtype:
                    self.budget.unpark(block)
                    return self._free.pop(i)
            if len(self._free) + self._in_use > MAX_BLOCKS:
                self._drop(self._free[0])  # a block of another dtype: give it back rather than hold both
            rows = self.capacity(dtype)
            await self.budget.reserve(block_bytes(rows, self.num_classes, dtype))
        except BaseException:
            self._in_use -= 1
            raise
        return StagingBlock(rows, self.num_classes, dtype)

    def release(self, block: StagingBlock) -> None:
        block.reset()
        self._in_use -= 1
        if self.closed:
            self.budget.release(block.nbytes)
        else:
            self._free.append(block)
            self.budget.park(self, block)
        if self._released is not None:
            self._released.set()

    def evict(self, block: StagingBlock) -> None:
        """The budget reclaimed this idle block (its bytes are counted back by the budget)."""
        self._free.remove(block)

    def close(self) -> None:
        """The stream ended: idle blocks go back to the budget now, blocks in use when released."""
        self.closed = True
        for block in list(self._free):
            self._drop(block)

    def _drop(self, block: StagingBlock) -> None:
        self._free.remove(block)
        self.budget.unpark(block)
        self.budget.release(block.nbytes)

    def capacity(self, dtype: torch.dtype) -> int:
        return capacity_rows(self.block_rows, self.num_classes, dtype.itemsize, self.max_block_bytes)
