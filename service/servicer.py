"""The gRPC servicer: translates ``evalstream.v1`` messages to ingest, store and compare calls.

No protocol rules live here (they are in ingest.py) and no status decisions
(errors.py); every handler turns a ``ServiceError`` into its status and counts
it in telemetry. Store reads run in the coordinator's store executor so the
event loop only ever waits, never blocks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from evalstream.service import wire
from evalstream.service.convert import SCORE_KINDS, evaluation_to_pb
from evalstream.service.engine import Records
from evalstream.service.engine.registry import direction, metric_infos
from evalstream.service.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError, status_of
from evalstream.service.ingest import (
    DEFAULT_SPLIT,
    ChunkOutcome,
    Coordinator,
    Lease,
    evaluation_key,
    validate_name,
)
from evalstream.service.store.base import EvaluationRow, ShardOpenRequest
from evalstream.v1 import compare_pb2, evaluation_pb2, service_pb2, service_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_PAGE_SIZE = 50
# Answers of one stream waiting to be sent. Chunks are copied into the stream's staging blocks as they
# arrive (which bound its memory), so this only needs to exceed the chunks of two blocks.
PIPELINE_DEPTH = 256
MAX_PAGE_SIZE = 1000
Context = grpc.aio.ServicerContext[Any, Any]


# Metadata a client sends to accept one acknowledgement for several chunks (see StreamEvaluation).
ACKS_METADATA = ("evalstream-acks", "cumulative")
StreamRequest = service_pb2.StreamEvaluationRequest | wire.RawChunk


class _Nothing:
    """No answer taken ahead (None is the end of the answers)."""


NOTHING = _Nothing()


def wants_cumulative_acks(metadata: Any) -> bool:
    return any(tuple(item) == ACKS_METADATA for item in metadata or ())


def _plain(outcome: ChunkOutcome) -> bool:
    return outcome.rejection is None and not outcome.duplicate


def _settled_plain(fut: asyncio.Future[Any]) -> bool:
    """A future already holding a plain chunk outcome (an acknowledgement another one may cover)."""
    if not fut.done() or fut.cancelled() or fut.exception() is not None:
        return False
    result = fut.result()
    return isinstance(result, ChunkOutcome) and _plain(result)


def add_to_server(servicer: EvalStreamServicer, server: Any) -> None:
    """Register the service as the generated code does, with StreamEvaluation's requests read by
    ``wire.parse_stream_request`` (plain chunks without protobuf) instead of protobuf's parser."""
    captured = _Handlers()
    service_pb2_grpc.add_EvalStreamServiceServicer_to_server(servicer, captured)
    handlers = dict(captured.handlers)
    handlers["StreamEvaluation"] = grpc.stream_stream_rpc_method_handler(
        servicer.StreamEvaluation,
        request_deserializer=wire.parse_stream_request,
        response_serializer=service_pb2.StreamEvaluationResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))
    server.add_registered_method_handlers(captured.service, handlers)


class _Handlers:
    """Stands in for a server to capture the generated registration's method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


@dataclass
class _Stream:
    """What one StreamEvaluation call has opened."""

    opened: bool = False
    lease: Lease | None = None


class EvalStreamServicer(service_pb2_grpc.EvalStreamServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.settings = coordinator.settings
        self.store = coordinator.store
        self.telemetry = coordinator.telemetry

    async def _fail(self, context: Context, method: str, exc: BaseException) -> None:
        code, message = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method, exc_info=exc)
        self.telemetry.rpc_errors.labels(method=method, code=code.name).inc()
        context.set_code(code)
        context.set_details(message)

    async def _unary(self, context: Context, method: str, fn: Callable[[], Any]) -> Any:
        try:
            return await fn()
        except Exception as exc:
            await self._fail(context, method, exc)
            return None

    # -- streaming ----------------------------------------------------------------------------

    async def StreamEvaluation(
        self, request_iterator: AsyncIterator[StreamRequest], context: Context
    ) -> AsyncIterator[service_pb2.StreamEvaluationResponse]:
        """Reading and answering run apart, so the next chunks are received and reduced while
        earlier ones commit; answers go out in request order.

        A client that sends the ``evalstream-acks: cumulative`` metadata gets one acknowledgement
        for a run of plain chunk outcomes that are ready together (a staging block's chunks commit
        at once): its ``next_sequence`` covers them all, as the contract's "highest sequence
        durably committed" allows. Rejections and duplicates are always answered one by one, and
        a client that does not ask gets one acknowledgement per chunk.
        """
        self.telemetry.active_streams.inc()
        stream = _Stream()
        cumulative = wants_cumulative_acks(context.invocation_metadata())
        answers: asyncio.Queue[asyncio.Future[Any] | None] = asyncio.Queue(maxsize=PIPELINE_DEPTH)
        reader = asyncio.ensure_future(self._read(request_iterator, context.peer(), stream, answers))
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
                if cumulative and _plain(result):
                    # Later outcomes already settled supersede this one; the first that is not (or not
                    # yet) a plain outcome is kept for the next turn.
                    while not answers.empty():
                        ahead = answers.get_nowait()
                        if ahead is None or not _settled_plain(ahead):
                            break
                        result, ahead = ahead.result(), NOTHING
                yield self._ack(result)
        except Exception as exc:
            await self._fail(context, "StreamEvaluation", exc)
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
        ``RawChunk`` read off the wire, anything else as a protobuf message, checked here for
        fields this server does not know.
        """
        loop = asyncio.get_running_loop()
        max_rows = self.settings.max_chunk_rows
        try:
            async for request in requests:
                raw: wire.RawChunk | None
                if isinstance(request, wire.RawChunk):
                    kind, raw = "chunk", request
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
                if raw is not None:
                    if stream.lease is None:
                        raise FailedPrecondition(
                            "the shard is closed; open a new stream"
                            if stream.opened
                            else "send OpenShard first"
                        )
                    lease = stream.lease
                    decode = functools.partial(wire.decode_raw, raw, lease.num_classes, max_rows)
                    future: asyncio.Future[Any] = await self.coordinator.submit_chunk(
                        lease, raw.sequence, decode
                    )
                else:
                    assert not isinstance(request, wire.RawChunk)
                    future = loop.create_future()
                    future.set_result(await self._control(request, kind, peer, stream))
                await answers.put(future)
            await answers.put(None)
        except Exception as exc:
            failed = loop.create_future()
            failed.set_exception(exc)
            await answers.put(failed)

    async def _control(
        self, request: service_pb2.StreamEvaluationRequest, kind: str | None, peer: str, stream: _Stream
    ) -> service_pb2.StreamEvaluationResponse:
        if kind == "open":
            if stream.opened:
                raise FailedPrecondition("this stream already opened a shard; use one stream per shard")
            stream.opened = True
            stream.lease, response = await self._open(request.open, peer)
            return response
        if kind == "close":
            if stream.lease is None:
                raise FailedPrecondition(
                    "the shard is already closed" if stream.opened else "send OpenShard before CloseShard"
                )
            closed = await self.coordinator.close(stream.lease, request.close.num_chunks)
            stream.lease = None
            return service_pb2.StreamEvaluationResponse(
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

    async def _open(
        self, msg: service_pb2.OpenShard, peer: str
    ) -> tuple[Lease | None, service_pb2.StreamEvaluationResponse]:
        if msg.score_kind not in SCORE_KINDS:
            raise InvalidArgument(
                f"unknown score_kind {msg.score_kind}; use SCORE_KIND_LOGITS or LOG_PROBABILITIES"
            )
        request = ShardOpenRequest(
            key=evaluation_key(msg.key.run, msg.key.model, msg.key.split, msg.key.step),
            rank=msg.rank,
            world_size=msg.world_size,
            num_classes=msg.num_classes,
            score_kind=SCORE_KINDS[msg.score_kind],
            dataset_size=msg.dataset_size,
            pin=msg.pin,
        )
        opened = await self.coordinator.open(request, peer)
        return opened.lease, service_pb2.StreamEvaluationResponse(
            opened=service_pb2.ShardOpened(
                evaluation_id=opened.evaluation.evaluation_id,
                next_sequence=opened.shard.next_sequence,
                samples_committed=opened.shard.samples,
                already_closed=opened.already_closed,
            )
        )

    @staticmethod
    def _ack(outcome: ChunkOutcome) -> service_pb2.StreamEvaluationResponse:
        ack = service_pb2.ChunkAck(
            next_sequence=outcome.next_sequence,
            samples_committed=outcome.samples_committed,
            duplicate=outcome.duplicate,
        )
        if outcome.rejection is not None:
            r = outcome.rejection
            ack.rejection.CopyFrom(
                service_pb2.ChunkRejection(
                    sequence=r.sequence, code=r.code, reason=r.reason, message=r.message
                )
            )
        return service_pb2.StreamEvaluationResponse(ack=ack)

    # -- unary --------------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.coordinator._in_io(fn, *args)

    async def _resolve(self, run: str, model: str, split: str, step: int | None) -> EvaluationRow:
        split = split or DEFAULT_SPLIT
        for what, value in (("run", run), ("model", model), ("split", split)):
            validate_name(what, value)
        row = await self._io(self.store.find, run, model, split, step)
        if row is None:
            at = "latest step" if step is None else f"step {step}"
            raise NotFound(f"no evaluation {run}/{model}/{split} at {at}")
        return row

    async def FinalizeEvaluation(
        self, request: service_pb2.FinalizeEvaluationRequest, context: Context
    ) -> service_pb2.FinalizeEvaluationResponse:
        async def run() -> service_pb2.FinalizeEvaluationResponse:
            k = request.key
            row = await self.coordinator.finalize_key(evaluation_key(k.run, k.model, k.split, k.step))
            return service_pb2.FinalizeEvaluationResponse(evaluation=evaluation_to_pb(row))

        return await self._unary(context, "FinalizeEvaluation", run)  # type: ignore[no-any-return]

    async def GetEvaluation(
        self, request: service_pb2.GetEvaluationRequest, context: Context
    ) -> service_pb2.GetEvaluationResponse:
        async def run() -> service_pb2.GetEvaluationResponse:
            ref = request.ref
            row = await self._resolve(
                ref.run, ref.model, ref.split, ref.step if ref.HasField("step") else None
            )
            return service_pb2.GetEvaluationResponse(
                evaluation=evaluation_to_pb(row, per_class=request.include_per_class)
            )

        return await self._unary(context, "GetEvaluation", run)  # type: ignore[no-any-return]

    async def ListEvaluations(
        self, request: service_pb2.ListEvaluationsRequest, context: Context
    ) -> service_pb2.ListEvaluationsResponse:
        async def run() -> service_pb2.ListEvaluationsResponse:
            for what, value in (("run", request.run), ("model", request.model), ("split", request.split)):
                if value:
                    validate_name(what, value)
            before = None
            if request.page_token:
                if not request.page_token.isdigit():
                    raise InvalidArgument(
                        "page_token is not one this server issued; pass next_page_token as is"
                    )
                before = int(request.page_token)
            size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            rows, cursor = await self._io(
                self.store.list_evaluations, request.run, request.model, request.split, size, before
            )
            return service_pb2.ListEvaluationsResponse(
                evaluations=[evaluation_to_pb(r) for r in rows],
                next_page_token="" if cursor is None else str(cursor),
            )

        return await self._unary(context, "ListEvaluations", run)  # type: ignore[no-any-return]

    async def PinEvaluation(
        self, request: service_pb2.PinEvaluationRequest, context: Context
    ) -> service_pb2.PinEvaluationResponse:
        async def run() -> service_pb2.PinEvaluationResponse:
            k = request.key
            key = evaluation_key(k.run, k.model, k.split, k.step)
            row = await self._resolve(key.run, key.model, key.split, key.step)
            row = await self._io(
                self.store.set_pinned, row.evaluation_id, request.pinned, self.settings.retention_keep_latest
            )
            return service_pb2.PinEvaluationResponse(evaluation=evaluation_to_pb(row))

        return await self._unary(context, "PinEvaluation", run)  # type: ignore[no-any-return]

    async def ListMetrics(
        self, request: service_pb2.ListMetricsRequest, context: Context
    ) -> service_pb2.ListMetricsResponse:
        infos = metric_infos(self.settings.top_k)
        response = service_pb2.ListMetricsResponse(default_primary_metric=self.settings.primary_metric)
        for info in infos.values():
            m = response.metrics.add(name=info.name, description=info.description)
            if info.higher_is_better is not None:
                m.higher_is_better = info.higher_is_better
        return response

    async def CompareModels(
        self, request: service_pb2.CompareModelsRequest, context: Context
    ) -> service_pb2.CompareModelsResponse:
        async def run() -> service_pb2.CompareModelsResponse:
            return await self._compare(request)

        return await self._unary(context, "CompareModels", run)  # type: ignore[no-any-return]

    async def _compare(self, request: service_pb2.CompareModelsRequest) -> service_pb2.CompareModelsResponse:
        """Resolve the refs (or every model of a run at its latest step) and hand them to service/compare."""
        from evalstream.service.compare import CompareOptions, compare_models

        primary = request.primary_metric or self.settings.primary_metric
        check_metric(primary, self.settings.top_k)
        if request.candidates:
            rows = [await self._resolve(*ref_to_args(ref)) for ref in request.candidates]
        elif request.run:
            validate_name("run", request.run)
            split = validate_name("split", request.split or DEFAULT_SPLIT)
            rows = await self._io(self.store.latest_per_model, request.run, split)
            if not rows:
                raise NotFound(f"run {request.run} has no finalized evaluation on split {split}")
        else:
            raise InvalidArgument("set candidates, or run (and split) to compare every model of the run")
        baseline = None
        if request.HasField("gate") and request.gate.HasField("baseline"):
            baseline = await self._candidate(await self._resolve(*ref_to_args(request.gate.baseline)))
        candidates = [await self._candidate(row) for row in rows]
        options = CompareOptions(
            primary_metric=primary,
            secondary_metric=self.settings.secondary_metric,
            tie_tolerance=self.settings.compare_tie_tolerance,
            replicates=request.bootstrap_replicates or self.settings.compare_bootstrap_replicates,
            confidence_level=request.confidence_level or self.settings.compare_confidence_level,
            seed=request.seed,
            top_k=self.settings.top_k,
            gate=request.gate if request.HasField("gate") else None,
            engine_config=self.coordinator.engine_config,
            recommendation=RECOMMENDATION_MODES.get(
                request.recommendation, self.settings.compare_recommendation
            ),
        )
        return await self.coordinator._in_worker(compare_models, candidates, options, baseline)

    async def _candidate(self, row: EvaluationRow) -> Any:
        from evalstream.service.compare import CandidateInput

        k = row.key
        if not row.finalized or row.result is None:
            raise FailedPrecondition(f"evaluation {k.run}/{k.model}/{k.split}@{k.step} is not finalized yet")
        result = evaluation_pb2.EvaluationResult.FromString(row.result)
        blob = await self._io(self.store.final_records, row.evaluation_id)
        records = None if blob is None else await self._io(Records.from_bytes, blob)
        return CandidateInput(
            run=k.run,
            model=k.model,
            split=k.split,
            step=k.step,
            evaluation_id=row.evaluation_id,
            num_classes=row.num_classes,
            metrics=dict(result.metrics),
            records=records,
        )


# CompareModelsRequest.recommendation -> CompareOptions.recommendation (UNSPECIFIED: the setting).
RECOMMENDATION_MODES = {
    compare_pb2.RECOMMENDATION_MODE_OFF: "off",
    compare_pb2.RECOMMENDATION_MODE_ADVISORY: "advisory",
    compare_pb2.RECOMMENDATION_MODE_ON: "on",
}


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


def ref_to_args(ref: evaluation_pb2.EvaluationRef) -> tuple[str, str, str, int | None]:
    return ref.run, ref.model, ref.split or DEFAULT_SPLIT, ref.step if ref.HasField("step") else None


def check_metric(name: str, top_k: tuple[int, ...]) -> bool:
    """Direction of a metric that can rank models; INVALID_ARGUMENT listing the valid names otherwise."""
    try:
        return direction(name, top_k)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


__all__ = [
    "ACKS_METADATA",
    "EvalStreamServicer",
    "ServiceError",
    "add_to_server",
    "check_metric",
    "ref_to_args",
]
