"""Host copies of scores, labels and sample ids, and their raw-bytes wire form.

``add()`` runs on the training loop's thread. Host data is encoded into chunk
requests there by :func:`encode_chunk_bytes` (one copy of the rows); a CUDA
tensor only gets an asynchronous copy into a reused pinned buffer, recorded
with an event, and the sender thread waits for it (:meth:`HostBatch.ready`)
and encodes it.

torch is never imported here: an input can only be a torch tensor if the
caller has imported torch already, so numpy users and the read-only CLI do
not pay for loading it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from evalstream import wire
from evalstream.v1 import service_pb2, tensor_pb2

if TYPE_CHECKING:
    import torch

_SCORE_NAMES = ("float32", "float16", "bfloat16")
# The server's default cap on rows per chunk (max_chunk_rows).
MAX_CHUNK_ROWS = 65536


_is_tensor = wire.is_tensor


def _torch_score_name(dtype: torch.dtype) -> str | None:
    name = str(dtype).rsplit(".", 1)[-1]
    return name if name in _SCORE_NAMES else None


@dataclass
class HostBatch:
    """One ``add()`` call's data on the host, in wire dtypes.

    Until :meth:`ready` returns, the fields of a CUDA batch are pinned torch
    tensors still being filled by an asynchronous copy; afterwards all three
    are numpy arrays (bfloat16 scores as their int16 bit patterns).
    """

    scores: Any
    score_dtype: int
    labels: Any
    sample_ids: Any
    nbytes: int
    event: Any = None
    releases: list[Callable[[], None]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.scores.shape[0])

    def ready(self) -> None:
        """Wait for a pending device-to-host copy, then expose numpy arrays."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        self.scores = wire.host_array(self.scores)
        self.labels = wire.host_array(self.labels)
        if self.sample_ids is not None:
            self.sample_ids = wire.host_array(self.sample_ids)

    def release(self) -> None:
        """Give pinned buffers back to their pool; the arrays must not be used afterwards."""
        for fn in self.releases:
            fn()
        self.releases.clear()


class PinnedPool:
    """Reused page-locked host buffers for non-blocking device-to-host copies.

    Allocating pinned memory costs far more than the copy itself, so buffers
    are kept and reused; at most ``max_buffers`` stay idle in the pool.
    """

    def __init__(self, max_buffers: int = 8) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._max = max_buffers

    def take(self, nbytes: int) -> torch.Tensor:
        """A pinned uint8 tensor of at least ``nbytes`` bytes."""
        import torch

        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                best = min(fits, key=lambda i: self._free[i].numel())
                return self._free.pop(best)
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            if len(self._free) < self._max:
                self._free.append(buf)


class HostPool:
    """Reused host buffers for the copies ``add()`` takes of CPU scores.

    A fresh [4096, 3000] float32 copy costs ~13 ms, mostly page faults on newly
    mapped memory; copying into a buffer already mapped costs ~2 ms. Buffers come
    back when their batch has been encoded; at most ``max_buffers`` stay idle.
    """

    def __init__(self, max_buffers: int = 4) -> None:
        self._free: list[npt.NDArray[np.uint8]] = []
        self._lock = threading.Lock()
        self._max = max_buffers

    def take(self, nbytes: int) -> npt.NDArray[np.uint8]:
        """A uint8 array of exactly ``nbytes`` bytes over a buffer of at least that size."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            if fits:
                best = min(fits, key=lambda i: self._free[i].nbytes)
                return self._free.pop(best)[:nbytes]
        return np.empty(max(nbytes, 1), dtype=np.uint8)[:nbytes]

    def give(self, buf: npt.NDArray[np.uint8]) -> None:
        base = buf.base if isinstance(buf.base, np.ndarray) else buf
        with self._lock:
            if len(self._free) < self._max:
                self._free.append(base)


def _pooled_copy(x: Any, batch: HostBatch, pool: HostPool) -> npt.NDArray[Any]:
    """A contiguous copy of a CPU tensor or numpy array in a pooled buffer (same dtype and shape).

    The copy is numpy's, on this thread: torch would split it over its OpenMP
    threads, which then spin-wait after the copy and take CPU from the
    training loop and the sender (measured: 3x the client's CPU per sample).
    """
    src = wire.host_array(x) if _is_tensor(x) else x
    buf = pool.take(src.nbytes)
    batch.releases.append(lambda: pool.give(buf))
    host = buf.view(src.dtype).reshape(src.shape)
    np.copyto(host, src)
    return host


def _torch_wire_dtype(x: torch.Tensor, role: str) -> torch.dtype:
    """The dtype ``x`` travels as, converting only what the wire cannot carry."""
    import torch

    if role == "scores":
        if _torch_score_name(x.dtype) is not None:
            return x.dtype
        if x.is_floating_point():
            return torch.float32
        raise TypeError(f"argument scores must be a floating-point tensor, got {x.dtype}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"argument {role} must be an integer tensor, got {x.dtype}")
    return torch.int32 if role == "labels" and x.dtype == torch.int32 else torch.int64


def _torch_host(
    x: torch.Tensor, role: str, copy: bool, batch: HostBatch, pool: PinnedPool, host_pool: HostPool | None
) -> Any:
    """Host form of a tensor: pinned async copy for CUDA, numpy array otherwise."""
    import torch

    x = x.detach()
    dtype = _torch_wire_dtype(x, role)
    if x.device.type == "cuda":
        if x.dtype != dtype:
            x = x.to(dtype)  # converted on the device, asynchronously
        nbytes = x.numel() * x.element_size()
        buf = pool.take(nbytes)
        batch.releases.append(lambda: pool.give(buf))
        host = buf[:nbytes].view(dtype).view(x.shape)
        # D2H copies run on the source device's current stream: ordered after
        # the kernels that produced x, without blocking the host.
        host.copy_(x, non_blocking=True)
        if batch.event is None:
            batch.event = torch.cuda.Event()
        batch.event.record(torch.cuda.current_stream(x.device))
        return host
    if x.device.type != "cpu":
        x = x.to("cpu")
    if x.dtype != dtype:
        x = x.to(dtype)  # a conversion is a copy already
    elif copy or not x.is_contiguous():
        if host_pool is not None and role == "scores" and x.numel():
            return _pooled_copy(x, batch, host_pool)
        x = x.clone(memory_format=torch.contiguous_format)
    return wire.host_array(x)


def _numpy_host(
    x: Any, role: str, copy: bool, batch: HostBatch, host_pool: HostPool | None
) -> npt.NDArray[Any]:
    """Contiguous little-endian numpy array in a wire dtype, copied unless ``copy`` is False."""
    a = np.asarray(x)
    if role == "scores":
        if a.dtype.name == "bfloat16":  # e.g. ml_dtypes.bfloat16
            a = wire.host_array(a)
        elif a.dtype.name not in _SCORE_NAMES:
            if a.dtype.kind != "f":
                raise TypeError(f"argument scores must be floating point, got {a.dtype}")
            return np.ascontiguousarray(a, dtype="<f4")
    else:
        if a.dtype.kind not in "iu":
            raise TypeError(f"argument {role} must be an integer array, got {a.dtype}")
        want = "<i4" if role == "labels" and a.dtype.name == "int32" else "<i8"
        if a.dtype != np.dtype(want):
            return np.ascontiguousarray(a, dtype=want)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    if copy and host_pool is not None and role == "scores" and a.size:
        return _pooled_copy(a, batch, host_pool)
    return np.array(a, order="C", copy=True) if copy else np.ascontiguousarray(a)


def _score_wire(x: Any) -> int:
    if _is_tensor(x):
        return wire.DTYPE_CODES[_torch_score_name(_torch_wire_dtype(x, "scores")) or "float32"]
    name = np.asarray(x).dtype.name
    return wire.DTYPE_CODES[name] if name in _SCORE_NAMES else tensor_pb2.DATA_TYPE_FLOAT32


def to_host_batch(
    scores: Any,
    labels: Any,
    sample_ids: Any = None,
    *,
    num_classes: int,
    copy: bool = True,
    pool: PinnedPool | None = None,
    host_pool: HostPool | None = None,
) -> HostBatch:
    """Validate shapes and take a host copy of one batch (torch on any device, or numpy).

    ``copy=False`` skips the copy of host inputs already in a wire dtype; the
    caller then must not modify them until the evaluation is closed. Device
    inputs are always copied (asynchronously for CUDA).
    """
    n = _check_shapes(scores, labels, sample_ids, num_classes)
    batch = HostBatch(scores=None, score_dtype=_score_wire(scores), labels=None, sample_ids=None, nbytes=0)
    pool = pool or PinnedPool()

    def host(x: Any, role: str) -> Any:
        if _is_tensor(x):
            return _torch_host(x, role, copy, batch, pool, host_pool)
        return _numpy_host(x, role, copy, batch, host_pool)

    batch.scores = host(scores, "scores")
    batch.labels = host(labels, "labels")
    batch.sample_ids = None if sample_ids is None else host(sample_ids, "sample_ids")
    batch.nbytes = sum(_nbytes(a) for a in (batch.scores, batch.labels, batch.sample_ids))
    assert batch.rows == n
    return batch


def _nbytes(a: Any) -> int:
    if a is None:
        return 0
    if _is_tensor(a):
        return int(a.numel() * a.element_size())
    return int(a.nbytes)


def _check_shapes(scores: Any, labels: Any, sample_ids: Any, num_classes: int) -> int:
    """Number of rows; ValueError naming the argument whose shape is wrong."""
    s = tuple(scores.shape) if hasattr(scores, "shape") else np.shape(scores)
    if len(s) != 2 or s[1] != num_classes:
        raise ValueError(
            f"argument scores must have shape [n, {num_classes}] (num_classes={num_classes}), got {list(s)}"
        )
    n = int(s[0])
    for role, x in (("labels", labels), ("sample_ids", sample_ids)):
        if x is None:
            continue
        shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
        if shape != (n,):
            raise ValueError(f"argument {role} must have shape [{n}] to match scores, got {list(shape)}")
    return n


def rows_per_chunk(num_classes: int, score_itemsize: int, chunk_bytes: int, max_message_bytes: int) -> int:
    """Rows per chunk so a message carries about ``chunk_bytes`` and never exceeds the limit."""
    row = num_classes * score_itemsize + 16  # scores + label + sample id
    limit = max_message_bytes - 4096  # tags, lengths and the small fields
    if row > limit:
        raise ValueError(
            f"one row of {num_classes} scores ({row} bytes) exceeds the {max_message_bytes}-byte message "
            "limit; raise max_message_bytes on both client and server"
        )
    return max(1, min(chunk_bytes // row, limit // row, MAX_CHUNK_ROWS))


def _wire_tensors(
    batch: HostBatch, start: int, stop: int
) -> tuple[wire.WireTensor, wire.WireTensor, wire.WireTensor | None]:
    """Rows [start, stop) of a ready batch's scores, labels and sample ids, with their wire dtypes."""
    labels = batch.labels[start:stop]
    ids = batch.sample_ids
    return (
        wire.WireTensor(batch.score_dtype, batch.scores[start:stop]),
        wire.WireTensor(wire.DTYPE_CODES[labels.dtype.name], labels),
        None if ids is None else wire.WireTensor(tensor_pb2.DATA_TYPE_INT64, ids[start:stop]),
    )


def encode_chunk_bytes(batch: HostBatch, start: int, stop: int, sequence: int) -> bytes:
    """The serialized request carrying rows [start, stop) of a ready batch, with one copy of the rows."""
    return wire.encode_chunk_request(sequence, *_wire_tensors(batch, start, stop))


def encode_chunk(
    batch: HostBatch, start: int, stop: int, sequence: int
) -> service_pb2.StreamEvaluationRequest:
    """:func:`encode_chunk_bytes` built with protobuf instead (what the hand-written bytes must equal)."""

    def tensor(t: wire.WireTensor) -> tensor_pb2.Tensor:
        return tensor_pb2.Tensor(dtype=t.dtype, shape=list(t.array.shape), raw_contents=t.array.tobytes())  # type: ignore[arg-type]

    scores, labels, ids = _wire_tensors(batch, start, stop)
    chunk = service_pb2.Chunk(sequence=sequence, scores=tensor(scores), labels=tensor(labels))
    if ids is not None:
        chunk.sample_ids.CopyFrom(tensor(ids))
    return service_pb2.StreamEvaluationRequest(chunk=chunk)


def score_itemsize(score_dtype: int) -> int:
    return wire.ITEMSIZE[score_dtype]
