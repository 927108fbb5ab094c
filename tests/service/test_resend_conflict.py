"""A re-sent sequence on one server: the same input is a duplicate however it is encoded; other
content under a committed sequence ends the stream with FAILED_PRECONDITION and changes nothing."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from evalstream.service import records_wire
from evalstream.service.decode import DecodedChunk, decode_chunk
from evalstream.service.digest import scores_digest
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.settings import Settings
from evalstream.service.staging import StagingBlock
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from evalstream.wire import DTYPE_CODES, WireTensor, encode_chunk_request, encode_tensor
from tests.service.conftest import NUM_CLASSES
from tests.service.helpers import (
    MODEL,
    RUN,
    Data,
    chunk_request,
    close_request,
    expected_result,
    make_data,
    open_request,
)
from tests.support.lockstep import LockStep, reopen


def _result(channel: grpc.Channel, model: str = MODEL) -> evaluation_pb2.EvaluationResult:
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    ref = evaluation_pb2.EvaluationRef(run=RUN, model=model, split="validation", step=0)
    got = stub.GetEvaluation(service_pb2.GetEvaluationRequest(ref=ref, include_per_class=True))
    return got.evaluation.result


def _hand_encoded(sequence: int, data: Data) -> bytes:
    """The chunk as the client library writes it (evalstream/wire/encode.py, not protobuf)."""
    scores, labels, ids = (
        WireTensor(DTYPE_CODES[a.dtype.name], a) for a in (data.scores, data.labels, data.ids)
    )
    return encode_chunk_request(sequence, scores, labels, ids)


def test_a_resent_chunk_is_a_duplicate_in_any_encoding_and_other_content_is_refused(
    channel: grpc.Channel, settings: Settings
) -> None:
    data = make_data(300, NUM_CLASSES, seed=8)
    s = LockStep(channel)
    s.send(open_request(num_classes=NUM_CLASSES))
    assert s.send(_hand_encoded(0, data.part(0, 100))).ack.next_sequence == 1
    assert s.send(chunk_request(1, data.part(100, 200))).ack.next_sequence == 2
    # Chunk 0 again, now through protobuf with int32 labels: the same input as decoded.
    same = data.part(0, 100)
    as_int32 = Data(same.scores, same.labels.astype(np.int32), same.ids)
    again = s.send(chunk_request(0, as_int32)).ack
    assert again.duplicate and (again.next_sequence, again.samples_committed) == (2, 200)
    # Chunk 1 again with one score changed in its last bit: other content under a committed sequence.
    other = data.part(100, 200)
    other.scores = other.scores.copy()
    other.scores[7, 3] = np.nextafter(other.scores[7, 3], np.float32(np.inf))
    refused = s.fails(chunk_request(1, other))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = refused.details() or ""
    assert f"chunk 1 of rank 0 of evaluation {RUN}/{MODEL}/validation@0" in message
    assert "other content" in message and "resend the original chunks from 1" in message
    s.cancel()

    # The evaluation is as it was: a new stream resumes at 2 and the result is the original data's.
    s = LockStep(channel)
    assert s.send(open_request(num_classes=NUM_CLASSES)).opened.next_sequence == 2
    assert s.send(chunk_request(2, data.part(200, 300))).ack.next_sequence == 3
    closed = s.send(close_request(3)).closed
    s.end()
    assert closed.finalized and closed.samples == 300
    assert _result(channel) == expected_result(data, NUM_CLASSES, settings.engine_config())


def test_nothing_after_a_conflicting_resend_is_committed(channel: grpc.Channel) -> None:
    """Chunks the stream sent after its conflicting resend are answered with the same status, not
    committed after it."""
    data = make_data(200, NUM_CLASSES, seed=9)
    s = LockStep(channel)
    s.send(open_request(num_classes=NUM_CLASSES))
    assert s.send(chunk_request(0, data.part(0, 100))).ack.next_sequence == 1
    s.post(chunk_request(0, data.part(100, 200)))  # other rows under sequence 0
    s.post(chunk_request(1, data.part(100, 200)))
    try:
        next(s.call)
        raise AssertionError("the conflicting resend was acknowledged")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    s.cancel()
    s, response = reopen(channel, open_request(num_classes=NUM_CLASSES))
    opened = response.opened
    assert (opened.next_sequence, opened.samples_committed) == (1, 100)
    s.cancel()


def test_a_resent_records_chunk_is_judged_by_its_records_bytes(
    channel: grpc.Channel, settings: Settings
) -> None:
    config = settings.engine_config()
    layout = records_wire.layout_for(config.inverse_temperatures, config.max_rank)
    data = make_data(200, NUM_CLASSES, seed=10)
    records = ChunkReducer(NUM_CLASSES, config).reduce(data.scores, data.labels, data.ids)
    opening = open_request(num_classes=NUM_CLASSES, model="records")
    opening.open.reduce = service_pb2.REDUCE_MODE_CLIENT
    opening.open.records_layout_version = layout.version
    s = LockStep(channel)
    s.send(opening)
    assert s.send(records_wire.encode_request(records, layout, 0, 100, 0)).ack.next_sequence == 1
    assert s.send(records_wire.encode_request(records, layout, 0, 100, 0)).ack.duplicate
    refused = s.fails(records_wire.encode_request(records, layout, 100, 200, 0))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "chunk 0 of rank 0" in (refused.details() or "")
    s.cancel()
    s, response = reopen(channel, opening)
    assert response.opened.next_sequence == 1
    assert s.send(records_wire.encode_request(records, layout, 100, 200, 1)).ack.next_sequence == 2
    assert s.send(close_request(2)).closed.finalized
    s.end()
    assert _result(channel, "records") == expected_result(data, NUM_CLASSES, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_chunk_has_one_digest_whether_staged_in_a_block_or_reduced_alone(dtype: torch.dtype) -> None:
    """A replica may stage a chunk in a block where another reduces it alone (a larger block_rows
    setting, a chunk that did not fit): the digest is of the input as decoded, the same either way,
    and differs with any change of scores, labels, ids or dtype."""
    data = make_data(40, NUM_CLASSES, seed=11)
    scores = torch.from_numpy(data.scores).to(dtype)

    def decoded(scores: torch.Tensor, labels: np.ndarray, ids: np.ndarray | None) -> DecodedChunk:
        chunk = service_pb2.Chunk(sequence=0, scores=encode_tensor(scores), labels=encode_tensor(labels))
        if ids is not None:
            chunk.sample_ids.CopyFrom(encode_tensor(ids))
        return decode_chunk(chunk, NUM_CLASSES, max_rows=1000)

    alone = decoded(scores, data.labels.astype(np.int32), data.ids)
    block = StagingBlock(64, NUM_CLASSES, dtype)
    block.append(decoded(scores[:10], data.labels[:10], data.ids[:10]), 0, None)  # type: ignore[arg-type]
    block.append(alone, 1, None)  # type: ignore[arg-type]
    staged = scores_digest(*block.views(10, 50), dtype)
    assert staged == scores_digest(alone.host, alone.labels, alone.sample_ids, alone.dtype)
    changed = data.labels.copy()
    changed[0] = (changed[0] + 1) % NUM_CLASSES
    others = [
        decoded(scores, changed, data.ids),
        decoded(scores, data.labels, data.ids + 1),
        decoded(scores, data.labels, None),
        decoded(scores.to(torch.float32 if dtype != torch.float32 else torch.float16), data.labels, data.ids),
    ]
    for other in others:
        assert scores_digest(other.host, other.labels, other.sample_ids, other.dtype) != staged
