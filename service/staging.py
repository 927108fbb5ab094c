"""Staging blocks: consecutive chunks of one stream, copied into one preallocated buffer, reduced at once.

A ~1 MiB message carries only ~87 rows at C=3,000 float32, too few for the
engine: its fixed cost per call (validation, output columns, records blob,
executor hand-off, store commit) would dominate. So each stream copies its
chunks' rows (one copy per chunk, from the message bytes) into a block of
``capacity`` rows and the block is reduced in one engine call. A stream owns
at most ``MAX_BLOCKS`` blocks (one filling while the previous one is reduced),
allocated on first use and reused, so the server's memory is bounded by these
buffers and not by the samples streamed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .wire import DecodedChunk

# One block's scores buffer stays at or under this size (rows shrink for very large class counts).
STAGING_BYTES = 16 << 20
# Chunks per block at most: keeps acknowledgements flowing when chunks are tiny.
MAX_SEGMENTS = 64
# Blocks per stream: one filling while one is reduced.
MAX_BLOCKS = 2


def score_dtype(chunk: DecodedChunk) -> torch.dtype:
    """The torch dtype of a decoded chunk's scores (numpy float32/float16 or torch bfloat16)."""
    s = chunk.scores
    return s.dtype if isinstance(s, torch.Tensor) else torch.from_numpy(np.empty(0, s.dtype)).dtype


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(x)


def capacity_rows(block_rows: int, num_classes: int, itemsize: int) -> int:
    """Rows of one block: ``block_rows``, fewer where that would exceed STAGING_BYTES."""
    return max(1, min(block_rows, STAGING_BYTES // (num_classes * itemsize)))


@dataclass
class Segment:
    """One chunk's rows [start, stop) in a block, and the future of its acknowledgement."""

    sequence: int
    start: int
    stop: int
    num_bytes: int
    outcome: asyncio.Future[Any]


class StagingBlock:
    """A [capacity, C] scores buffer of one dtype with int64 labels and ids, filled chunk by chunk."""

    def __init__(self, capacity: int, num_classes: int, dtype: torch.dtype) -> None:
        self.capacity = capacity
        self.dtype = dtype
        self.scores = torch.empty((capacity, num_classes), dtype=dtype)
        self.labels = torch.empty(capacity, dtype=torch.int64)
        self.ids = torch.empty(capacity, dtype=torch.int64)
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
        self.scores[start:stop].copy_(_tensor(chunk.scores))
        self.labels[start:stop].copy_(_tensor(chunk.labels))
        if chunk.sample_ids is not None:
            self.ids[start:stop].copy_(_tensor(chunk.sample_ids))
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
    """At most ``MAX_BLOCKS`` blocks for one stream; ``acquire`` waits while all are in use."""

    def __init__(self, num_classes: int, block_rows: int) -> None:
        self.num_classes = num_classes
        self.block_rows = block_rows
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
        for i, block in enumerate(self._free):
            if block.dtype == dtype:
                return self._free.pop(i)
        if len(self._free) + self._in_use > MAX_BLOCKS:
            self._free.pop()  # a block of another dtype: drop it rather than hold both
        itemsize = torch.empty(0, dtype=dtype).element_size()
        rows = capacity_rows(self.block_rows, self.num_classes, itemsize)
        return StagingBlock(rows, self.num_classes, dtype)

    def release(self, block: StagingBlock) -> None:
        block.reset()
        self._in_use -= 1
        self._free.append(block)
        if self._released is not None:
            self._released.set()

    def capacity(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return capacity_rows(self.block_rows, self.num_classes, itemsize)
