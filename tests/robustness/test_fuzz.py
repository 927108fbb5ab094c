"""The request decoder under atheris for a bounded time, in a subprocess (CI runs it every time).

The corpus is seeded with valid requests of every kind so the fuzzer starts from inputs that
reach deep into the decoder and the engine instead of failing at the protobuf parse.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evalstream.service.engine import DEFAULT_INVERSE_TEMPERATURES, EngineConfig
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.records_wire import encode_request, layout_for
from evalstream.v1 import evaluation_pb2, service_pb2
from evalstream.wire import encode_tensor

TARGET = Path(__file__).resolve().parent / "fuzz_decoder.py"
SECONDS = int(os.environ.get("EVALSTREAM_FUZZ_SECONDS", "15"))


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 4)).astype(np.float32)
    labels = np.array([0, 3, 1], np.int64)
    chunk = service_pb2.Chunk(sequence=2, scores=encode_tensor(scores), labels=encode_tensor(labels))
    with_ids = service_pb2.Chunk()
    with_ids.CopyFrom(chunk)
    with_ids.sample_ids.CopyFrom(encode_tensor(np.array([7, 8, 9], np.int64)))
    half = service_pb2.Chunk(
        sequence=0,
        scores=encode_tensor(scores.astype(np.float16)),
        labels=encode_tensor(labels.astype(np.int32)),
    )
    records = ChunkReducer(4, EngineConfig(device="cpu", backend="eager")).reduce(
        scores, labels, np.array([7, 8, 9], np.int64)
    )
    layout = layout_for(DEFAULT_INVERSE_TEMPERATURES, EngineConfig().max_rank)
    key = evaluation_pb2.EvaluationKey(run="run-1", model="m", split="validation", step=3)
    R = service_pb2.StreamEvaluationRequest
    return [
        R(open=service_pb2.OpenShard(key=key, rank=0, world_size=2, num_classes=4)).SerializeToString(),
        R(chunk=chunk).SerializeToString(),
        R(chunk=with_ids).SerializeToString(),
        R(chunk=half).SerializeToString(),
        encode_request(records, layout, 0, 3, 4),
        R(close=service_pb2.CloseShard(num_chunks=3)).SerializeToString(),
    ]


def test_fuzzing_the_request_decoder_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(_seeds()):
        (corpus / f"seed{i}").write_bytes(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=3072",
            "-max_len=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        env=env,
    )
    log = proc.stderr[-4000:]
    assert proc.returncode == 0, f"fuzzer found a crash:\n{log}"
    runs = [line for line in proc.stderr.splitlines() if "stat::number_of_executed_units" in line]
    assert runs and int(runs[0].split(":")[-1]) > 1000, log
    print(runs[0])
