"""Chunks to committable records: the engine calls of ingest, run on worker threads.

A stream's chunk (or staging block) becomes, per chunk, a ``Reduced`` (its
records blob and running summary) or the ``ChunkError`` that refuses it. Nothing
here touches the store or the event loop; ``ShardWriter`` runs these on the
worker pool and hands the parts to the commit path in sequence order.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from evalstream.service.decode import DecodedChunk
from evalstream.service.engine import ChunkError, EngineConfig, Records, native
from evalstream.service.engine.metrics import running_summary
from evalstream.service.engine.records import FIELDS
from evalstream.service.engine.reducer import ChunkReducer, resolve_device
from evalstream.service.records_wire import Received
from evalstream.service.staging import StagingBlock
from evalstream.service.telemetry import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")
# Classes of the throwaway kernel compiled at start: any count works, the point is the compiler's
# process-wide start-up (dynamo, inductor, the C++ toolchain), ~4-6 s of the first compile.
WARM_UP_CLASSES = 2


@dataclass(frozen=True)
class Reduced:
    """What one chunk commits: its records blob (None when empty) and the running summary."""

    records: bytes | None
    samples: int
    nll_sum: float
    correct: int
    num_bytes: int
    # "server" (reduced here from scores) or "client" (records a client reduced; see records_wire.py).
    mode: str = "server"


# One chunk's reduction: its records, or why it is refused (committed as a rejection).
Part = Reduced | ChunkError


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


class Reduction:
    """The reductions of one server: pooled reducers, compute time counted in telemetry."""

    def __init__(self, config: EngineConfig, telemetry: Telemetry) -> None:
        self._reducers = ReducerPool(config)
        self._telemetry = telemetry

    def warm_up(self, kernels: tuple[tuple[int, torch.dtype], ...] = ()) -> str | None:
        """Reduce a throwaway chunk of each (class count, dtype) in ``kernels`` (or one tiny one), so
        the compiler's start-up and those kernels are paid before any stream waits.

        Returns:
            The native row pass's library file when it reduced them (then nothing was compiled per
            class count), else None (TorchInductor's kernels, or eager).
        """
        library: str | None = None
        for classes, dtype in kernels or ((WARM_UP_CLASSES, torch.float32),):
            throwaway = functools.partial(_reduce_zeros, classes=classes, dtype=dtype)
            library = self._reducers.run(classes, "logits", throwaway)
            if kernels:
                how = "the native row pass" if library else "TorchInductor"
                log.info("engine warm-up: kernel for %d classes, %s ready (%s)", classes, str(dtype)[6:], how)
        return library

    @staticmethod
    def records(decode: Callable[[], Received]) -> Part:
        """A RecordsChunk a client reduced: decoded and validated (``records_wire.receive``); its
        blob is the received columns behind a head, not the records serialized again."""
        try:
            received = decode()
        except ChunkError as exc:
            return exc
        records = received.records
        if len(records) == 0:
            return Reduced(None, 0, 0.0, 0, 0, "client")
        nll_sum, correct = running_summary(records)
        # The column bytes received (reading the message's bytes field again would copy it).
        num_bytes = int(len(records) * records.nbytes_per_sample())
        return Reduced(received.blob, len(records), nll_sum, correct, num_bytes, "client")

    def chunk(self, num_classes: int, score_kind: str, chunk: DecodedChunk) -> Part:
        """One chunk on its own (empty, or larger than a block), from zero-copy views of the message."""
        if chunk.rows == 0:
            return Reduced(None, 0, 0.0, 0, chunk.num_bytes)
        t0 = time.perf_counter()
        try:
            records = self._reducers.run(
                num_classes, score_kind, lambda r: r.reduce(chunk.scores, chunk.labels, chunk.sample_ids)
            )
        except ChunkError as exc:
            return exc
        self._telemetry.compute_seconds.observe(time.perf_counter() - t0)
        return _packed(records, chunk.num_bytes)

    def block(self, num_classes: int, score_kind: str, block: StagingBlock) -> list[Part]:
        """Reduce a block in one engine call and split its records by chunk.

        If the block is refused (a label out of range, a NaN, ...), each chunk is
        reduced on its own instead, so only the bad chunks are rejected, with
        positions relative to their own chunk.
        """
        t0 = time.perf_counter()

        def each(r: ChunkReducer) -> list[Part]:
            try:
                records = r.reduce(*block.views())
                return [_packed(_rows(records, s.start, s.stop), s.num_bytes) for s in block.segments]
            except ChunkError:
                pass
            out: list[Part] = []
            for s in block.segments:
                try:
                    out.append(_packed(r.reduce(*block.views(s.start, s.stop)), s.num_bytes))
                except ChunkError as exc:
                    out.append(exc)
            return out

        parts = self._reducers.run(num_classes, score_kind, each)
        self._telemetry.compute_seconds.observe(time.perf_counter() - t0)
        return parts


def _reduce_zeros(reducer: ChunkReducer, classes: int, dtype: torch.dtype) -> str | None:
    """Reduce a throwaway chunk of zeros; the native row pass's library file if it did the work."""
    reducer.reduce(torch.zeros((16, classes), dtype=dtype), torch.zeros(16, dtype=torch.int64), None)
    return reducer.native_library


def inductor_cache_dir() -> str:
    """Where TorchInductor keeps compiled kernels across processes: TORCHINDUCTOR_CACHE_DIR or its default."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


def compiled_engine_note(device: str, warm_kernels: Sequence[str], cache: str) -> str:
    """The start-up log line of the compiled engine: which pass will reduce chunks, and what that
    costs a stream's first chunk (``cache``: inductor's cache directory)."""
    named = ", ".join(warm_kernels) or "none named"
    warmed = f"compiling at start: {named} (warm_kernels, serve --warm C:dtype)"
    if resolve_device(device).type == "cpu" and native.c_compiler() is not None:
        return (
            f"compiled engine on the CPU: one native row pass (rest_moments.c, built once per machine "
            f"with {native.c_compiler()} and cached) reduces every class count and score dtype, with no "
            f"compile per kernel; TorchInductor (inductor's disk cache at {cache}) only if that cannot be "
            f"built; {warmed}"
        )
    return (
        "compiled engine: the first chunk of each class count and score dtype compiles its kernel (~4 s "
        f"with inductor's disk cache at {cache} warm, ~20 s cold in a fresh process on 2 cores); {warmed}; "
        "engine_backend=eager avoids it"
    )


def _rows(records: Records, start: int, stop: int) -> Records:
    """Rows [start, stop) of records, as views."""
    return Records(
        **{name: getattr(records, name)[start:stop] for name in FIELDS},
        inverse_temperatures=records.inverse_temperatures,
    )


def _packed(records: Records, num_bytes: int) -> Reduced:
    """What a chunk commits: its records blob and the running summary of its samples."""
    nll_sum, correct = running_summary(records)
    return Reduced(records.to_bytes(), len(records), nll_sum, correct, num_bytes)
