"""EvaluationStream against a real server on loopback: dtypes, splitting, backpressure,
replay after a dropped connection or a server restart, rejections, waiting for the result."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from evalstream.client import ChunkRejectedError, EvalClient, EvalStreamError, EvaluationTimeout
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.v1 import evaluation_pb2
from tests.client.conftest import FAST_RETRY, NUM_CLASSES, engine_metrics, make_batches, small_settings
from tests.client.proxy import TcpProxy

FINALIZED = evaluation_pb2.EVALUATION_STATE_FINALIZED


def _stream_all(client: EvalClient, model: str, batches: list, **kwargs: object) -> evaluation_pb2.Evaluation:
    with client.evaluation(run="r", model=model, num_classes=NUM_CLASSES, **kwargs) as ev:  # type: ignore[arg-type]
        for scores, labels, ids in batches:
            ev.add(scores, labels, sample_ids=ids)
    assert ev.summary is not None and ev.summary.finalized
    return ev.result(timeout=30)


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda x: x, id="numpy-float32"),
        pytest.param(lambda x: x.astype(np.float16), id="numpy-float16"),
        pytest.param(lambda x: torch.from_numpy(x), id="torch-float32"),
        pytest.param(lambda x: torch.from_numpy(x).half(), id="torch-float16"),
        pytest.param(lambda x: torch.from_numpy(x).bfloat16(), id="torch-bfloat16"),
        pytest.param(lambda x: torch.from_numpy(x).double().requires_grad_(), id="torch-float64-grad"),
    ],
)
def test_add_numpy_and_torch_dtypes_match_the_engine(
    client: EvalClient, settings: Settings, convert: Callable[[np.ndarray], Any]
) -> None:
    batches = make_batches(3, 40)
    converted = []
    for scores, labels, ids in batches:
        x = convert(scores)
        converted.append((x, torch.from_numpy(labels) if isinstance(x, torch.Tensor) else labels, ids))
    result = _stream_all(client, "m", converted).result
    assert result.num_samples == 120
    # The engine in-process on what travels: 16-bit types as they are, float64 as float32.
    sent = [torch.as_tensor(c[0]).detach() for c in converted]
    scores_all = torch.cat([t.float() if t.dtype == torch.float64 else t for t in sent])
    expected = engine_metrics(settings, scores_all, np.concatenate([b[1] for b in batches]))
    for name in ("nll", "accuracy_top1", "accuracy_top5", "ece", "brier"):
        assert result.metrics[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


def test_add_copies_host_inputs_so_the_caller_may_reuse_its_buffer(
    client: EvalClient, settings: Settings
) -> None:
    batches = make_batches(4, 30)
    buffer = np.empty_like(batches[0][0])
    with client.evaluation(run="r", model="reuse", num_classes=NUM_CLASSES) as ev:
        for scores, labels, ids in batches:
            buffer[:] = scores
            ev.add(buffer, labels, ids)
            buffer[:] = np.nan  # would be rejected as non-finite if add() had kept a view
    result = ev.result(timeout=30).result
    expected = engine_metrics(
        settings, np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    )
    assert result.metrics["nll"] == pytest.approx(expected["nll"], rel=1e-6)


def test_large_batch_is_split_under_the_servers_message_limit(tmp_path: Path) -> None:
    # A 64 KiB server limit; one batch of 2,000 x 50 float32 is 400 KB.
    limit = 64 << 10
    settings = small_settings(tmp_path / "data", max_message_bytes=limit)
    scores, labels, ids = make_batches(1, 2000)[0]
    with BackgroundServer(settings) as srv, EvalClient(srv.target, max_message_bytes=limit) as client:
        with client.evaluation(run="r", model="m", num_classes=NUM_CLASSES, chunk_bytes=1 << 30) as ev:
            ev.add(scores, labels, ids)
        rows = (limit - 4096) // (NUM_CLASSES * 4 + 16)
        assert ev.summary is not None
        assert ev.summary.chunks == -(-2000 // rows)
        assert ev.summary.samples == 2000
        assert ev.result(timeout=30).result.num_samples == 2000


def test_chunk_bytes_sets_the_message_size(client: EvalClient) -> None:
    scores, labels, ids = make_batches(1, 1000)[0]
    with client.evaluation(run="r", model="m", num_classes=NUM_CLASSES, chunk_bytes=8 << 10) as ev:
        ev.add(scores, labels, ids)
    rows = (8 << 10) // (NUM_CLASSES * 4 + 16)
    assert ev.summary is not None and ev.summary.chunks == -(-1000 // rows)
    assert ev.stats.chunks_sent == ev.summary.chunks


def test_backpressure_blocks_add_while_the_connection_is_stalled(server: BackgroundServer) -> None:
    proxy = TcpProxy(server.target)
    batches = make_batches(12, 100)
    batch_bytes = batches[0][0].nbytes + batches[0][1].nbytes + batches[0][2].nbytes
    limit = 2 * batch_bytes
    try:
        with EvalClient(proxy.target, retry=FAST_RETRY) as client:
            ev = client.evaluation(
                run="r",
                model="bp",
                num_classes=NUM_CLASSES,
                chunk_bytes=4 << 10,
                max_inflight_chunks=4,
                max_buffer_bytes=limit,
            )
            proxy.pause()
            done = threading.Event()

            def produce() -> None:
                for scores, labels, ids in batches:
                    ev.add(scores, labels, ids)
                done.set()

            producer = threading.Thread(target=produce)
            producer.start()
            time.sleep(1.0)
            assert not done.is_set(), "add() kept accepting data while nothing could be sent"
            assert ev.stats.samples_added < 12 * 100
            assert ev.stats.max_queued_bytes <= limit
            proxy.resume()
            producer.join(timeout=30)
            assert done.is_set()
            summary = ev.close(timeout=30)
            assert summary.samples == 1200
            assert ev.stats.backpressure_waits >= 1
            assert ev.stats.max_queued_bytes <= limit
            assert ev.stats.max_inflight_chunks <= 4
    finally:
        proxy.close()


def test_unacknowledged_chunks_are_replayed_after_the_connection_drops(
    server: BackgroundServer, settings: Settings
) -> None:
    proxy = TcpProxy(server.target)
    batches = make_batches(8, 100)
    try:
        with EvalClient(proxy.target, retry=FAST_RETRY) as client:
            ev = client.evaluation(run="r", model="cut", num_classes=NUM_CLASSES, chunk_bytes=4 << 10)
            for scores, labels, _ in batches[:2]:
                ev.add(scores, labels)
            deadline = time.monotonic() + 30
            while ev.samples_committed < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            proxy.pause()  # what is sent now stays unacknowledged ...
            for scores, labels, _ in batches[2:5]:
                ev.add(scores, labels)
            time.sleep(0.3)
            proxy.cut()  # ... and is lost with the connection
            proxy.resume()
            for scores, labels, _ in batches[5:]:
                ev.add(scores, labels)
            summary = ev.close(timeout=60)
            evaluation = ev.result(timeout=30)
        assert ev.stats.reconnects >= 1
        assert ev.stats.replayed_chunks >= 1
        assert proxy.connections >= 2
        # No sample ids: a chunk counted twice (or lost) would change the count and the loss.
        assert summary.samples == 800
        assert evaluation.result.num_samples == 800
        expected = engine_metrics(
            settings, np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
        )
        assert evaluation.result.metrics["nll"] == pytest.approx(expected["nll"], rel=1e-6)
    finally:
        proxy.close()


def test_stream_resumes_after_a_server_restart_on_the_same_port(tmp_path: Path) -> None:
    settings = small_settings(tmp_path / "data")
    batches = make_batches(6, 100)
    first = BackgroundServer(settings).start()
    port = first.port
    restarted: BackgroundServer | None = None
    try:
        with EvalClient(first.target, retry=FAST_RETRY) as client:
            ev = client.evaluation(run="r", model="restart", num_classes=NUM_CLASSES, chunk_bytes=4 << 10)
            for scores, labels, _ in batches[:3]:
                ev.add(scores, labels)
            first.stop(grace=0.2)
            restarted = BackgroundServer(small_settings(tmp_path / "data", grpc_address=f"127.0.0.1:{port}"))
            restarted.start()
            for scores, labels, _ in batches[3:]:
                ev.add(scores, labels)
            summary = ev.close(timeout=60)
            result = ev.result(timeout=30).result
        assert ev.stats.reconnects >= 1
        assert summary.samples == 600 and result.num_samples == 600
        expected = engine_metrics(
            settings, np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
        )
        assert result.metrics["nll"] == pytest.approx(expected["nll"], rel=1e-6)
    finally:
        first.stop()
        if restarted is not None:
            restarted.stop()


def test_in_band_rejection_raises_on_the_next_call_and_changes_nothing(client: EvalClient) -> None:
    good = make_batches(3, 20)
    bad_labels = good[1][1].copy()
    bad_labels[5] = NUM_CLASSES + 7
    ev = client.evaluation(run="r", model="rej", num_classes=NUM_CLASSES)
    ev.add(good[0][0], good[0][1])
    ev.add(good[1][0], bad_labels)
    deadline = time.monotonic() + 30
    with pytest.raises(ChunkRejectedError) as raised:
        while time.monotonic() < deadline:  # the rejection surfaces once its ack arrived
            ev.add(good[2][0][:1], good[2][1][:1])
            time.sleep(0.05)
    assert raised.value.rejections[0].reason == "label_out_of_range"
    assert "label" in str(raised.value)
    summary = ev.close(timeout=30)  # reported once: close does not raise it again
    assert summary.rejected_chunks == 1
    evaluation = ev.result(timeout=30)
    # Everything added except the rejected chunk (the add() that raised queued nothing).
    assert evaluation.result.num_samples == summary.samples == ev.stats.samples_added - 20


def test_rejections_are_collected_when_asked(client: EvalClient) -> None:
    scores, labels, _ = make_batches(1, 20)[0]
    with client.evaluation(run="r", model="collect", num_classes=NUM_CLASSES, on_rejection="collect") as ev:
        ev.add(scores, labels)
        bad = scores.copy()
        bad[3, 4] = np.inf
        ev.add(bad, labels)
    assert [r.reason for r in ev.rejections] == ["non_finite"]
    assert ev.summary is not None and ev.summary.rejected_chunks == 1 and ev.summary.samples == 20


def test_rejection_arriving_before_close_is_raised_by_close_with_the_summary(client: EvalClient) -> None:
    scores, labels, _ = make_batches(1, 20)[0]
    ev = client.evaluation(run="r", model="late", num_classes=NUM_CLASSES)
    ev.add(scores, labels)
    bad = labels.copy()
    bad[0] = -1
    ev.add(scores, bad)
    with pytest.raises(ChunkRejectedError) as raised:
        ev.close(timeout=30)
    summary = raised.value.summary
    assert (
        summary is not None and summary.rejected_chunks == 1 and summary.samples == 20 and summary.finalized
    )


@pytest.mark.parametrize("reduce", ["server", "client"])
@pytest.mark.parametrize("on_rejection", ["raise", "collect"])
def test_close_after_every_chunk_was_rejected_leads_with_the_first_rejection(
    client: EvalClient, on_rejection: str, reduce: str
) -> None:
    """Nothing committed, so the server refuses to finalize; the error still names the bad label.

    With ``reduce="client"`` the client's engine refuses the batches before sending (no sequence
    number is consumed); they still count among the rejected chunks.
    """
    scores, labels, _ = make_batches(1, 8)[0]
    labels[4] = 99
    model = f"all-rejected-{on_rejection}-{reduce}"
    ev = client.evaluation(
        run="r",
        model=model,
        num_classes=NUM_CLASSES,
        on_rejection=on_rejection,  # type: ignore[arg-type]
        reduce=reduce,  # type: ignore[arg-type]
    )
    ev.add(scores, labels)  # one add: a second one could already raise the first rejection
    with pytest.raises(ChunkRejectedError) as raised:
        ev.close(timeout=30)
    message = str(raised.value)
    assert message.startswith("chunk 0 rejected: INVALID_ARGUMENT label_out_of_range: "), message
    assert message.index(f"labels[4] = 99 is outside [0, {NUM_CLASSES})") < message.index("close failed")
    assert "(1 of 1 chunks rejected)" in message and "nothing to finalize" in message, message
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert [r.reason for r in raised.value.rejections] == ["label_out_of_range"]
    # The server's side is what it was: the shard closed, the evaluation open with nothing committed.
    evaluation = client.get("r", model)
    assert evaluation.state != FINALIZED and evaluation.ranks_closed == 1
    assert not evaluation.HasField("result") or evaluation.result.num_samples == 0


def test_result_waits_for_every_rank_with_a_timeout(client: EvalClient) -> None:
    (s0, y0, i0), (s1, y1, i1) = make_batches(2, 50)
    rank0 = client.evaluation(run="r", model="ddp", num_classes=NUM_CLASSES, rank=0, world_size=2)
    rank1 = client.evaluation(run="r", model="ddp", num_classes=NUM_CLASSES, rank=1, world_size=2)
    rank0.add(s0, y0, i0)
    summary0 = rank0.close(timeout=30)
    assert summary0.ranks_closed == 1 and not summary0.finalized
    with pytest.raises(EvaluationTimeout, match="1/2 ranks closed"):
        rank0.result(timeout=0.5)
    rank1.add(s1, y1, i1)
    assert rank1.close(timeout=30).finalized
    merged = rank0.result(timeout=30)
    assert merged.state == FINALIZED and merged.result.num_samples == 100
    assert merged.ranks_closed == 2


def test_wait_for_an_evaluation_nobody_opened_times_out(client: EvalClient) -> None:
    started = time.monotonic()
    with pytest.raises(EvaluationTimeout, match="not found"):
        client.wait_for("nobody", "m", step=0, timeout=0.3)
    assert time.monotonic() - started < 5


def test_open_refused_by_the_server_raises_at_once(client: EvalClient) -> None:
    with client.evaluation(run="r", model="fixed", num_classes=NUM_CLASSES, world_size=2) as ev:
        ev.add(*make_batches(1, 10)[0])
    with pytest.raises(EvalStreamError) as raised:
        client.evaluation(run="r", model="fixed", num_classes=NUM_CLASSES + 1, rank=1, world_size=2)
    assert raised.value.code is not None and raised.value.code.name == "FAILED_PRECONDITION"


def test_exception_in_the_block_aborts_without_closing_the_shard(client: EvalClient) -> None:
    scores, labels, ids = make_batches(1, 30)[0]
    with (
        pytest.raises(RuntimeError),
        client.evaluation(run="r", model="abort", num_classes=NUM_CLASSES) as ev,
    ):
        ev.add(scores, labels, ids)
        raise RuntimeError("training step failed")
    assert ev.summary is None
    evaluation = client.get("r", "abort", step=0)
    assert evaluation.state == evaluation_pb2.EVALUATION_STATE_OPEN
    # A restarted rank re-sends the same data: committed chunks count as duplicates, then it closes.
    with client.evaluation(run="r", model="abort", num_classes=NUM_CLASSES) as again:
        again.add(scores, labels, ids)
    assert again.result(timeout=30).result.num_samples == 30


@pytest.mark.parametrize("reduce", ["server", "client"])
def test_bad_shapes_and_dtypes_fail_in_add_before_anything_is_sent(client: EvalClient, reduce: str) -> None:
    scores, labels, _ = make_batches(1, 10)[0]
    model = f"shapes-{reduce}"
    where = rf"^add\(\) to rank 1 of r/{model} step 3: argument "
    with client.evaluation(
        run="r",
        model=model,
        step=3,
        rank=1,
        world_size=2,
        num_classes=NUM_CLASSES,
        on_rejection="collect",
        reduce=reduce,  # type: ignore[arg-type]
    ) as ev:
        with pytest.raises(ValueError, match=where + rf"scores must have shape \[n, {NUM_CLASSES}\]"):
            ev.add(scores[:, :-1], labels)
        with pytest.raises(ValueError, match=where + r"labels must have shape \[10\]"):
            ev.add(scores, labels[:-1])
        with pytest.raises(TypeError, match=where + "labels must be an integer array, got float32"):
            ev.add(scores, labels.astype(np.float32))
        ev.add(scores, labels)
    assert ev.summary is not None and ev.summary.chunks == 1 and not ev.rejections
