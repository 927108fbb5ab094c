"""Cumulative acknowledgements: asked for by metadata, one ack may cover a run of committed chunks.

A staging block's chunks commit in one transaction, so their outcomes are ready together; a client
that sends ``evalstream-acks: cumulative`` (EvalClient does) hears one ChunkAck whose
``next_sequence`` covers them, as the contract's "highest sequence durably committed" allows.
Rejections are still answered chunk by chunk; without the metadata every chunk has its own ack.
"""

from __future__ import annotations

import grpc
import numpy as np

from evalstream.client.stream import ACKS_METADATA as CLIENT_ACKS
from evalstream.service.servicer import ACKS_METADATA
from evalstream.v1 import service_pb2, service_pb2_grpc
from tests.service.conftest import NUM_CLASSES
from tests.service.helpers import Data, chunk_request, close_request, make_data, open_request


def _stream(
    channel: grpc.Channel, requests: list[service_pb2.StreamEvaluationRequest], cumulative: bool
) -> list:
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    metadata = (ACKS_METADATA,) if cumulative else ()
    return list(stub.StreamEvaluation(iter(requests), metadata=metadata))


def _requests(parts: list[Data], step: int) -> list[service_pb2.StreamEvaluationRequest]:
    return [
        open_request(step=step),
        *(chunk_request(seq, part) for seq, part in enumerate(parts)),
        close_request(len(parts)),
    ]


def test_the_client_asks_for_what_the_server_offers() -> None:
    assert CLIENT_ACKS == ACKS_METADATA


def test_cumulative_acks_cover_committed_runs_and_keep_every_rejection(channel: grpc.Channel) -> None:
    parts = [make_data(20, NUM_CLASSES, seed=s, id_offset=100 * s) for s in range(16)]
    bad = parts[9].labels.copy()
    bad[3] = NUM_CLASSES
    parts[9] = Data(parts[9].scores, bad, parts[9].ids)
    answers = _stream(channel, _requests(parts, step=1), cumulative=True)
    acks = [a.ack for a in answers[1:-1]]
    assert answers[-1].closed.samples == 15 * 20 and answers[-1].closed.rejected_chunks == 1
    sequences = [a.next_sequence for a in acks]
    assert sequences == sorted(set(sequences)) and sequences[-1] == 16  # increasing, ends at all sent
    assert len(acks) < len(parts)  # pipelined chunks of one block share an acknowledgement
    rejected = [a for a in acks if a.HasField("rejection")]
    assert [(a.rejection.sequence, a.next_sequence) for a in rejected] == [(9, 10)]
    assert acks[-1].samples_committed == 15 * 20
    # The same stream without the metadata: one acknowledgement per chunk, as before.
    plain = _stream(channel, _requests(parts, step=2), cumulative=False)
    assert [a.ack.next_sequence for a in plain[1:-1]] == list(range(1, 17))
    assert np.array_equal([a.ack.HasField("rejection") for a in plain[1:-1]], [i == 9 for i in range(16)])
