"""Contract: evaluations are opened, joined, closed and finalized exactly once; reads find them."""

from __future__ import annotations

import pytest

from evalstream.service.store import FINALIZED, OPEN, ShardMismatch, ShardOpenRequest, Store
from tests.store.contract.support import NUM_CLASSES, chunk, commit, finalized, key, open_rank


def test_ranks_join_one_evaluation_that_must_agree(store: Store) -> None:
    ev0, _ = open_rank(store, rank=0, world=2)
    ev1, shard1 = open_rank(store, rank=1, world=2)
    assert ev1.evaluation_id == ev0.evaluation_id and ev1.state == OPEN and shard1.rank == 1
    assert (ev1.key, ev1.world_size, ev1.num_classes, ev1.score_kind) == (key(), 2, NUM_CLASSES, "logits")
    with pytest.raises(ShardMismatch) as world:
        open_rank(store, rank=1, world=3)
    assert (world.value.field, world.value.stored, world.value.requested) == ("world_size", 2, 3)
    classes = ShardOpenRequest(key(), 1, 2, NUM_CLASSES + 1, "logits", 0, False)
    with pytest.raises(ShardMismatch, match="num_classes"):
        store.open_shard(classes)
    kind = ShardOpenRequest(key(), 1, 2, NUM_CLASSES, "log_probabilities", 0, False)
    with pytest.raises(ShardMismatch, match="score_kind"):
        store.open_shard(kind)
    # Reopening a rank loads where it stands.
    commit(store, ev0.evaluation_id, 0, chunk(0), chunk(1))
    _, again = open_rank(store, rank=0, world=2)
    assert (again.next_sequence, again.samples) == (2, 6)


def test_close_is_idempotent_and_finalize_happens_once(store: Store) -> None:
    ev, _ = open_rank(store, world=2)
    open_rank(store, rank=1, world=2)
    commit(store, ev.evaluation_id, 0, chunk(0))
    commit(store, ev.evaluation_id, 1, chunk(0, records=b"rank-1"))
    assert store.close_shard(ev.evaluation_id, 0).ranks_closed == 1
    assert store.close_shard(ev.evaluation_id, 0).ranks_closed == 1  # a retried close counts once
    assert store.pending_finalize() == []
    row = store.close_shard(ev.evaluation_id, 1)
    assert row.ranks_closed == 2 and not row.finalized
    assert [p.evaluation_id for p in store.pending_finalize()] == [ev.evaluation_id]
    assert store.chunk_records(ev.evaluation_id) == [b"chunk-0", b"rank-1"]
    done = store.finalize(ev.evaluation_id, b"first", b"merged", 6)
    assert done.finalized and done.state == FINALIZED and done.result == b"first" and done.num_samples == 6
    assert done.finalized_at is not None
    # A racing second finalize keeps what the first stored.
    again = store.finalize(ev.evaluation_id, b"second", b"other", 5)
    assert (again.result, again.num_samples, again.finalized_at) == (b"first", 6, done.finalized_at)
    assert store.final_records(ev.evaluation_id) == b"merged"
    assert store.chunk_records(ev.evaluation_id) == [] and store.pending_finalize() == []
    assert store.open_shards() == []


def test_reads_find_list_and_latest(store: Store) -> None:
    ids = {(model, step): finalized(store, step, model=model) for model in ("a", "b") for step in (1, 2)}
    open_ev, _ = open_rank(store, step=3, model="a")
    found = store.find("r", "a", "validation", None)
    assert found is not None and found.evaluation_id == open_ev.evaluation_id  # the highest step
    at = store.find("r", "b", "validation", 1)
    assert at is not None and at.evaluation_id == ids[("b", 1)] and at.result == b"result-1"
    assert store.find("r", "c", "validation", None) is None and store.get("missing") is None
    latest = store.latest_per_model("r", "validation")
    assert [(e.key.model, e.key.step) for e in latest] == [("a", 2), ("b", 2)]
    views = store.latest_finalized()
    assert {(e.key.model, e.key.step) for e in views} == {("a", 2), ("b", 2)}
    times = [e.finalized_at or 0.0 for e in views]
    assert times == sorted(times, reverse=True)
    assert [(e.key.step, s.rank) for e, s in store.open_shards()] == [(3, 0)]
    page, cursor = store.list_evaluations(limit=3)
    assert [e.key.step for e in page] == [3, 2, 1] and cursor is not None  # newest first
    rest, end = store.list_evaluations(limit=3, before=cursor)
    assert [e.key.step for e in rest] == [2, 1] and end is None
    only_b, _ = store.list_evaluations(model="b")
    assert {e.evaluation_id for e in only_b} == {ids[("b", 1)], ids[("b", 2)]}
