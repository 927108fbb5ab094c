"""Contract: after a kill, the next process finds every committed write and nothing else, and can
finish what the kill interrupted."""

from __future__ import annotations

from evalstream.service.store import Store, StorePolicy
from tests.store.contract.backends import Backend
from tests.store.contract.support import chunk, commit, conflict, finalized, open_rank


def test_commits_survive_a_crash_and_sequences_go_on(backend: Backend, store: Store) -> None:
    ev, _ = open_rank(store, world=2)
    open_rank(store, rank=1, world=2)
    commit(store, ev.evaluation_id, 0, chunk(0), chunk(1))
    commit(store, ev.evaluation_id, 1, chunk(0, records=b"rank-1"))
    after = backend.crash(store)
    again, shard = open_rank(after, world=2)
    assert again.evaluation_id == ev.evaluation_id and again.num_samples == 9
    assert (shard.next_sequence, shard.samples, shard.nll_sum, shard.correct) == (2, 6, 3.0, 4)
    assert [(e.key.step, s.rank, s.samples) for e, s in after.open_shards()] == [(0, 0, 6), (0, 1, 3)]
    conflict(after, ev.evaluation_id, 0, chunk(1))  # still exactly once across the restart
    commit(after, ev.evaluation_id, 0, chunk(2))
    assert after.chunk_records(ev.evaluation_id) == [b"chunk-0", b"chunk-1", b"chunk-2", b"rank-1"]


def test_a_finalize_interrupted_by_a_crash_is_pending_and_completes(backend: Backend, store: Store) -> None:
    ev, _ = open_rank(store)
    commit(store, ev.evaluation_id, 0, chunk(0))
    store.close_shard(ev.evaluation_id, 0)
    after = backend.crash(store)
    (pending,) = after.pending_finalize()
    assert pending.evaluation_id == ev.evaluation_id and pending.ranks_closed == 1
    assert after.chunk_records(ev.evaluation_id) == [b"chunk-0"]
    done = after.finalize(ev.evaluation_id, b"result", b"records", 3)
    assert done.finalized and after.pending_finalize() == []


def test_finalized_results_and_records_survive_a_crash(backend: Backend) -> None:
    store = backend.open(StorePolicy(retention_keep_latest=1))
    old, new = finalized(store, 0), finalized(store, 1)
    after = backend.crash(store)
    row = after.get(new)
    assert row is not None and row.finalized and row.result == b"result-1"
    assert after.final_records(new) == b"records-1" and after.final_records(old) is None
    assert after.pending_finalize() == [] and after.open_shards() == []
