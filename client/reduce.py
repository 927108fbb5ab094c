"""Client-side reduction: the server's own engine run where the scores are, records on the wire.

With ``reduce="client"`` a shard sends per-sample records (126 bytes a sample with the
default grid) instead of scores (12 KB at 3,000 float32 classes, 256 KB at 131,072 bfloat16). The
records come from ``evalstream.service.engine.ChunkReducer`` itself, configured with what the
server's open reply says shapes a record (temperature grid, rank cap, layout), so they are
bit-identical to the records the server would have made from the same scores with the same
backend, dtype and device.

Where the work runs, so that ``add()`` never waits on a compile or a device:

- ``add()`` keeps the batch: host data is copied into a pooled buffer as in the logits path (one
  memcpy, ~0.5 ns a byte); a CUDA tensor is kept by reference with an event recorded on the
  caller's current stream (no synchronization, no copy, no kernel launched on the training
  thread).
- The stream's sender thread reduces each batch: on the CPU with the engine's eager backend
  (the compiled one is opt-in, ``reduce_backend="compiled"``: the native row pass, or
  TorchInductor where that cannot be built, built or compiled on the sender thread, never the
  training thread); on CUDA on a side stream that first waits for the caller's event. The
  engine's outputs come back to the host asynchronously: copied
  (``non_blocking``) into pinned host buffers reused from a small pool (``PinnedPool``: one
  buffer per output, grown to the largest batch, never more), then an event recorded on the side
  stream, which the sender thread waits on; so the only waits are the sender's, and the
  records are checked and encoded from host memory.
- The records are cut into ~``chunk_bytes`` RecordsChunk messages with the shard's sequence
  numbers, and from there travel exactly like chunks of scores (acknowledged, replayed on a
  dropped connection, deduplicated by sample id at finalize).

``auto`` picks the mode at open, before any batch is seen (see ``choose_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import grpc

from evalstream.client.errors import EvalStreamError
from evalstream.client.tensors import HostBatch
from evalstream.v1 import service_pb2
from evalstream.wire import imported_torch

if TYPE_CHECKING:
    import torch

    from evalstream.service.engine.reducer import ChunkReducer
    from evalstream.service.records_wire import Layout

ReduceMode = Literal["server", "client", "auto"]
REDUCE_MODES: tuple[str, ...] = ("server", "client", "auto")
ReduceBackend = Literal["eager", "compiled", "auto"]
# With "auto", no CUDA device and the compiled client engine, the client reduces from this many
# classes up. Measured (bench/records.py, bench/RESULTS.md, 2-core machine): with the compiled
# engine the client spends about the CPU a sample that sending the scores costs it (less at
# C=3,000) while the server's share falls to a few µs, at every class count measured (3,000
# float32 to 131,072 bfloat16). The eager engine costs the client ~3-5x the CPU of sending the
# scores, so with it, on the CPU, "auto" leaves the reduction to the server. Below ~1,000
# classes a score row is only a few times a record and the engine's fixed per-row work
# dominates: the server keeps it.
AUTO_CLIENT_MIN_CLASSES = 1024


def choose_mode(reduce: str, num_classes: int, backend: str = "eager") -> str:
    """ "server" or "client" for a stream; ``auto`` is decided here, at open, before any batch.

    ``auto`` reduces on the client when a CUDA device is available in this process (the scores
    are then almost surely on it: reducing there is nearly free and saves copying whole rows of
    scores to the host), or when the client engine is the compiled one (``backend``) and the
    class count is at least AUTO_CLIENT_MIN_CLASSES (the wire cost of a score row grows with C, a
    record's does not); else on the server.
    """
    if reduce not in REDUCE_MODES:
        raise ValueError(f'reduce must be "server", "client" or "auto", got {reduce!r}')
    if reduce != "auto":
        return reduce
    torch = imported_torch()
    if torch is not None and torch.cuda.is_available():
        return "client"
    compiled = backend == "compiled" or (backend == "auto" and _compiler_available())
    return "client" if compiled and num_classes >= AUTO_CLIENT_MIN_CLASSES else "server"


def _compiler_available() -> bool:
    """Whether the engine's "auto" backend compiles on the CPU (a C++ compiler is found)."""
    from evalstream.service.engine.fused import compiler_available

    return bool(compiler_available())


def layout_version() -> int:
    """The records layout version this client's engine produces (sent in the open request)."""
    from evalstream.service.records_wire import LAYOUT_VERSION

    return LAYOUT_VERSION


@dataclass
class DeviceBatch:
    """A CUDA batch kept by reference until the sender reduces it; ``event`` marks it produced."""

    scores: Any
    labels: Any
    sample_ids: Any
    event: Any
    nbytes: int

    @property
    def rows(self) -> int:
        return int(self.scores.shape[0])

    def release(self) -> None:
        self.scores = self.labels = self.sample_ids = None


@dataclass
class RecordsBatch:
    """One ``add()`` call in client mode: the batch until the sender reduces it, then its messages.

    Until ``reduce`` runs, ``chunks`` is empty and ``source`` holds the batch; ``reduce`` fills
    ``chunks``/``rows_per_chunk`` with the RecordsChunk requests numbered from the given sequence
    (the sender then sends them as it sends a host batch's encoded chunks).
    """

    source: HostBatch | DeviceBatch | None
    num_rows: int
    nbytes: int
    chunks: list[bytes] = field(default_factory=list)
    rows_per_chunk: list[int] = field(default_factory=list)
    reduced: bool = False

    @property
    def rows(self) -> int:
        return self.num_rows

    def release(self) -> None:
        if self.source is not None:
            self.source.release()
            self.source = None


class PinnedPool:
    """Pinned host buffers for the engine's outputs coming back from a device, reused batch after
    batch: one per (dtype, trailing shape), grown (to a power of two rows) when a batch is larger,
    so the pool holds at most one buffer per output, sized for the largest batch. Used by the
    sender thread only, one batch at a time (its records are copied out before the next)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, tuple[int, ...]], Any] = {}
        self.allocations = 0  # how many buffers were ever pinned (the tests check the reuse)

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """A pinned [rows, ...] host tensor of ``like``'s dtype and shape (a view of a pooled one)."""
        import torch

        rows, rest = int(like.shape[0]), tuple(int(d) for d in like.shape[1:])
        key = (like.dtype, rest)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            capacity = 1 << max(0, rows - 1).bit_length()
            buf = torch.empty((capacity, *rest), dtype=like.dtype, pin_memory=True)
            self._buffers[key] = buf
            self.allocations += 1
        return buf[:rows]

    @property
    def buffers(self) -> int:
        return len(self._buffers)


@dataclass
class ClientEngine:
    """The engine configured from the server's open reply; used by the sender thread only."""

    num_classes: int
    score_kind: str
    backend: str
    layout: Layout
    rows_per_message: int
    _reducers: dict[str, ChunkReducer] = field(default_factory=dict)
    _side_streams: dict[str, Any] = field(default_factory=dict)
    pinned: PinnedPool = field(default_factory=PinnedPool)

    @classmethod
    def from_reply(
        cls,
        reply: service_pb2.RecordsLayout,
        num_classes: int,
        score_kind: str,
        backend: str,
        chunk_bytes: int,
        max_message_bytes: int,
    ) -> ClientEngine:
        """The engine for the layout the server asked for; FAILED_PRECONDITION naming both versions
        when this client's engine cannot produce it (raised before anything is sent)."""
        from evalstream.service.records_wire import layout_for, layout_from_pb

        ours = layout_for(tuple(reply.inverse_temperatures), reply.max_rank or 1)
        theirs = layout_from_pb(reply)
        if ours.signature() != theirs:
            raise EvalStreamError(
                f"the server asks for records layout version {reply.version} with columns "
                f"{[c[0] for c in theirs[1]]}; this client's engine produces version {ours.version} with "
                f"{[c[0] for c in ours.signature()[1]]}: use a client of the server's release, or "
                "reduce='server'",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        limit = min(int(reply.max_rows) or 1, max(1, (max_message_bytes - 1024) // ours.record_bytes))
        rows = max(1, min(chunk_bytes // ours.record_bytes, limit))
        return cls(num_classes, score_kind, backend, ours, rows)

    def reducer(self, device: str) -> ChunkReducer:
        """One reducer per device, built on first use (on the sender thread)."""
        reducer = self._reducers.get(device)
        if reducer is None:
            from evalstream.service.engine.config import EngineConfig
            from evalstream.service.engine.reducer import ChunkReducer

            config = EngineConfig(
                inverse_temperatures=self.layout.inverse_temperatures,
                max_rank=self.layout.max_rank,
                device=device,
                backend=self.backend,
                top_k=(1,),
            )
            reducer = ChunkReducer(self.num_classes, config, self.score_kind)
            self._reducers[device] = reducer
        return reducer

    def reduce(self, batch: RecordsBatch, first_sequence: int) -> None:
        """Reduce the batch and fill in its messages; ``ChunkError`` when the engine refuses it."""
        from evalstream.service.records_wire import encode_request

        source = batch.source
        assert source is not None
        if isinstance(source, DeviceBatch):
            records = self._reduce_device(source)
        else:
            source.ready()
            records = self.reducer("cpu").reduce(_torch_scores(source), source.labels, source.sample_ids)
        step = self.rows_per_message
        bounds = [(a, min(len(records), a + step)) for a in range(0, len(records), step)]
        batch.chunks = [
            encode_request(records, self.layout, a, b, first_sequence + i) for i, (a, b) in enumerate(bounds)
        ]
        batch.rows_per_chunk = [b - a for a, b in bounds]
        batch.reduced = True
        batch.release()

    def _reduce_device(self, batch: DeviceBatch) -> Any:
        """On a side stream of the scores' device, after the caller's event: the caller never waits."""
        import torch

        device = batch.scores.device
        key = str(device)
        stream = self._side_streams.get(key)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            self._side_streams[key] = stream
        stream.wait_event(batch.event)
        with torch.cuda.stream(stream):
            return self.reducer(key).reduce(
                batch.scores, batch.labels, batch.sample_ids, to_host=lambda *t: self._to_host(stream, t)
            )

    def _to_host(self, stream: Any, outputs: tuple[Any, ...]) -> tuple[Any, Any, Any]:
        """The engine's outputs copied into pinned host buffers behind the reduction on ``stream``;
        the sender thread waits on the copies' event (the training thread never waits)."""
        import torch

        host = []
        for t in outputs:
            buf = self.pinned.take(t)
            buf.copy_(t, non_blocking=True)
            host.append(buf)
        copied = torch.cuda.Event()
        copied.record(stream)
        copied.synchronize()
        floats, ints, lse = host
        return floats, ints, lse


def _torch_scores(batch: HostBatch) -> Any:
    """The host batch's scores as the engine takes them (bfloat16 travels as int16 bit patterns)."""
    from evalstream.v1 import tensor_pb2

    if batch.score_dtype != tensor_pb2.DATA_TYPE_BFLOAT16:
        return batch.scores
    import torch

    return torch.from_numpy(batch.scores).view(torch.bfloat16)


def device_batch(scores: torch.Tensor, labels: Any, sample_ids: Any, num_classes: int) -> DeviceBatch:
    """Keep a CUDA batch for the sender: an event on the caller's current stream, nothing else.

    The tensors are detached and held by reference (the caching allocator cannot reuse their memory
    while held); ``record_stream`` is not needed because the sender's stream waits on the event
    before reading them and the references are dropped only after the reduction.
    """
    import torch

    shape = tuple(scores.shape)
    if len(shape) != 2 or shape[1] != num_classes:
        raise ValueError(f"scores must have shape [n, {num_classes}], got {list(shape)}")
    scores = scores.detach()
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        scores = scores.float()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach()
    if isinstance(sample_ids, torch.Tensor):
        sample_ids = sample_ids.detach()
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(scores.device))
    nbytes = scores.numel() * scores.element_size()
    return DeviceBatch(scores, labels, sample_ids, event, nbytes)


def is_cuda_tensor(x: object) -> bool:
    torch = imported_torch()
    return torch is not None and isinstance(x, torch.Tensor) and x.device.type == "cuda"
