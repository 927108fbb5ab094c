"""Cumulative acknowledgements: asked for in OpenShard.ack_mode (or, by clients that predate the
field, with gRPC metadata), one ack may cover a run of committed chunks.

A staging block's chunks commit in one transaction, so their outcomes are ready together; a stream
that asks hears one ChunkAck whose ``next_sequence`` covers them, as the contract's "highest
sequence durably committed" allows. Rejections are still answered chunk by chunk; a stream that
does not ask (old clients sending neither field nor metadata) gets one ack per chunk.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from evalstream import wire
from evalstream.v1 import service_pb2, service_pb2_grpc
from tests.service.conftest import NUM_CLASSES
from tests.service.helpers import Data, chunk_request, close_request, make_data, open_request

CUMULATIVE, PER_CHUNK = service_pb2.ACK_MODE_CUMULATIVE, service_pb2.ACK_MODE_PER_CHUNK
PARTS = [make_data(20, NUM_CLASSES, seed=s, id_offset=100 * s) for s in range(16)]
_bad = PARTS[9].labels.copy()
_bad[3] = NUM_CLASSES
PARTS[9] = Data(PARTS[9].scores, _bad, PARTS[9].ids)


def _stream(channel: grpc.Channel, step: int, ack_mode: int = 0, metadata: bool = False) -> list:
    opened = open_request(step=step)
    opened.open.ack_mode = ack_mode  # type: ignore[assignment]
    requests = [
        opened,
        *(chunk_request(seq, part) for seq, part in enumerate(PARTS)),
        close_request(len(PARTS)),
    ]
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    return list(stub.StreamEvaluation(iter(requests), metadata=(wire.ACKS_METADATA,) if metadata else ()))


def _assert_cumulative(answers: list) -> None:
    acks = [a.ack for a in answers[1:-1]]
    assert answers[-1].closed.samples == 15 * 20 and answers[-1].closed.rejected_chunks == 1
    sequences = [a.next_sequence for a in acks]
    assert sequences == sorted(set(sequences)) and sequences[-1] == 16  # increasing, ends at all sent
    assert len(acks) < len(PARTS)  # pipelined chunks of one block share an acknowledgement
    rejected = [a for a in acks if a.HasField("rejection")]
    assert [(a.rejection.sequence, a.next_sequence) for a in rejected] == [(9, 10)]
    assert acks[-1].samples_committed == 15 * 20


def _assert_per_chunk(answers: list) -> None:
    assert [a.ack.next_sequence for a in answers[1:-1]] == list(range(1, 17))
    assert np.array_equal([a.ack.HasField("rejection") for a in answers[1:-1]], [i == 9 for i in range(16)])


def test_cumulative_acks_asked_in_the_open_request(channel: grpc.Channel) -> None:
    _assert_cumulative(_stream(channel, step=1, ack_mode=CUMULATIVE))


def test_old_clients_keep_their_acks(channel: grpc.Channel) -> None:
    """Clients before ack_mode: the metadata still asks for cumulative acks, nothing means per chunk."""
    _assert_cumulative(_stream(channel, step=2, metadata=True))
    _assert_per_chunk(_stream(channel, step=3))


def test_the_field_decides_over_the_metadata(channel: grpc.Channel) -> None:
    _assert_per_chunk(_stream(channel, step=4, ack_mode=PER_CHUNK, metadata=True))


def test_an_unknown_ack_mode_is_refused_by_name(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _stream(channel, step=5, ack_mode=7)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown ack_mode 7; use ACK_MODE_PER_CHUNK or ACK_MODE_CUMULATIVE" in str(info.value.details())
