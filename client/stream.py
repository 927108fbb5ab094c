"""One rank's shard of an evaluation: batches in, chunk messages out, from a background thread.

The caller's thread only validates and encodes host data into chunk requests
(one copy of the rows) or starts a device batch's asynchronous host copy, and
enqueues (``add``).
The sender thread turns queued batches into ~1 MiB chunk messages, keeps every
chunk until the server acknowledges it as durably committed, and on a dropped
connection reopens the shard and replays what was not acknowledged. Two
bounds keep memory flat: bytes queued for encoding (``add`` blocks beyond
``max_buffer_bytes``: backpressure) and chunks sent but unacknowledged
(``max_inflight_chunks``).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from evalstream.client.errors import ChunkRejectedError, EvalStreamError, EvaluationTimeout
from evalstream.client.reduce import ClientEngine, RecordsBatch, device_batch, is_cuda_tensor
from evalstream.client.sender import EncodedBatch, ShardSender, raw_stream_call
from evalstream.client.tensors import (
    HostBatch,
    HostPool,
    PinnedPool,
    encode_chunk_bytes,
    to_host_batch,
)
from evalstream.client.transport import RetryPolicy
from evalstream.v1 import evaluation_pb2, service_pb2

OnRejection = Literal["raise", "collect"]


@dataclass
class StreamStats:
    """Counters for the caller and for tests: what the stream did, not what the server holds."""

    samples_added: int = 0
    samples_sent: int = 0
    chunks_sent: int = 0
    reconnects: int = 0
    replayed_chunks: int = 0
    backpressure_waits: int = 0
    backpressure_seconds: float = 0.0
    max_queued_bytes: int = 0
    max_inflight_chunks: int = 0


@dataclass
class StreamOptions:
    """How a shard is streamed; see ``EvalClient.evaluation`` for each field's meaning."""

    chunk_bytes: int
    max_message_bytes: int
    max_buffer_bytes: int
    max_inflight_chunks: int
    on_rejection: OnRejection
    copy: bool
    retry: RetryPolicy
    open_timeout: float | None
    # "server" (scores travel) or "client" (records travel, see reduce.py); auto is resolved at open.
    reduce: str = "server"
    reduce_backend: str = "eager"


class EvaluationStream(ShardSender):
    """Streams one rank's scores to an evaluation; use as a context manager or call ``close()``.

    Leaving the ``with`` block normally closes the shard (``summary`` then holds
    the server's ShardSummary). Leaving it with an exception aborts: the stream
    is cancelled and the shard stays open, so a restarted rank can resume it.
    Not thread-safe: one thread calls ``add``.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        open_request: service_pb2.OpenShard,
        metadata: tuple[tuple[str, str], ...],
        options: StreamOptions,
        waiter: Callable[[float | None], evaluation_pb2.Evaluation],
        get_evaluation: Callable[[], evaluation_pb2.Evaluation],
        pools: tuple[PinnedPool, HostPool] | None = None,
    ) -> None:
        self._stream_call = raw_stream_call(channel)
        # One acknowledgement for several chunks (its next_sequence covers them all): a staging block's
        # chunks commit together, and one message instead of ~12 saves both ends a receive, a parse
        # and a wake-up per chunk.
        self._open = service_pb2.OpenShard()
        self._open.CopyFrom(open_request)
        self._open.ack_mode = service_pb2.ACK_MODE_CUMULATIVE
        self._metadata = metadata
        self._opt = options
        self._waiter = waiter
        self._get_evaluation = get_evaluation
        # The client's pools when given: an evaluation's first device batches then reuse the pinned
        # buffers of the previous one (pinning memory costs far more than the copy).
        self._pool, self._host_pool = pools or (PinnedPool(), HostPool())
        self.stats = StreamStats()
        self.rejections: list[service_pb2.ChunkRejection] = []
        self._unreported: list[service_pb2.ChunkRejection] = []
        self._cv = threading.Condition()
        self._batches: collections.deque[HostBatch | EncodedBatch | RecordsBatch] = collections.deque()
        self._queued_bytes = 0
        self._cur: HostBatch | EncodedBatch | RecordsBatch | None = None
        self._cur_row = 0  # the next row of a HostBatch, the next chunk of an EncodedBatch
        self._next_seq = 0
        # Batches the client's own engine refused (records mode): rejected without a sequence number.
        self._refused_locally = 0
        # Sequence numbers taken by queued batches (add() encodes host batches with theirs).
        self._reserved_seq = 0
        # Serialized chunk requests sent and not yet acknowledged, kept for replay.
        self._unacked: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._samples_committed = 0
        self._opened: service_pb2.ShardOpened | None = None
        self.resumed_from: int | None = None
        self._close_requested = False
        self._aborted = False
        self._summary: service_pb2.ShardSummary | None = None
        self._error: EvalStreamError | None = None
        self._call: Any = None
        # The client-side engine (reduce="client"), built from the open reply's records layout.
        self._engine: ClientEngine | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"evalstream-rank{open_request.rank}", daemon=True
        )
        self._thread.start()
        self._wait_opened()

    # ----------------------------------------------------------- caller side

    @property
    def evaluation_id(self) -> str:
        return self._opened.evaluation_id if self._opened is not None else ""

    @property
    def samples_committed(self) -> int:
        """Samples of this shard the server has durably committed (acknowledged)."""
        with self._cv:
            return self._samples_committed

    @property
    def reduce_mode(self) -> str:
        """Where this shard's scores are reduced: "server" or "client"."""
        return self._opt.reduce

    @property
    def summary(self) -> service_pb2.ShardSummary | None:
        """The server's summary once the shard is closed."""
        return self._summary

    def add(self, scores: Any, labels: Any, sample_ids: Any = None) -> None:
        """Queue one batch: [n, C] scores (logits or log-probabilities), [n] labels, optional [n] ids.

        Encodes host data into its chunk requests (asynchronous host copy for CUDA tensors, encoded
        by the sender) and returns; blocks
        only while more than ``max_buffer_bytes`` wait to be sent. Raises the
        stream's failure, or (``on_rejection="raise"``) the server's in-band
        rejection of an earlier chunk.
        """
        self._raise_if_failed(include_rejections=True)
        if self._close_requested or self._aborted:
            raise EvalStreamError("add() after close() or abort()")
        if self._opt.reduce == "client":
            with self._naming_the_stream():
                records = self._records_batch(scores, labels, sample_ids)
            self._enqueue(records, 0)
            return
        # Host data is encoded right here (no separate host copy; see EncodedBatch); device data gets
        # its asynchronous copy and is encoded by the sender once the copy is done.
        with self._naming_the_stream():
            host = to_host_batch(
                scores,
                labels,
                sample_ids,
                num_classes=self._open.num_classes,
                copy=False,
                pool=self._pool,
                host_pool=self._host_pool,
            )
        if host.rows == 0:
            host.release()
            return
        batch: HostBatch | EncodedBatch = host
        step = self._rows_per_chunk(host.score_dtype)
        chunks = -(-host.rows // step)
        if host.event is None:
            batch = self._encode(host, step, self._reserved_seq)
        self._enqueue(batch, chunks)

    @contextlib.contextmanager
    def _naming_the_stream(self) -> Iterator[None]:
        """Validation errors of ``add()`` say which rank and evaluation refused the batch: a job
        streams several evaluations at once from many ranks."""
        try:
            yield
        except (TypeError, ValueError) as exc:
            cls = TypeError if isinstance(exc, TypeError) else ValueError
            raise cls(f"add() to {self._where()}: {exc}") from (None if type(exc) is cls else exc)

    def _records_batch(self, scores: Any, labels: Any, sample_ids: Any) -> RecordsBatch:
        """Client mode: keep the batch for the sender's engine (a pooled host copy, or a CUDA tensor
        by reference with an event); no reduction, compile or device synchronization here."""
        if is_cuda_tensor(scores):
            dev = device_batch(scores, labels, sample_ids, self._open.num_classes)
            return RecordsBatch(dev, dev.rows, dev.nbytes)
        host = to_host_batch(
            scores,
            labels,
            sample_ids,
            num_classes=self._open.num_classes,
            copy=self._opt.copy,
            pool=self._pool,
            host_pool=self._host_pool,
        )
        return RecordsBatch(host, host.rows, host.nbytes)

    def _enqueue(self, batch: HostBatch | EncodedBatch | RecordsBatch, chunks: int) -> None:
        """Queue a batch for the sender, waiting while ``max_buffer_bytes`` are queued (backpressure)."""
        if batch.rows == 0:
            batch.release()
            return
        with self._cv:
            waited = False
            start = time.perf_counter()
            while (
                self._queued_bytes > 0
                and self._queued_bytes + batch.nbytes > self._opt.max_buffer_bytes
                and self._error is None
            ):
                waited = True
                self._cv.wait()
            if waited:
                self.stats.backpressure_waits += 1
                self.stats.backpressure_seconds += time.perf_counter() - start
            if self._error is None:
                self._reserved_seq += chunks
                self._batches.append(batch)
                self._queued_bytes += batch.nbytes
                self.stats.samples_added += batch.rows
                self.stats.max_queued_bytes = max(self.stats.max_queued_bytes, self._queued_bytes)
                self._cv.notify_all()
        self._raise_if_failed(include_rejections=False)

    def close(self, timeout: float | None = None) -> service_pb2.ShardSummary:
        """Send what is queued, close the shard and return the server's ShardSummary.

        Idempotent. Raises ``EvaluationTimeout`` if the summary does not arrive
        within ``timeout`` seconds (the stream keeps going in the background),
        ``ChunkRejectedError`` (carrying the summary) for unreported rejections
        when ``on_rejection="raise"``.
        """
        with self._cv:
            if self._aborted:
                raise EvalStreamError("close() after abort()")
            self._close_requested = True
            self._cv.notify_all()
            done = self._cv.wait_for(lambda: self._summary is not None or self._error is not None, timeout)
        if not done:
            raise EvaluationTimeout(f"shard of rank {self._open.rank} did not close within {timeout} s")
        self._thread.join()
        self._raise_close_failure()
        assert self._summary is not None
        pending = self._take_unreported()
        if pending and self._opt.on_rejection == "raise":
            raise ChunkRejectedError(pending, self._summary)
        return self._summary

    def abort(self) -> None:
        """Stop sending and cancel the stream without closing the shard (it can be resumed)."""
        with self._cv:
            self._aborted = True
            call = self._call
            self._cv.notify_all()
        if call is not None:
            call.cancel()
        self._thread.join()
        for batch in self._batches:
            batch.release()
        self._batches.clear()

    def result(self, timeout: float | None = None) -> evaluation_pb2.Evaluation:
        """Wait until the evaluation (all ranks) is finalized and return it with its merged result."""
        return self._waiter(timeout)

    def __enter__(self) -> EvaluationStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _wait_opened(self) -> None:
        with self._cv:
            ok = self._cv.wait_for(
                lambda: self._opened is not None or self._error is not None, self._opt.open_timeout
            )
        if not ok:
            self.abort()
            raise EvaluationTimeout(f"could not open the shard within {self._opt.open_timeout} s")
        if self._error is not None:
            self._thread.join()
        self._raise_if_failed(include_rejections=False)

    def _take_unreported(self) -> list[service_pb2.ChunkRejection]:
        with self._cv:
            pending, self._unreported = self._unreported, []
        return pending

    def _raise_close_failure(self) -> None:
        """The stream's failure; led by this stream's first rejection when the server refused the close.

        A close fails with FAILED_PRECONDITION when nothing of the evaluation committed, which is
        what rejecting every chunk leads to; the server's "nothing to finalize" alone would hide
        the reason (a label out of range, a NaN score) the caller has to fix. In either
        ``on_rejection`` mode the rejections come first, the server's answer after them.
        """
        error = self._error
        if error is None:
            return
        with self._cv:
            rejections = list(self.rejections)
            self._unreported = []
            sent = self._next_seq + self._refused_locally
        if rejections and error.code == grpc.StatusCode.FAILED_PRECONDITION:
            raise ChunkRejectedError(rejections, chunks_sent=sent, failure=error) from error
        raise error

    def _raise_if_failed(self, include_rejections: bool) -> None:
        if self._error is not None:
            raise self._error
        if include_rejections and self._opt.on_rejection == "raise" and self._unreported:
            raise ChunkRejectedError(self._take_unreported())

    @staticmethod
    def _encode(batch: HostBatch, step: int, first_seq: int) -> EncodedBatch:
        """All chunk requests of a host batch, numbered from ``first_seq`` (one copy of the rows)."""
        bounds = [(a, min(batch.rows, a + step)) for a in range(0, batch.rows, step)]
        chunks = [encode_chunk_bytes(batch, a, b, first_seq + i) for i, (a, b) in enumerate(bounds)]
        nbytes = batch.nbytes
        batch.release()
        return EncodedBatch(chunks, [b - a for a, b in bounds], nbytes)

    # ----------------------------------------------------------- sender side
