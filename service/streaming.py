"""One StreamEvaluation call: requests in, answers out in request order.

Reading and answering run apart, so the next chunks are received and reduced while earlier ones
commit: the reader turns each request into the future of its answer and queues it; the answering
side awaits them in order. A chunk's future comes from the coordinator (ingest.py, where every
protocol rule lives); open and close are answered here from the coordinator's results.

Acknowledgements are per chunk unless the stream asked for cumulative ones, in ``OpenShard.ack_mode``
or, for clients that predate that field, with the ``evalstream-acks: cumulative`` gRPC metadata.
Then a run of plain chunk outcomes that are ready together (a staging block's chunks commit at
once) is answered by one ChunkAck whose ``next_sequence`` covers them all, as the contract's
"highest sequence durably committed" allows. Rejections and duplicates are always answered one
by one.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from evalstream import wire
from evalstream.service import records_wire
from evalstream.service.decode import decode_raw
from evalstream.service.errors import FailedPrecondition, InvalidArgument
from evalstream.service.ingest import ChunkOutcome, Coordinator, Lease, evaluation_key
from evalstream.service.store.base import ShardOpenRequest
from evalstream.v1 import service_pb2

# Answers of one stream waiting to be sent. Chunks are copied into the stream's staging blocks as they
# arrive (which bound its memory), so this only needs to exceed the chunks of two blocks.
PIPELINE_DEPTH = 256
StreamRequest = service_pb2.StreamEvaluationRequest | wire.RawChunk | wire.RawRecords
Response = service_pb2.StreamEvaluationResponse
_ACK_MODES = {service_pb2.ACK_MODE_PER_CHUNK: False, service_pb2.ACK_MODE_CUMULATIVE: True}


def wants_cumulative_acks(metadata: Any) -> bool:
    """Whether a call's gRPC metadata asks for cumulative acknowledgements (clients before ack_mode)."""
    return any(tuple(item) == wire.ACKS_METADATA for item in metadata or ())


class _Nothing:
    """No answer taken ahead (None is the end of the answers)."""


NOTHING = _Nothing()


def _plain(outcome: ChunkOutcome) -> bool:
    return outcome.rejection is None and not outcome.duplicate


def _settled_plain(fut: asyncio.Future[Any]) -> bool:
    """A future already holding a plain chunk outcome (an acknowledgement another one may cover)."""
    if not fut.done() or fut.cancelled() or fut.exception() is not None:
        return False
    result = fut.result()
    return isinstance(result, ChunkOutcome) and _plain(result)


@dataclass
class _Stream:
    """What one StreamEvaluation call has opened, and how it is acknowledged."""

    metadata_cumulative: bool
    opened: bool = False
    lease: Lease | None = None
    cumulative: bool = False


class StreamHandler:
    """Serves StreamEvaluation calls for one coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.max_rows = coordinator.settings.max_chunk_rows
        self.telemetry = coordinator.telemetry
        config, max_message = coordinator.engine_config, coordinator.settings.max_message_bytes
        self.records_layout = records_wire.layout_for(config.inverse_temperatures, config.max_rank)
        self.records_max_rows = self.records_layout.max_rows(max_message)
        self.records_layout_pb = self.records_layout.to_pb(max_message)

    async def serve(
        self, requests: AsyncIterator[StreamRequest], peer: str, metadata: Any
    ) -> AsyncGenerator[Response, None]:
        """The call's answers; a protocol error ends it by raising (the servicer maps it)."""
        self.telemetry.active_streams.inc()
        stream = _Stream(metadata_cumulative=wants_cumulative_acks(metadata))
        answers: asyncio.Queue[asyncio.Future[Any] | None] = asyncio.Queue(maxsize=PIPELINE_DEPTH)
        reader = asyncio.ensure_future(self._read(requests, peer, stream, answers))
        try:
            ahead: asyncio.Future[Any] | _Nothing | None = NOTHING
            while True:
                answer = await answers.get() if isinstance(ahead, _Nothing) else ahead
                ahead = NOTHING
                if answer is None:
                    break
                result = await answer
                if not isinstance(result, ChunkOutcome):
                    yield result
                    continue
                if stream.cumulative and _plain(result):
                    # Later outcomes already settled supersede this one; the first that is not (or not
                    # yet) a plain outcome is kept for the next turn.
                    while not answers.empty():
                        ahead = answers.get_nowait()
                        if ahead is None or not _settled_plain(ahead):
                            break
                        result, ahead = ahead.result(), NOTHING
                yield _ack(result)
        finally:
            reader.cancel()
            if stream.lease is not None:
                self.coordinator.release(stream.lease)
            self.telemetry.active_streams.dec()

    async def _read(
        self,
        requests: AsyncIterator[StreamRequest],
        peer: str,
        stream: _Stream,
        answers: asyncio.Queue[asyncio.Future[Any] | None],
    ) -> None:
        """Turn each request into the future of its answer; a protocol error is the last answer.

        Requests arrive as ``wire.parse_stream_request`` made them: a plain chunk as a
        ``RawChunk`` and plain records as ``RawRecords``, read off the wire; anything else as a
        protobuf message, checked here for fields this server does not know.
        """
        loop = asyncio.get_running_loop()
        try:
            async for request in requests:
                raw: wire.RawChunk | None
                if isinstance(request, wire.RawChunk):
                    kind, raw = "chunk", request
                elif isinstance(request, wire.RawRecords):
                    kind, raw = "records", None
                else:
                    kind = request.WhichOneof("message")
                    unknown = unknown_fields(request)
                    if unknown:
                        raise InvalidArgument(
                            f"the request carries fields this server does not know ({', '.join(unknown)});"
                            " they would be silently ignored, so it is refused: drop them or upgrade the"
                            " server"
                        )
                    raw = wire.raw_chunk(request.chunk) if kind == "chunk" else None
                future: asyncio.Future[Any]
                if kind == "records":
                    assert not isinstance(request, wire.RawChunk)
                    records = request if isinstance(request, wire.RawRecords) else request.records
                    future = self._records(records, stream)
                elif raw is not None:
                    if stream.lease is None:
                        raise FailedPrecondition(
                            "the shard is closed; open a new stream"
                            if stream.opened
                            else "send OpenShard first"
                        )
                    lease = stream.lease
                    decode = functools.partial(decode_raw, raw, lease.num_classes, self.max_rows)
                    future = await self.coordinator.submit_chunk(lease, raw.sequence, decode)
                else:
                    assert isinstance(request, service_pb2.StreamEvaluationRequest)
                    future = loop.create_future()
                    future.set_result(await self._control(request, kind, peer, stream))
                await answers.put(future)
            await answers.put(None)
        except Exception as exc:
            failed = loop.create_future()
            failed.set_exception(exc)
            await answers.put(failed)

    def _records(
        self, msg: service_pb2.RecordsChunk | wire.RawRecords, stream: _Stream
    ) -> asyncio.Future[Any]:
        """A RecordsChunk: only on a shard opened with REDUCE_MODE_CLIENT (it got the layout)."""
        lease = stream.lease
        if lease is None:
            raise FailedPrecondition(
                "the shard is closed; open a new stream" if stream.opened else "send OpenShard first"
            )
        if lease.reduce != "client":
            raise FailedPrecondition(
                "this shard opened with the server reducing; send Chunk messages, or open the shard with "
                "reduce=REDUCE_MODE_CLIENT to send RecordsChunk"
            )
        decode = functools.partial(
            records_wire.receive, msg, self.records_layout, lease.num_classes, self.records_max_rows
        )
        return self.coordinator.submit_records(lease, msg.sequence, decode)

    async def _control(
        self, request: service_pb2.StreamEvaluationRequest, kind: str | None, peer: str, stream: _Stream
    ) -> Response:
        if kind == "open":
            if stream.opened:
                raise FailedPrecondition("this stream already opened a shard; use one stream per shard")
            stream.opened = True
            return await self._open(request.open, peer, stream)
        if kind == "close":
            if stream.lease is None:
                raise FailedPrecondition(
                    "the shard is already closed" if stream.opened else "send OpenShard before CloseShard"
                )
            closed = await self.coordinator.close(stream.lease, request.close.num_chunks)
            stream.lease = None
            return Response(
                closed=service_pb2.ShardSummary(
                    evaluation_id=closed.evaluation.evaluation_id,
                    rank=closed.shard.rank,
                    chunks=closed.shard.chunks,
                    samples=closed.shard.samples,
                    rejected_chunks=closed.shard.rejected,
                    ranks_closed=closed.evaluation.ranks_closed,
                    world_size=closed.evaluation.world_size,
                    finalized=closed.finalized,
                )
            )
        raise InvalidArgument("empty StreamEvaluationRequest: set open, chunk or close")

    async def _open(self, msg: service_pb2.OpenShard, peer: str, stream: _Stream) -> Response:
        if msg.score_kind not in wire.SCORE_KIND_NAMES:
            raise InvalidArgument(
                f"unknown score_kind {msg.score_kind}; use SCORE_KIND_LOGITS or LOG_PROBABILITIES"
            )
        if msg.ack_mode == service_pb2.ACK_MODE_UNSPECIFIED:
            stream.cumulative = stream.metadata_cumulative
        elif msg.ack_mode in _ACK_MODES:
            stream.cumulative = _ACK_MODES[msg.ack_mode]
        else:
            raise InvalidArgument(
                f"unknown ack_mode {msg.ack_mode}; use ACK_MODE_PER_CHUNK or ACK_MODE_CUMULATIVE"
            )
        request = ShardOpenRequest(
            key=evaluation_key(msg.key.run, msg.key.model, msg.key.split, msg.key.step),
            rank=msg.rank,
            world_size=msg.world_size,
            num_classes=msg.num_classes,
            score_kind=wire.SCORE_KIND_NAMES[msg.score_kind],
            dataset_size=msg.dataset_size,
            pin=msg.pin,
        )
        client_reduces = self._client_reduces(msg)
        opened = await self.coordinator.open(request, peer)
        stream.lease = opened.lease
        reply = service_pb2.ShardOpened(
            evaluation_id=opened.evaluation.evaluation_id,
            next_sequence=opened.shard.next_sequence,
            samples_committed=opened.shard.samples,
            already_closed=opened.already_closed,
        )
        if client_reduces:
            reply.records_layout.CopyFrom(self.records_layout_pb)
            if opened.lease is not None:
                opened.lease.reduce = "client"
        return Response(opened=reply)

    def _client_reduces(self, msg: service_pb2.OpenShard) -> bool:
        """Whether the client reduces; FAILED_PRECONDITION (before anything is sent) when its engine's
        records layout is not this server's."""
        if msg.reduce not in service_pb2.ReduceMode.values():
            raise InvalidArgument(
                f"unknown reduce mode {msg.reduce}; use REDUCE_MODE_SERVER or REDUCE_MODE_CLIENT"
            )
        if msg.reduce != service_pb2.REDUCE_MODE_CLIENT:
            return False
        ours = self.records_layout.version
        if msg.records_layout_version != ours:
            raise FailedPrecondition(
                f"the client's engine produces records layout version {msg.records_layout_version}, this "
                f"server reads layout version {ours}; use a client of the server's release, or reduce on "
                "the server (reduce='server')"
            )
        return True


def _ack(outcome: ChunkOutcome) -> Response:
    ack = service_pb2.ChunkAck(
        next_sequence=outcome.next_sequence,
        samples_committed=outcome.samples_committed,
        duplicate=outcome.duplicate,
    )
    if outcome.rejection is not None:
        r = outcome.rejection
        ack.rejection.CopyFrom(
            service_pb2.ChunkRejection(sequence=r.sequence, code=r.code, reason=r.reason, message=r.message)
        )
    return Response(ack=ack)


def unknown_fields(msg: Message, path: str = "") -> list[str]:
    """Fields of ``msg`` (and its sub-messages) this build does not know; proto3 keeps them unread."""
    here = path or msg.DESCRIPTOR.name
    fields = UnknownFieldSet(msg)
    out = [f"{here} field {fields[i].field_number}" for i in range(len(fields))]
    # Only sub-messages are visited: ListFields() would also read every bytes field, and protobuf
    # copies a bytes field on each read (a whole 1 MiB tensor payload per chunk).
    for fd in msg.DESCRIPTOR.fields:
        if fd.message_type is None:
            continue
        if fd.is_repeated:
            items = list(getattr(msg, fd.name))
        elif msg.HasField(fd.name):
            items = [getattr(msg, fd.name)]
        else:
            continue
        for item in items:
            if isinstance(item, Message):  # a map's keys are not messages
                out += unknown_fields(item, f"{here}.{fd.name}")
    return out
