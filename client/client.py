"""``EvalClient``: what a training job imports to stream scores and read results.

One client holds one gRPC channel; any number of evaluation streams (one per
rank and model) share it. Read calls (get/list/compare) retry on
``UNAVAILABLE`` so a server restart during a job is invisible to the caller.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import grpc

from evalstream import wire
from evalstream.client.errors import EvalStreamError, EvaluationTimeout
from evalstream.client.reduce import ReduceBackend, ReduceMode, choose_mode, layout_version
from evalstream.client.stream import EvaluationStream, OnRejection, StreamOptions
from evalstream.client.tensors import HostPool, PinnedPool
from evalstream.client.transport import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MIB,
    RetryPolicy,
    TLSConfig,
    call_with_retry,
    make_channel,
    token_metadata,
)
from evalstream.v1 import compare_pb2, evaluation_pb2, service_pb2, service_pb2_grpc

DEFAULT_TARGET = "localhost:50051"
# Longest wait one GetEvaluation asks for (a server cuts it to its max_wait_s); wait_for asks again.
LONG_POLL_S = 30.0
# A call held at least this long (or half its wait) was a long poll, not an answer at once.
HELD_S = 0.5
T = TypeVar("T")


class EvalClient:
    """A connection to an evalstream server, or to a set of replicas sharing one store.

    ``target``: ``"host:port"``; ``"dns:///name:port"`` (every address of the name, e.g. a headless
    Service, round-robin); or a list of ``"ip:port"`` replicas (round-robin).
    ``credentials``: ``None`` (plaintext), a ``TLSConfig`` with PEM paths (TLS
    or mutual TLS), or ready ``grpc.ChannelCredentials``. ``token``: sent as
    ``authorization: Bearer <token>`` on every call. ``timeout``: seconds per
    read call. ``max_message_bytes``: the largest message this client sends;
    keep it at or below the server's ``max_message_bytes``.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | TLSConfig | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        self.target = target if isinstance(target, str) else ",".join(target)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_message_bytes = max_message_bytes
        self._metadata: tuple[tuple[str, str], ...] = token_metadata(token) if token else ()
        self._channel = make_channel(target, credentials, max_message_bytes, builtins.list(channel_options))
        # Host and pinned buffers shared by this client's streams (see EvaluationStream).
        self._pools = (PinnedPool(), HostPool())
        self._stub = service_pb2_grpc.EvalStreamServiceStub(self._channel)

    def __enter__(self) -> EvalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; streams still open on it fail."""
        self._channel.close()

    # ------------------------------------------------------------- streaming

    def evaluation(
        self,
        *,
        run: str,
        model: str,
        num_classes: int,
        step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "",
        dataset_size: int = 0,
        score_kind: Literal["logits", "log_probabilities"] = "logits",
        pin: bool = False,
        chunk_bytes: int = MIB,
        max_buffer_bytes: int = 256 * MIB,
        max_inflight_chunks: int = 32,
        on_rejection: OnRejection = "raise",
        copy: bool = True,
        open_timeout: float | None = 60.0,
        reduce: ReduceMode = "auto",
        reduce_backend: ReduceBackend = "eager",
    ) -> EvaluationStream:
        """Open this rank's shard of an evaluation and return the stream to ``add()`` batches to.

        Every rank of a ``world_size``-rank job opens its own shard with the
        same run/model/split/step; the evaluation finalizes when all ranks
        have closed. ``chunk_bytes``: target size of one message (~1 MiB is
        fastest through gRPC Python). ``max_buffer_bytes``: host copies queued
        before ``add()`` blocks. ``max_inflight_chunks``: chunks sent and kept
        for replay until acknowledged. ``on_rejection``: ``"raise"`` raises
        ``ChunkRejectedError`` on the next ``add()``/``close()``; ``"collect"``
        only records them in ``stream.rejections``. ``copy=False`` lets host
        arrays already in a wire dtype be sent without a copy (do not modify
        them until ``close()``). Raises ``EvalStreamError`` if the server
        refuses the shard (e.g. world size or class count disagree).

        ``reduce``: where scores become per-sample records. ``"server"`` sends
        the scores; ``"client"`` runs the server's engine here, on the scores'
        own device, from the stream's sender thread, and sends compact per-sample records
        instead (see ``client/reduce.py``); ``"auto"`` (default) is "client"
        when CUDA is available, or with the compiled engine from 1,024
        classes, else "server" (``client.reduce.choose_mode``).
        ``reduce_backend``: the client engine's backend, ``"eager"`` (no
        compile), ``"compiled"`` (opt-in: ~2.7x faster on CPU, where it is one
        native loop built once per machine in under a second; TorchInductor
        compiles where that cannot be built and on CUDA; either on the sender
        thread, never in ``add()``) or ``"auto"`` (compiled where a C++
        compiler is found).
        """
        if chunk_bytes < 1 or max_buffer_bytes < 1 or max_inflight_chunks < 1:
            raise ValueError("chunk_bytes, max_buffer_bytes and max_inflight_chunks must be positive")
        if on_rejection not in ("raise", "collect"):
            raise ValueError(f'on_rejection must be "raise" or "collect", got {on_rejection!r}')
        if reduce_backend not in ("eager", "compiled", "auto"):
            raise ValueError(f'reduce_backend must be "eager", "compiled" or "auto", got {reduce_backend!r}')
        mode = choose_mode(reduce, num_classes, reduce_backend)
        key = evaluation_pb2.EvaluationKey(run=run, model=model, split=split, step=step)
        open_request = service_pb2.OpenShard(
            key=key,
            rank=rank,
            world_size=world_size,
            num_classes=num_classes,
            dataset_size=dataset_size,
            score_kind=wire.SCORE_KINDS[score_kind],
            pin=pin,
        )
        if mode == "client":
            open_request.reduce = service_pb2.REDUCE_MODE_CLIENT
            open_request.records_layout_version = layout_version()
        options = StreamOptions(
            chunk_bytes=chunk_bytes,
            max_message_bytes=self.max_message_bytes,
            max_buffer_bytes=max_buffer_bytes,
            max_inflight_chunks=max_inflight_chunks,
            on_rejection=on_rejection,
            copy=copy,
            retry=self.retry,
            open_timeout=open_timeout,
            reduce=mode,
            reduce_backend=reduce_backend,
        )
        return EvaluationStream(
            self._channel,
            open_request,
            self._metadata,
            options,
            waiter=lambda timeout: self.wait_for(run, model, step=step, split=split, timeout=timeout),
            get_evaluation=lambda: self.get(run, model, step=step, split=split),
            pools=self._pools,
        )

    # ----------------------------------------------------------------- reads

    def get(
        self,
        run: str,
        model: str,
        step: int | None = None,
        split: str = "",
        include_per_class: bool = False,
        wait: float = 0.0,
    ) -> evaluation_pb2.Evaluation:
        """One evaluation (the latest step when ``step`` is None), with its result once finalized.

        ``wait``: seconds the server may hold the call for the evaluation to be finalized (a long
        poll, cut to the server's ``max_wait_s``); it answers with the evaluation as it is then.
        """
        request = service_pb2.GetEvaluationRequest(
            ref=_ref(run, model, split, step), include_per_class=include_per_class
        )
        if wait > 0:
            request.wait.FromNanoseconds(int(wait * 1e9))
        return self._unary(
            "GetEvaluation", self._stub.GetEvaluation, request, self.timeout + wait if wait > 0 else None
        ).evaluation

    def list(
        self, run: str = "", model: str = "", split: str = "", limit: int | None = None
    ) -> builtins.list[evaluation_pb2.Evaluation]:
        """Evaluations matching the filters, newest first, following pages up to ``limit``."""
        out: builtins.list[evaluation_pb2.Evaluation] = []
        token = ""
        while True:
            page_size = 0 if limit is None else min(1000, limit - len(out))
            request = service_pb2.ListEvaluationsRequest(
                run=run, model=model, split=split, page_size=page_size, page_token=token
            )
            response = self._unary("ListEvaluations", self._stub.ListEvaluations, request)
            out.extend(response.evaluations)
            token = response.next_page_token
            if not token or (limit is not None and len(out) >= limit):
                return out if limit is None else out[:limit]

    def compare(
        self,
        run: str = "",
        models: Sequence[str] = (),
        *,
        candidates: Sequence[evaluation_pb2.EvaluationRef] = (),
        split: str = "",
        step: int | None = None,
        primary_metric: str = "",
        bootstrap_replicates: int = 0,
        confidence_level: float = 0.0,
        seed: int = 0,
        gate: compare_pb2.Gate | None = None,
        recommendation: str = "",
        timeout: float | None = None,
    ) -> service_pb2.CompareModelsResponse:
        """Compare models of a run (the latest step of each, or ``step``), or explicit ``candidates``.

        With neither ``models`` nor ``candidates``, the server compares the
        latest evaluation of every model of ``run``. Zero/empty options take
        the server's defaults. ``recommendation``: "off", "advisory" or "on"
        (docs/compare.md); empty takes the server's setting.
        """
        modes = {"": 0, "off": 1, "advisory": 2, "on": 3}
        if recommendation not in modes:
            raise ValueError(f'recommendation must be "off", "advisory" or "on", got {recommendation!r}')
        refs = builtins.list(candidates) + [_ref(run, m, split, step) for m in models]
        request = service_pb2.CompareModelsRequest(
            candidates=refs,
            run=run if not refs else "",
            split=split,
            primary_metric=primary_metric,
            bootstrap_replicates=bootstrap_replicates,
            confidence_level=confidence_level,
            seed=seed,
            gate=gate,
            recommendation=modes[recommendation],  # type: ignore[arg-type]
        )
        return self._unary(
            "CompareModels", self._stub.CompareModels, request, timeout or max(self.timeout, 120.0)
        )

    def finalize(self, run: str, model: str, step: int = 0, split: str = "") -> evaluation_pb2.Evaluation:
        """Finalize now from the ranks committed so far, without waiting for the others to close."""
        key = evaluation_pb2.EvaluationKey(run=run, model=model, split=split, step=step)
        request = service_pb2.FinalizeEvaluationRequest(key=key)
        return self._unary("FinalizeEvaluation", self._stub.FinalizeEvaluation, request).evaluation

    def pin(
        self, run: str, model: str, step: int = 0, split: str = "", pinned: bool = True
    ) -> evaluation_pb2.Evaluation:
        """Keep (or stop keeping) an evaluation's per-sample records past retention."""
        key = evaluation_pb2.EvaluationKey(run=run, model=model, split=split, step=step)
        request = service_pb2.PinEvaluationRequest(key=key, pinned=pinned)
        return self._unary("PinEvaluation", self._stub.PinEvaluation, request).evaluation

    def metrics(self) -> service_pb2.ListMetricsResponse:
        """Metric names the server computes, with their direction, and its default primary metric."""
        return self._unary("ListMetrics", self._stub.ListMetrics, service_pb2.ListMetricsRequest())

    def wait_for(
        self,
        run: str,
        model: str,
        step: int = 0,
        split: str = "",
        timeout: float | None = None,
        poll_s: float = 0.05,
    ) -> evaluation_pb2.Evaluation:
        """Wait until the evaluation is finalized; ``EvaluationTimeout`` after ``timeout`` seconds.

        Each call is a long poll (GetEvaluation with ``wait``): the server answers as soon as the
        evaluation is finalized on any replica, or after its ``max_wait_s`` with the evaluation
        still open, and this asks again with what is left of ``timeout``. A server that answers at
        once (one that predates long polls, or is shutting down) is polled instead, backing off
        from ``poll_s`` to 1 s. A not-yet-existing evaluation is waited for too (other ranks may
        not have opened their shards yet), by polling.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = poll_s
        last = "not found"
        while True:
            wait = LONG_POLL_S if deadline is None else min(LONG_POLL_S, deadline - time.monotonic())
            asked = time.monotonic()
            held = False
            try:
                evaluation = self.get(run, model, step=step, split=split, wait=max(wait, 0.0))
                if evaluation.state == evaluation_pb2.EVALUATION_STATE_FINALIZED:
                    return evaluation
                last = f"{evaluation.ranks_closed}/{evaluation.world_size} ranks closed"
                # Held for (most of) the wait: the server long-polls, so ask again at once.
                held = time.monotonic() - asked >= min(wait / 2, HELD_S)
            except EvalStreamError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
            pause = 0.0 if held else interval
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise EvaluationTimeout(
                    f"{run}/{model} step {step} not finalized within {timeout} s ({last})"
                )
            time.sleep(pause)
            interval = poll_s if held else min(1.0, interval * 1.5)

    def _unary(self, name: str, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        def once() -> T:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)

        try:
            return call_with_retry(once, self.retry)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise EvalStreamError(f"{name}: {code.name if code else 'ERROR'}: {details}", code) from exc


def _ref(run: str, model: str, split: str, step: int | None) -> evaluation_pb2.EvaluationRef:
    ref = evaluation_pb2.EvaluationRef(run=run, model=model, split=split)
    if step is not None:
        ref.step = step
    return ref
