"""The sender thread's half of a shard's stream: one StreamEvaluation call after another.

``EvaluationStream`` (stream.py) is what the caller's thread sees: ``add`` queues batches, ``close``
and ``abort`` end the shard. Everything here runs on the stream's own background thread: open the
shard (and reopen it after a dropped connection), replay what the server has not acknowledged,
turn queued batches into ~1 MiB chunk messages within the in-flight window, reduce them first in
records mode, and apply acknowledgements, rejections and the summary as they arrive. Both halves
share the stream's state under one condition variable (``_cv``); the attributes below are that
state, declared here so each half can be read (and type-checked) on its own.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from evalstream import wire
from evalstream.client.errors import EvalStreamError
from evalstream.client.reduce import ClientEngine, RecordsBatch
from evalstream.client.tensors import HostBatch, encode_chunk_bytes, rows_per_chunk, score_itemsize
from evalstream.client.transport import RETRYABLE
from evalstream.v1 import evaluation_pb2, service_pb2

if TYPE_CHECKING:
    from evalstream.client.stream import StreamOptions, StreamStats

STREAM_METHOD = "/evalstream.v1.EvalStreamService/StreamEvaluation"
# The OpenShard field that asks for cumulative acknowledgements, and how a server that predates it
# names it when it refuses the open (it refuses every field it does not know).
_ACK_MODE_FIELD = service_pb2.OpenShard.DESCRIPTOR.fields_by_name["ack_mode"].number
_UNKNOWN_ACK_MODE = f"StreamEvaluationRequest.open field {_ACK_MODE_FIELD}"


def raw_stream_call(channel: grpc.Channel) -> Any:
    """StreamEvaluation taking requests already serialized (chunks are encoded by hand, see tensors.py)."""
    return channel.stream_stream(
        STREAM_METHOD,
        request_serializer=None,
        response_deserializer=service_pb2.StreamEvaluationResponse.FromString,
    )


@dataclass
class EncodedBatch:
    """A host batch already encoded into its chunk requests by ``add()`` (sequence numbers included).

    For data already in host memory this is the only copy the client takes: the rows go from the
    caller's arrays straight into the request bytes, where a host copy first and the encoding
    later would copy every byte twice (measured: the host copy alone was the client's largest item).
    """

    chunks: list[bytes]
    rows_per_chunk: list[int]
    nbytes: int

    @property
    def rows(self) -> int:
        return sum(self.rows_per_chunk)

    def release(self) -> None:
        """Nothing pooled to give back (the requests are freed once acknowledged)."""


class _StreamEnded(Exception):
    """The server ended the stream without a shard summary; reopening tells where things stand."""


@dataclass
class _Session:
    """One StreamEvaluation call; a reconnect starts a new one."""

    broken: bool = False
    error: BaseException | None = None
    progressed: bool = False
    close_sent: bool = False


class ShardSender:
    """The background thread's methods of ``EvaluationStream`` (see the module docstring)."""

    # The state both halves share, guarded by ``_cv`` (set up in ``EvaluationStream.__init__``).
    _cv: threading.Condition
    _open: service_pb2.OpenShard
    _opt: StreamOptions
    _metadata: tuple[tuple[str, str], ...]
    _stream_call: Any
    _get_evaluation: Callable[[], evaluation_pb2.Evaluation]
    stats: StreamStats
    rejections: list[service_pb2.ChunkRejection]
    _unreported: list[service_pb2.ChunkRejection]
    _batches: collections.deque[HostBatch | EncodedBatch | RecordsBatch]
    _queued_bytes: int
    _cur: HostBatch | EncodedBatch | RecordsBatch | None
    _cur_row: int
    _next_seq: int
    _refused_locally: int
    _unacked: collections.OrderedDict[int, bytes]
    _samples_committed: int
    _opened: service_pb2.ShardOpened | None
    resumed_from: int | None
    _close_requested: bool
    _aborted: bool
    _summary: service_pb2.ShardSummary | None
    _error: EvalStreamError | None
    _call: Any
    _engine: ClientEngine | None

    def _rows_per_chunk(self, score_dtype: int) -> int:
        return rows_per_chunk(
            self._open.num_classes,
            score_itemsize(score_dtype),
            self._opt.chunk_bytes,
            self._opt.max_message_bytes,
        )

    def _run(self) -> None:
        attempt = 0
        while True:
            session = _Session()
            try:
                self._run_session(session)
            except EvalStreamError as exc:
                self._fail(exc)
                return
            except Exception as exc:  # a bug or a torch/numpy error while encoding
                self._fail(EvalStreamError(f"sender failed: {exc!r}"), exc)
                return
            with self._cv:
                if self._summary is not None or self._aborted:
                    return
            err = session.error
            code = err.code() if isinstance(err, grpc.Call) else None
            if self._older_server(err):
                continue
            if not (code in RETRYABLE or isinstance(err, _StreamEnded)):
                self._fail(self._describe(err), err)
                return
            attempt = 1 if session.progressed else attempt + 1
            if attempt >= self._opt.retry.max_attempts:
                last = self._describe(err)
                self._fail(EvalStreamError(f"giving up after {attempt} attempts: {last}", last.code), err)
                return
            with self._cv:
                self.stats.reconnects += 1
                if self._cv.wait_for(lambda: self._aborted, self._opt.retry.backoff(attempt)):
                    return

    def _older_server(self, err: BaseException | None) -> bool:
        """A server that predates ``OpenShard.ack_mode`` refused it: ask as its clients did (gRPC
        metadata) and open again at once."""
        if not (
            isinstance(err, grpc.Call)
            and err.code() == grpc.StatusCode.INVALID_ARGUMENT
            and _UNKNOWN_ACK_MODE in (err.details() or "")
            and self._open.ack_mode != service_pb2.ACK_MODE_UNSPECIFIED
        ):
            return False
        self._open.ClearField("ack_mode")
        self._metadata = (*self._metadata, wire.ACKS_METADATA)
        return True

    def _where(self) -> str:
        o = self._open
        split = f" split {o.key.split}" if o.key.split else ""
        return f"rank {o.rank} of {o.key.run}/{o.key.model} step {o.key.step}{split}"

    def _describe(self, err: BaseException | None) -> EvalStreamError:
        where = self._where()
        if isinstance(err, grpc.Call):
            return EvalStreamError(f"{where}: {err.code().name}: {err.details()}", err.code())
        return EvalStreamError(f"{where}: {err}")

    def _fail(self, exc: EvalStreamError, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        with self._cv:
            if self._error is None and not self._aborted:
                self._error = exc
            self._cv.notify_all()

    def _run_session(self, session: _Session) -> None:
        reqs: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        reqs.put(service_pb2.StreamEvaluationRequest(open=self._open).SerializeToString())

        def requests() -> Iterator[bytes]:
            while (item := reqs.get()) is not None:
                yield item

        with self._cv:
            if self._aborted:
                return
            call = self._stream_call(requests(), metadata=self._metadata)
            self._call = call
        reader: threading.Thread | None = None
        try:
            replay = self._handle_opened(call, session)
            if replay is None:
                return
            for req in replay:
                reqs.put(req)
            reader = threading.Thread(target=self._read, args=(call, session), daemon=True)
            reader.start()
            self._pump(reqs, session)
        except grpc.RpcError as exc:
            session.broken, session.error = True, exc
        finally:
            reqs.put(None)
            if reader is not None:
                if self._summary is None:
                    call.cancel()
                # After the summary the server ends the call once it sees our half-close.
                reader.join(timeout=5)
            if reader is None or reader.is_alive():
                call.cancel()
            if reader is not None:
                reader.join()

    def _handle_opened(self, call: Any, session: _Session) -> list[bytes] | None:
        """Apply the resume point; the chunks to replay, or None when nothing more is to be sent."""
        try:
            first = next(call)
        except StopIteration:
            session.broken, session.error = True, _StreamEnded("stream ended before the shard was opened")
            return None
        if first.WhichOneof("message") != "opened":
            raise EvalStreamError(f"expected ShardOpened, got {first.WhichOneof('message')}")
        opened = first.opened
        if self._opt.reduce == "client" and self._engine is None and not opened.already_closed:
            self._engine = self._client_engine(opened)
        with self._cv:
            session.progressed = True
            self._opened = opened
            if self.resumed_from is None:
                self.resumed_from = opened.next_sequence
            self._drop_acked(opened.next_sequence)
            self._samples_committed = opened.samples_committed
            self._cv.notify_all()
            if opened.already_closed:
                if not self._close_requested:
                    raise EvalStreamError(
                        f"rank {self._open.rank} of this evaluation was closed earlier; "
                        "nothing more is accepted"
                    )
            else:
                replay = list(self._unacked.values())
                if self.stats.reconnects:
                    self.stats.replayed_chunks += len(replay)
                return replay
        # Our close went through but its summary was lost with the connection.
        self._summary_from_store(opened)
        return None

    def _client_engine(self, opened: service_pb2.ShardOpened) -> ClientEngine:
        """The engine for the layout in the open reply (FAILED_PRECONDITION before anything is sent)."""
        if not opened.HasField("records_layout"):
            raise EvalStreamError(
                "the server did not send a records layout for reduce='client' (a server too old for "
                "client-side reduction); use reduce='server'",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        log_probs = self._open.score_kind == evaluation_pb2.SCORE_KIND_LOG_PROBABILITIES
        kind = "log_probabilities" if log_probs else "logits"
        return ClientEngine.from_reply(
            opened.records_layout,
            self._open.num_classes,
            kind,
            self._opt.reduce_backend,
            self._opt.chunk_bytes,
            self._opt.max_message_bytes,
        )

    def _summary_from_store(self, opened: service_pb2.ShardOpened) -> None:
        evaluation = self._get_evaluation()
        summary = service_pb2.ShardSummary(
            evaluation_id=opened.evaluation_id,
            rank=self._open.rank,
            chunks=opened.next_sequence,
            samples=opened.samples_committed,
            rejected_chunks=len(self.rejections),
            ranks_closed=evaluation.ranks_closed,
            world_size=evaluation.world_size,
            finalized=evaluation.state == evaluation_pb2.EVALUATION_STATE_FINALIZED,
        )
        with self._cv:
            self._summary = summary
            self._cv.notify_all()

    def _drop_acked(self, next_sequence: int) -> None:
        """Forget chunks below the committed point (caller holds the lock)."""
        while self._unacked:
            seq = next(iter(self._unacked))
            if seq >= next_sequence:
                break
            del self._unacked[seq]
        self._cv.notify_all()

    def _pump(self, reqs: queue.SimpleQueue[bytes | None], session: _Session) -> None:
        """Encode queued batches into chunks while the in-flight window allows; then close."""
        while True:
            with self._cv:
                while True:
                    if session.broken or self._summary is not None or self._aborted:
                        return
                    if self._cur is None and self._batches:
                        self._cur, self._cur_row = self._batches.popleft(), 0
                    if self._cur is not None:
                        if len(self._unacked) < self._opt.max_inflight_chunks:
                            break
                    elif self._close_requested and not session.close_sent:
                        session.close_sent = True
                        close = service_pb2.CloseShard(num_chunks=self._next_seq)
                        reqs.put(service_pb2.StreamEvaluationRequest(close=close).SerializeToString())
                    self._cv.wait()
                batch, start, seq = self._cur, self._cur_row, self._next_seq
            if isinstance(batch, RecordsBatch) and not batch.reduced and not self._reduce(batch, seq):
                continue
            if isinstance(batch, EncodedBatch | RecordsBatch):
                req, rows, stop = batch.chunks[start], batch.rows_per_chunk[start], start + 1
                batch.chunks[start] = b""  # kept in _unacked from here; the batch lets go of it
                done = stop >= len(batch.chunks)
            else:
                batch.ready()
                stop = min(batch.rows, start + self._rows_per_chunk(batch.score_dtype))
                req = encode_chunk_bytes(batch, start, stop, seq)
                rows, done = stop - start, stop >= batch.rows
            with self._cv:
                self._unacked[seq] = req
                self._next_seq += 1
                self._cur_row = stop
                self.stats.samples_sent += rows
                self.stats.chunks_sent += 1
                self.stats.max_inflight_chunks = max(self.stats.max_inflight_chunks, len(self._unacked))
                if done:
                    self._cur = None
                    self._queued_bytes -= batch.nbytes
                    batch.release()
                    self._cv.notify_all()
            reqs.put(req)

    def _reduce(self, batch: RecordsBatch, seq: int) -> bool:
        """Client mode: reduce the sender's current batch into its messages, numbered from ``seq``.

        A batch the engine refuses (a label out of range, a NaN, ...) is dropped and reported as a
        rejection, as the server would have reported its chunks: nothing was sent, no sequence
        number is consumed, and the stream goes on. False then.
        """
        from evalstream.service.engine.errors import ChunkError

        assert self._engine is not None
        try:
            self._engine.reduce(batch, seq)
            return True
        except ChunkError as exc:
            rejection = service_pb2.ChunkRejection(
                sequence=seq,
                code="INVALID_ARGUMENT",
                reason=exc.reason,
                message=f"refused by the client's engine before sending: {exc.message}",
            )
            with self._cv:
                self.rejections.append(rejection)
                self._unreported.append(rejection)
                self._refused_locally += 1
                self._cur = None
                self._queued_bytes -= batch.nbytes
                batch.release()
                self._cv.notify_all()
            return False

    def _read(self, call: Any, session: _Session) -> None:
        """Apply acknowledgements and the summary until the stream ends."""
        error: BaseException | None = None
        try:
            for response in call:
                kind = response.WhichOneof("message")
                with self._cv:
                    if kind == "ack":
                        ack = response.ack
                        self._drop_acked(ack.next_sequence)
                        self._samples_committed = ack.samples_committed
                        session.progressed = True
                        if ack.HasField("rejection"):
                            self.rejections.append(ack.rejection)
                            self._unreported.append(ack.rejection)
                    elif kind == "closed":
                        self._summary = response.closed
                    self._cv.notify_all()
            error = _StreamEnded("stream ended before the shard summary arrived")
        except grpc.RpcError as exc:
            error = exc
        with self._cv:
            if self._summary is None:
                session.broken, session.error = True, error
            self._cv.notify_all()
