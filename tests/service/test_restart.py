"""Crash and restart: a server killed with SIGKILL mid-stream loses no committed chunk, and
a restarted server sees every finalized evaluation. The server runs as a real subprocess
(``python -m evalstream.service.server``) on its SQLite file in tmp_path."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.service.store import ChunkCommit, EvaluationKey, ShardOpenRequest, SqliteStore
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from tests.service.conftest import NUM_CLASSES, small_settings
from tests.service.helpers import (
    chunk_request,
    close_request,
    concat,
    expected_result,
    make_data,
    open_request,
)
from tests.support.lockstep import LockStep

READY = re.compile(r"evalstream serving grpc=(\S+)")


class ServerProcess:
    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSTREAM_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evalstream.service.server", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        self.target = ""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            found = READY.search(line)
            if found:
                self.target = found.group(1)
                break
        if not self.target:
            self.proc.kill()
            raise AssertionError(f"server did not start (exit {self.proc.wait()})")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "evalstream.toml"
    path.write_text(
        f'data_dir = "{tmp_path / "data"}"\ngrpc_address = "127.0.0.1:0"\nmetrics_address = ""\n'
        'device = "cpu"\nshutdown_grace_s = 2.0\n'
        # The suite's backend (tests/conftest.py), so the server and the reference below agree.
        f'engine_backend = "{os.environ.get("EVALSTREAM_ENGINE_BACKEND", "eager")}"\n'
    )
    return path


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.kill()


def _evaluation(target: str) -> evaluation_pb2.Evaluation:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        ref = evaluation_pb2.EvaluationRef(run="run-1", model="model-a", split="validation", step=0)
        return stub.GetEvaluation(
            service_pb2.GetEvaluationRequest(ref=ref, include_per_class=True)
        ).evaluation


def test_sigkill_mid_stream_loses_no_committed_chunk_and_the_client_resumes(
    config: Path, processes: list[ServerProcess]
) -> None:
    rank0 = make_data(400, NUM_CLASSES, seed=11)
    rank1 = make_data(100, NUM_CLASSES, seed=12, id_offset=10_000)
    chunks = [rank0.part(i, i + 50) for i in range(0, 400, 50)]

    first = ServerProcess(config)
    processes.append(first)
    with grpc.insecure_channel(first.target) as channel:
        s = LockStep(channel)
        s.send(open_request(rank=0, world_size=2))
        for seq in range(5):
            assert s.send(chunk_request(seq, chunks[seq])).ack.next_sequence == seq + 1
        s.post(chunk_request(5, chunks[5]))  # in flight when the server dies
        first.kill()
        s.end()

    second = ServerProcess(config)
    processes.append(second)
    with grpc.insecure_channel(second.target) as channel:
        s = LockStep(channel)
        opened = s.send(open_request(rank=0, world_size=2)).opened
        assert opened.next_sequence in (5, 6)  # chunk 5 may or may not have committed; 0-4 did
        assert opened.samples_committed == 50 * opened.next_sequence
        for seq in range(opened.next_sequence, len(chunks)):
            assert s.send(chunk_request(seq, chunks[seq])).ack.next_sequence == seq + 1
        assert s.send(close_request(len(chunks))).closed.samples == 400
        s.end()
        s1 = LockStep(channel)
        s1.send(open_request(rank=1, world_size=2))
        s1.send(chunk_request(0, rank1))
        assert s1.send(close_request(1)).closed.finalized
        s1.end()
    finalized = _evaluation(second.target)
    settings = Settings.load(config, env={})
    assert finalized.result == expected_result(concat([rank0, rank1]), NUM_CLASSES, settings.engine_config())
    assert second.terminate() == 0  # graceful SIGTERM exits 0

    third = ServerProcess(config)
    processes.append(third)
    again = _evaluation(third.target)
    assert again.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert again.result == finalized.result and again.finalized_at == finalized.finalized_at
    assert third.terminate() == 0


def test_restart_finishes_a_finalize_a_crash_interrupted(tmp_path: Path) -> None:
    """Every rank closed but the process died before the result was stored: the next start finalizes."""
    settings = small_settings(tmp_path / "data")
    data = make_data(90, NUM_CLASSES, seed=13)
    store = SqliteStore(settings.data_path)
    reducer = ChunkReducer(NUM_CLASSES, settings.engine_config())
    request = ShardOpenRequest(
        EvaluationKey("run-1", "model-a", "validation", 0), 0, 1, NUM_CLASSES, "logits", 0, False
    )
    evaluation, _ = store.open_shard(request)
    for seq, start in enumerate(range(0, 90, 30)):
        part = data.part(start, start + 30)
        blob = reducer.reduce(part.scores, part.labels, part.ids).to_bytes()
        store.commit_chunks(evaluation.evaluation_id, 0, [ChunkCommit(seq, 30, blob)])
    store.close_shard(evaluation.evaluation_id, 0)
    store.close()

    with BackgroundServer(settings) as srv:
        got = _evaluation(srv.target)
    assert got.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert got.result == expected_result(data, NUM_CLASSES, settings.engine_config())
