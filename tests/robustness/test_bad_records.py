"""Records a client reduced are trusted no more than scores: every malformed RecordsChunk of the
table (tests/robustness/cases.py) is refused in-band with its reason and the first offending record,
the stream goes on, and the evaluation is unchanged (finishing it gives the engine's result on the
good records alone). One real server on loopback for the module."""

from __future__ import annotations

import itertools

import grpc
import pytest

from evalstream.service.convert import result_from_report
from evalstream.service.engine import Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.records_wire import LAYOUT_VERSION, layout_for
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.v1 import evaluation_pb2
from tests.robustness.cases import RECORDS_CASES, RecordsCase, records_open, records_request
from tests.robustness.conftest import NUM_CLASSES
from tests.robustness.rawstream import get_evaluation, good_batch
from tests.support.lockstep import LockStep, close_request

ROWS = 8
_models = itertools.count()


def _records(settings: Settings, seed: int) -> Records:
    """What a client's engine makes of a good batch, with sample ids."""
    import numpy as np

    scores, labels = good_batch(ROWS, NUM_CLASSES, seed=seed)
    ids = np.arange(seed * ROWS, (seed + 1) * ROWS, dtype=np.int64)
    return ChunkReducer(NUM_CLASSES, settings.engine_config()).reduce(scores, labels, ids)


@pytest.mark.parametrize("case", RECORDS_CASES, ids=lambda c: c.name)
def test_bad_records_are_refused_in_band_and_change_nothing(
    server: BackgroundServer, settings: Settings, case: RecordsCase
) -> None:
    config = settings.engine_config()
    layout = layout_for(config.inverse_temperatures, config.max_rank)
    model = f"records-{next(_models)}"
    good = _records(settings, seed=1)
    with grpc.insecure_channel(server.target) as channel:
        s = LockStep(channel)
        opened = s.send(records_open(model, NUM_CLASSES)).opened
        assert opened.records_layout.version == LAYOUT_VERSION
        assert s.send(records_request(0, good, layout)).ack.next_sequence == 1
        ack = s.send(case.build(1, _records(settings, seed=2), layout)).ack
        assert ack.HasField("rejection"), f"{case.name} was accepted"
        r = ack.rejection
        assert (r.reason, r.code, r.sequence) == (case.reason, case.code, 1), r
        if case.row is not None:
            assert f"first offending record: {case.row}" in r.message, r.message
        assert (ack.next_sequence, ack.samples_committed) == (2, ROWS)
        again = s.send(case.build(1, _records(settings, seed=2), layout)).ack
        assert again.duplicate and again.rejection.reason == case.reason
        s.send(close_request(2))
        s.end()
        evaluation = get_evaluation(channel, model)
    assert evaluation.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    expected = result_from_report(compute_metrics(Records.concat([good]), NUM_CLASSES, config))
    assert evaluation.result == expected
