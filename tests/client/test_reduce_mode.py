"""reduce="client": the client runs the server's engine and streams records, against a real server.

The records a client makes are bit-identical to the server's for the same backend, dtype and device;
ranks reducing on either side merge exactly (DDP padding duplicates dropped once); records travel
with the sequence numbers, replay and resume of chunks of scores; a batch the client's engine
refuses is reported like a server rejection; the auto rule; the byte counters split by mode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import pytest
import torch

from evalstream.client import ChunkRejectedError, EvalClient, EvalStreamError
from evalstream.client.reduce import AUTO_CLIENT_MIN_CLASSES, ClientEngine, choose_mode
from evalstream.service.engine import Records
from evalstream.service.engine.records import FIELDS
from evalstream.service.records_wire import LAYOUT_VERSION, layout_for
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.v1 import evaluation_pb2
from tests.client.conftest import FAST_RETRY, NUM_CLASSES, make_batches, small_settings
from tests.client.proxy import TcpProxy
from tests.engine import reference

Batches = list[tuple[Any, Any, Any]]


def _stream(client: EvalClient, model: str, batches: Batches, **kwargs: Any) -> evaluation_pb2.Evaluation:
    with client.evaluation(run="r", model=model, num_classes=NUM_CLASSES, **kwargs) as ev:
        for scores, labels, ids in batches:
            ev.add(scores, labels, sample_ids=ids)
    return ev.result(timeout=60)


def _stored_records(server: BackgroundServer, evaluation: evaluation_pb2.Evaluation) -> Records:
    assert server.server is not None
    blob = server.server.store.final_records(evaluation.evaluation_id)
    assert blob is not None
    return Records.from_bytes(blob)


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda x: x, id="numpy-float32"),
        pytest.param(lambda x: x.astype(np.float16), id="numpy-float16"),
        pytest.param(lambda x: torch.from_numpy(x).bfloat16(), id="torch-bfloat16"),
    ],
)
def test_client_records_are_bit_identical_to_the_servers(
    server: BackgroundServer, client: EvalClient, convert: Callable[[np.ndarray], Any]
) -> None:
    batches = [(convert(s), y, ids) for s, y, ids in make_batches(4, 150)]
    by_server = _stream(client, "by-server", batches, reduce="server")
    by_client = _stream(client, "by-client", batches, reduce="client")
    ours, theirs = _stored_records(server, by_client), _stored_records(server, by_server)
    assert len(ours) == 600
    for name in FIELDS:
        assert getattr(ours, name).tobytes() == getattr(theirs, name).tobytes(), name
    assert by_client.result == by_server.result  # every metric, bit for bit


def test_log_probabilities_are_reduced_alike_on_either_side(
    server: BackgroundServer, client: EvalClient
) -> None:
    batches = []
    for s, y, ids in make_batches(2, 100, seed=3):
        z = torch.from_numpy(s)
        batches.append((torch.log_softmax(z, dim=1), y, ids))
    kind = {"score_kind": "log_probabilities"}
    by_server = _stream(client, "lp-server", batches, reduce="server", **kind)
    by_client = _stream(client, "lp-client", batches, reduce="client", **kind)
    ours, theirs = _stored_records(server, by_client), _stored_records(server, by_server)
    for name in FIELDS:
        assert getattr(ours, name).tobytes() == getattr(theirs, name).tobytes(), name
    assert by_client.result == by_server.result


def _ddp_shards(n: int, world: int) -> list[np.ndarray]:
    """DistributedSampler without shuffling: pad to a multiple of the world by repeating the first
    indices, then rank r takes every world-th index from r."""
    padded = np.concatenate([np.arange(n), np.arange((-n) % world)])
    return [padded[r::world] for r in range(world)]


def test_four_ranks_two_each_way_with_ddp_padding_equal_the_float64_reference(
    server: BackgroundServer, client: EvalClient, settings: Settings
) -> None:
    n, world = 202, 4  # padded to 204: two samples appear twice
    ((scores, labels, _),) = make_batches(1, n, seed=7)
    modes: list[Literal["client", "server"]] = ["client", "client", "server", "server"]

    def rank(r: int, model: str, mode: Literal["client", "server"]) -> None:
        idx = _ddp_shards(n, world)[r]
        with client.evaluation(
            run="r", model=model, num_classes=NUM_CLASSES, rank=r, world_size=world, reduce=mode
        ) as ev:
            for part in np.array_split(idx, 2):
                ev.add(scores[part], labels[part], sample_ids=part)

    results = {}
    for model, per_rank in (("mixed", modes), ("all-server", ["server"] * world)):
        threads = [threading.Thread(target=rank, args=(r, model, m)) for r, m in enumerate(per_rank)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        results[model] = client.wait_for("r", model, timeout=60).result
    mixed = results["mixed"]
    assert (mixed.num_samples, mixed.duplicates_dropped) == (n, 2)
    for name, value in results["all-server"].metrics.items():
        assert mixed.metrics[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    exp = reference.per_sample(scores, labels, np.asarray(settings.engine_config().inverse_temperatures))
    assert mixed.metrics["nll"] == pytest.approx(exp["nll"].mean(), rel=1e-6)
    assert mixed.metrics["accuracy_top1"] == pytest.approx((exp["rank"] == 0).mean(), rel=1e-12)
    assert mixed.metrics["brier"] == pytest.approx(exp["brier"].mean(), rel=1e-6)


def test_a_layout_the_client_cannot_produce_fails_before_anything_is_sent() -> None:
    layout = layout_for((0.5, 1.0, 2.0), 65535).to_pb(4 << 20)
    layout.version = LAYOUT_VERSION + 1
    with pytest.raises(EvalStreamError) as raised:
        ClientEngine.from_reply(layout, NUM_CLASSES, "logits", "eager", 1 << 20, 4 << 20)
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"version {LAYOUT_VERSION + 1}" in str(raised.value)
    assert f"produces version {LAYOUT_VERSION}" in str(raised.value)


def test_the_client_reduces_with_the_servers_temperature_grid(tmp_path: Path) -> None:
    settings = small_settings(tmp_path / "data", inverse_temperatures=(0.5, 1.0, 3.0))
    batches = make_batches(2, 60)
    with BackgroundServer(settings) as srv, EvalClient(srv.target) as c:
        evaluation = _stream(c, "grid", batches, reduce="client")
        records = _stored_records(srv, evaluation)
    assert records.nll_t.shape == (120, 3)
    assert list(records.inverse_temperatures) == [0.5, 1.0, 3.0]


def test_records_are_replayed_after_the_connection_drops(server: BackgroundServer) -> None:
    proxy = TcpProxy(server.target)
    batches = make_batches(8, 100)
    record_bytes = layout_for((1.0,), 1).record_bytes  # any grid: the message size is what matters
    try:
        with EvalClient(proxy.target, retry=FAST_RETRY) as client:
            ev = client.evaluation(
                run="r", model="cut", num_classes=NUM_CLASSES, reduce="client", chunk_bytes=30 * record_bytes
            )
            for scores, labels, _ in batches[:2]:
                ev.add(scores, labels)
            deadline = time.monotonic() + 30
            while ev.samples_committed < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            proxy.pause()
            for scores, labels, _ in batches[2:5]:
                ev.add(scores, labels)
            time.sleep(0.3)
            proxy.cut()
            proxy.resume()
            for scores, labels, _ in batches[5:]:
                ev.add(scores, labels)
            summary = ev.close(timeout=60)
            evaluation = ev.result(timeout=30)
        assert ev.stats.reconnects >= 1 and ev.stats.replayed_chunks >= 1
        # No sample ids: a message counted twice (or lost) would change the count.
        assert summary.samples == evaluation.result.num_samples == 800
    finally:
        proxy.close()


def test_records_stream_resumes_after_a_server_restart(tmp_path: Path) -> None:
    settings = small_settings(tmp_path / "data")
    batches = make_batches(6, 100)
    first = BackgroundServer(settings).start()
    restarted: BackgroundServer | None = None
    try:
        with EvalClient(first.target, retry=FAST_RETRY) as client:
            ev = client.evaluation(
                run="r", model="restart", num_classes=NUM_CLASSES, reduce="client", chunk_bytes=2000
            )
            for scores, labels, ids in batches[:3]:
                ev.add(scores, labels, sample_ids=ids)
            first.stop(grace=0.2)
            address = f"127.0.0.1:{first.port}"
            restarted = BackgroundServer(small_settings(tmp_path / "data", grpc_address=address)).start()
            for scores, labels, ids in batches[3:]:
                ev.add(scores, labels, sample_ids=ids)
            summary = ev.close(timeout=60)
            result = ev.result(timeout=30).result
        assert ev.stats.reconnects >= 1
        assert summary.samples == result.num_samples == 600
        assert result.duplicates_dropped == 0
    finally:
        first.stop()
        if restarted is not None:
            restarted.stop()


def test_a_batch_the_client_engine_refuses_is_reported_like_a_rejection(client: EvalClient) -> None:
    good = make_batches(3, 20)
    bad = good[1][0].copy()
    bad[4, 2] = np.nan
    ev = client.evaluation(run="r", model="nan", num_classes=NUM_CLASSES, reduce="client")
    ev.add(good[0][0], good[0][1])
    ev.add(bad, good[1][1])
    deadline = time.monotonic() + 30
    with pytest.raises(ChunkRejectedError) as raised:
        while time.monotonic() < deadline:
            ev.add(good[2][0][:1], good[2][1][:1])
            time.sleep(0.05)
    rejection = raised.value.rejections[0]
    assert rejection.reason == "non_finite" and "scores[4, 2]" in rejection.message
    assert "client's engine" in rejection.message
    summary = ev.close(timeout=30)
    assert ev.result(timeout=30).result.num_samples == summary.samples == ev.stats.samples_added - 20


def test_auto_reduces_on_the_client_with_cuda_or_the_compiled_engine(client: EvalClient) -> None:
    cuda = torch.cuda.is_available()
    many = AUTO_CLIENT_MIN_CLASSES
    assert choose_mode("auto", many, "compiled") == "client"
    assert choose_mode("auto", many - 1, "compiled") == ("client" if cuda else "server")
    assert choose_mode("auto", many, "eager") == ("client" if cuda else "server")
    assert choose_mode("server", 1 << 17, "compiled") == "server" and choose_mode("client", 2) == "client"
    with pytest.raises(ValueError, match="reduce must be"):
        choose_mode("device", 10)
    scores = np.random.default_rng(0).standard_normal((5, many)).astype(np.float32)
    with client.evaluation(run="r", model="auto", num_classes=many) as ev:  # auto, the eager engine
        ev.add(scores, np.arange(5))
    assert ev.reduce_mode == ("client" if cuda else "server")
    assert ev.result(timeout=30).result.num_samples == 5


def test_ingest_bytes_are_counted_by_mode(server: BackgroundServer, client: EvalClient) -> None:
    assert server.server is not None
    registry = server.server.telemetry.registry

    def counted(mode: str) -> float:
        return registry.get_sample_value("evalstream_ingest_mode_bytes_total", {"mode": mode}) or 0.0

    assert counted("client") == counted("server") == 0.0
    batches = make_batches(2, 50)
    _stream(client, "bytes-client", batches, reduce="client")
    record_bytes = layout_for(server.settings.engine_config().inverse_temperatures, 1).record_bytes
    assert counted("client") == 100 * record_bytes
    assert registry.get_sample_value("evalstream_ingest_bytes_total") == 0.0  # score bytes only
    _stream(client, "bytes-server", batches, reduce="server")
    assert counted("server") == 100 * NUM_CLASSES * 4
    assert counted("client") == 100 * record_bytes


def test_records_mode_shows_in_the_progress_of_open_shards(
    server: BackgroundServer, client: EvalClient
) -> None:
    assert server.server is not None
    ((scores, labels, ids),) = make_batches(1, 40)
    ev = client.evaluation(run="r", model="progress", num_classes=NUM_CLASSES, reduce="client")
    ev.add(scores, labels, sample_ids=ids)
    deadline = time.monotonic() + 30
    while ev.samples_committed < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    shards = [p for p in server.server.coordinator.open_progress() if p.key.model == "progress"]
    assert [(p.rank, p.samples) for p in shards] == [(0, 40)]
    nll = reference.per_sample(scores, labels, np.array([1.0]))["nll"]
    assert shards[0].nll_sum == pytest.approx(nll.sum(), rel=1e-5)
    ev.close(timeout=30)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: the CUDA records path (reduction on a side stream after "
    "the caller's event; add() never synchronizing) is not exercised here",
)
def test_cuda_scores_are_reduced_on_the_device_without_add_synchronizing(
    server: BackgroundServer, client: EvalClient
) -> None:
    batches = make_batches(4, 256)
    device_batches = [(torch.from_numpy(s).cuda(), torch.from_numpy(y).cuda(), ids) for s, y, ids in batches]
    with client.evaluation(run="r", model="cuda", num_classes=NUM_CLASSES, reduce="client") as ev:
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing call on this thread raises
        try:
            for scores, labels, ids in device_batches:
                ev.add(scores, labels, sample_ids=ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    by_client = ev.result(timeout=60)
    by_server = _stream(client, "cuda-server", batches, reduce="server")
    assert by_client.result.num_samples == 1024
    for name in ("nll", "accuracy_top1", "brier", "ece"):
        assert by_client.result.metrics[name] == pytest.approx(by_server.result.metrics[name], rel=1e-5)
