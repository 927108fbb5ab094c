"""The gRPC servicer: translates ``evalstream.v1`` messages to ingest, store and compare calls.

No protocol rules live here (they are in ingest.py) and no status decisions (errors.py): every
handler is wrapped by :func:`rpc`, the one place a failure becomes its gRPC status and is counted
in telemetry. StreamEvaluation is served by ``streaming.StreamHandler``. Store reads run in the
coordinator's store executor so the event loop only ever waits, never blocks.

The method handlers are built from the service descriptor (:func:`add_to_server`), each request
read by its message class, except StreamEvaluation's, read by ``wire.parse_stream_request`` (plain
chunks without protobuf).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf.message_factory import GetMessageClass

from evalstream import wire
from evalstream.service.convert import evaluation_to_pb
from evalstream.service.engine import Records
from evalstream.service.engine.registry import direction, metric_infos
from evalstream.service.errors import FailedPrecondition, InvalidArgument, NotFound, status_of
from evalstream.service.ingest import DEFAULT_SPLIT, Coordinator, evaluation_key, validate_name
from evalstream.service.store.base import EvaluationRow
from evalstream.service.streaming import StreamHandler, StreamRequest
from evalstream.v1 import compare_pb2, evaluation_pb2, service_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")
H = TypeVar("H", bound=Callable[..., Any])
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = service_pb2.DESCRIPTOR.services_by_name["EvalStreamService"]
# Requests read by something other than their message class's parser.
DESERIALIZERS: dict[str, Callable[[bytes], Any]] = {"StreamEvaluation": wire.parse_stream_request}
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer: EvalStreamServicer) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per method of the service descriptor, of its streaming kind, bound to the
    servicer's method of the same name (a method the servicer lacks fails here, at start)."""
    handlers = {}
    for method in SERVICE.methods:
        request, response = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=DESERIALIZERS.get(method.name, request.FromString),
            response_serializer=response.SerializeToString,
        )
    return handlers


def add_to_server(servicer: EvalStreamServicer, server: Any) -> None:
    """Register the service on a ``grpc.aio.Server`` (typed Any: grpc-stubs lacks
    ``add_registered_method_handlers``, the registration gRPC's own generated code makes)."""
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def rpc(handler: H) -> H:
    """Map whatever a handler (unary, or an async generator of answers) raises to its gRPC status.

    A failure is logged when it is INTERNAL, counted by method and code, and set on the call; a
    unary handler then returns None, which gRPC sends as that status. The signature is kept, so
    the wrapped handler is typed as written.
    """
    name = handler.__name__

    async def fail(self: EvalStreamServicer, context: Context, exc: BaseException) -> None:
        code, message = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", name, exc_info=exc)
        self.telemetry.rpc_errors.labels(method=name, code=code.name).inc()
        context.set_code(code)
        context.set_details(message)

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def streaming(self: EvalStreamServicer, request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                # Closed now, not when collected: closing releases the stream's lease.
                async with contextlib.aclosing(handler(self, request, context)) as answers:
                    async for answer in answers:
                        yield answer
            except Exception as exc:
                await fail(self, context, exc)

        return cast(H, streaming)

    @functools.wraps(handler)
    async def unary(self: EvalStreamServicer, request: Any, context: Context) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            await fail(self, context, exc)
            return None

    return cast(H, unary)


class EvalStreamServicer:
    """The ``EvalStreamService`` methods, by the descriptor's names."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.settings = coordinator.settings
        self.store = coordinator.store
        self.telemetry = coordinator.telemetry
        self.streams = StreamHandler(coordinator)

    @rpc
    async def StreamEvaluation(
        self, requests: AsyncIterator[StreamRequest], context: Context
    ) -> AsyncIterator[service_pb2.StreamEvaluationResponse]:
        metadata = context.invocation_metadata()
        async with contextlib.aclosing(self.streams.serve(requests, context.peer(), metadata)) as answers:
            async for answer in answers:
                yield answer

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

    @rpc
    async def FinalizeEvaluation(
        self, request: service_pb2.FinalizeEvaluationRequest, context: Context
    ) -> service_pb2.FinalizeEvaluationResponse:
        k = request.key
        row = await self.coordinator.finalize_key(evaluation_key(k.run, k.model, k.split, k.step))
        return service_pb2.FinalizeEvaluationResponse(evaluation=evaluation_to_pb(row))

    @rpc
    async def GetEvaluation(
        self, request: service_pb2.GetEvaluationRequest, context: Context
    ) -> service_pb2.GetEvaluationResponse:
        ref = request.ref
        if request.wait.seconds < 0 or request.wait.nanos < 0:
            raise InvalidArgument("wait must not be negative; leave it unset to answer at once")
        row = await self._resolve(ref.run, ref.model, ref.split, ref.step if ref.HasField("step") else None)
        wait_s = min(request.wait.seconds + request.wait.nanos / 1e9, self.settings.max_wait_s)
        if wait_s > 0 and not row.finalized:
            row = await self._wait_finalized(row, wait_s)
        return service_pb2.GetEvaluationResponse(
            evaluation=evaluation_to_pb(row, per_class=request.include_per_class)
        )

    async def _wait_finalized(self, row: EvaluationRow, wait_s: float) -> EvaluationRow:
        """A long poll: the row once finalized, or as it is after ``wait_s`` (``finalizations.py``)."""
        with self.coordinator.waiters.watch(row.evaluation_id) as waiter:
            # Read again once registered: a finalize committed since the first read is seen here.
            latest = await self._io(self.store.get, row.evaluation_id)
            if latest is None or latest.finalized:
                return latest or row
            await waiter.wait(wait_s)
        return await self._io(self.store.get, row.evaluation_id) or row

    @rpc
    async def ListEvaluations(
        self, request: service_pb2.ListEvaluationsRequest, context: Context
    ) -> service_pb2.ListEvaluationsResponse:
        for what, value in (("run", request.run), ("model", request.model), ("split", request.split)):
            if value:
                validate_name(what, value)
        before = None
        if request.page_token:
            if not request.page_token.isdigit():
                raise InvalidArgument("page_token is not one this server issued; pass next_page_token as is")
            before = int(request.page_token)
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        rows, cursor = await self._io(
            self.store.list_evaluations, request.run, request.model, request.split, size, before
        )
        return service_pb2.ListEvaluationsResponse(
            evaluations=[evaluation_to_pb(r) for r in rows],
            next_page_token="" if cursor is None else str(cursor),
        )

    @rpc
    async def PinEvaluation(
        self, request: service_pb2.PinEvaluationRequest, context: Context
    ) -> service_pb2.PinEvaluationResponse:
        k = request.key
        key = evaluation_key(k.run, k.model, k.split, k.step)
        row = await self._resolve(key.run, key.model, key.split, key.step)
        row = await self._io(self.store.set_pinned, row.evaluation_id, request.pinned)
        return service_pb2.PinEvaluationResponse(evaluation=evaluation_to_pb(row))

    @rpc
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

    @rpc
    async def CompareModels(
        self, request: service_pb2.CompareModelsRequest, context: Context
    ) -> service_pb2.CompareModelsResponse:
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


def ref_to_args(ref: evaluation_pb2.EvaluationRef) -> tuple[str, str, str, int | None]:
    return ref.run, ref.model, ref.split or DEFAULT_SPLIT, ref.step if ref.HasField("step") else None


def check_metric(name: str, top_k: tuple[int, ...]) -> bool:
    """Direction of a metric that can rank models; INVALID_ARGUMENT listing the valid names otherwise."""
    try:
        return direction(name, top_k)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


__all__ = ["EvalStreamServicer", "add_to_server", "check_metric", "method_handlers", "ref_to_args", "rpc"]
