"""Records messages that queue up behind a busy store commit together, and are still answered one by
one, in order, a bad one among them refused in-band with the rest unchanged.

Why it matters: a client sends ~1 MiB records messages far faster than one store transaction of
that size commits, so committing each on its own made the store's per-transaction work the
server's limit. The store's writer is held busy (one queued write that waits) while a stream's
messages arrive, so they are all reduced and waiting when it frees: the commit count shows they
went in a few transactions, the acknowledgements that each was answered as before.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.records_wire import layout_for
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from tests.robustness.cases import records_open, records_request
from tests.robustness.conftest import NUM_CLASSES
from tests.robustness.rawstream import good_batch
from tests.support.lockstep import LockStep, close_request

MESSAGES = 24
BAD = 9  # this message's records carry a label out of range
ROWS = 8


def _commits(server: BackgroundServer) -> float:
    assert server.server is not None
    for metric in server.server.coordinator.telemetry.commit_seconds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    raise AssertionError("no commit count")


def test_records_behind_a_busy_store_commit_together_and_are_answered_in_order(
    server: BackgroundServer, settings: Settings
) -> None:
    assert server.server is not None
    config = settings.engine_config()
    layout = layout_for(config.inverse_temperatures, config.max_rank)
    reducer = ChunkReducer(NUM_CLASSES, config)
    messages = []
    for seq in range(MESSAGES):
        scores, labels = good_batch(ROWS, NUM_CLASSES, seed=seq)
        records = reducer.reduce(scores, labels, np.arange(seq * ROWS, (seq + 1) * ROWS))
        if seq == BAD:
            records.label[2] = NUM_CLASSES
        messages.append(records_request(seq, records, layout))
    with grpc.insecure_channel(server.target) as channel:
        s = LockStep(channel)
        assert s.send(records_open("group-commit", NUM_CLASSES)).opened.records_layout.version
        before = _commits(server)
        release = threading.Event()
        server.server.store._writer.post(lambda _conn: release.wait(30))  # type: ignore[attr-defined]
        for msg in messages:
            s.post(msg)
        time.sleep(1.0)  # every message received and reduced while the store is busy
        release.set()
        acks = [next(s.call).ack for _ in range(MESSAGES)]
        commits = _commits(server) - before
        assert s.send(close_request(MESSAGES)).closed.samples == (MESSAGES - 1) * ROWS
        s.end()
    for seq, ack in enumerate(acks):
        assert ack.next_sequence == seq + 1 and not ack.duplicate
        assert ack.HasField("rejection") == (seq == BAD), ack
        assert ack.samples_committed == ROWS * (seq + 1 - (seq >= BAD))
    assert acks[BAD].rejection.reason == "label_out_of_range"
    assert "first offending record: 2" in acks[BAD].rejection.message
    # Committed one by one this would be 24 transactions; queued behind the busy store, a few.
    assert commits <= MESSAGES // 3, commits
