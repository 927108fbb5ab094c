"""Contract: every chunk commits exactly once per (shard, sequence), in order, with its counters."""

from __future__ import annotations

import threading

import pytest

from evalstream.service.store import (
    TOO_LARGE,
    ChunkCommit,
    NotFound,
    NotWritable,
    Rejection,
    SequenceConflict,
    Store,
    StoredChunk,
    StorePolicy,
)
from tests.store.contract.backends import Backend
from tests.store.contract.support import chunk, commit, conflict, open_rank


def test_a_sequence_commits_exactly_once(store: Store) -> None:
    ev, shard = open_rank(store)
    assert (shard.next_sequence, shard.samples, shard.chunks) == (0, 0, 0)
    (stored,) = commit(store, ev.evaluation_id, 0, chunk(0))
    assert (stored.shard.next_sequence, stored.shard.samples, stored.shard.chunks) == (1, 3, 1)
    # The same chunk again (a retry after a lost acknowledgement) changes nothing.
    again = conflict(store, ev.evaluation_id, 0, chunk(0))
    assert (again.expected, again.got) == (1, 0)
    (row,) = store.shards(ev.evaluation_id)
    assert (row.next_sequence, row.samples, row.chunks, row.nll_sum, row.correct) == (1, 3, 1, 1.5, 2)
    assert store.chunk_records(ev.evaluation_id) == [b"chunk-0"]
    got = store.get(ev.evaluation_id)
    assert got is not None and got.num_samples == 3


def test_conflicting_content_for_a_committed_sequence_keeps_the_first(store: Store) -> None:
    ev, _ = open_rank(store)
    commit(store, ev.evaluation_id, 0, chunk(0), chunk(1))
    other = chunk(1, samples=7, records=b"something else")
    assert (conflict(store, ev.evaluation_id, 0, other).expected, other.sequence) == (2, 1)
    refused = ChunkCommit(0, rejection=Rejection(0, "non_finite", "a NaN"))
    conflict(store, ev.evaluation_id, 0, refused)
    assert store.chunk_records(ev.evaluation_id) == [b"chunk-0", b"chunk-1"]
    assert store.rejection(ev.evaluation_id, 0, 0) is None
    (row,) = store.shards(ev.evaluation_id)
    assert (row.next_sequence, row.samples, row.rejected_chunks) == (2, 6, 0)


def test_a_gap_is_refused_and_commits_nothing(store: Store) -> None:
    ev, _ = open_rank(store)
    gap = conflict(store, ev.evaluation_id, 0, chunk(1))
    assert (gap.expected, gap.got) == (0, 1)
    assert store.chunk_records(ev.evaluation_id) == []


def test_a_block_commits_in_order_and_a_rejection_consumes_its_sequence(backend: Backend) -> None:
    store = backend.open(StorePolicy(max_samples_per_evaluation=100))
    ev, _ = open_rank(store)
    bad = Rejection(2, "non_finite", "a NaN in row 4")
    block = [
        ChunkCommit(0, 30, b"a", 0.1, 3),
        ChunkCommit(1, 40, b"b", 0.2, 4),
        ChunkCommit(2, rejection=bad),
        ChunkCommit(3, 50, b"c", 0.3, 5),  # 70 + 50 > 100: refused as too large
        ChunkCommit(4, 20, None, 0.4, 6),  # an empty-records chunk still counts its samples
    ]
    out = commit(store, ev.evaluation_id, 0, *block)
    assert [s.shard.next_sequence for s in out] == [1, 2, 3, 4, 5]
    assert [s.shard.samples for s in out] == [30, 70, 70, 70, 90]
    assert [s.rejection and s.rejection.reason for s in out] == [None, None, "non_finite", TOO_LARGE, None]
    assert store.rejection(ev.evaluation_id, 0, 2) == bad
    too_large = store.rejection(ev.evaluation_id, 0, 3)
    assert too_large is not None and "max_samples_per_evaluation=100" in too_large.message
    assert store.chunk_records(ev.evaluation_id) == [b"a", b"b"]
    (row,) = store.shards(ev.evaluation_id)
    assert (row.next_sequence, row.samples, row.chunks, row.rejected_chunks, row.correct) == (5, 90, 3, 2, 13)
    assert row.nll_sum == pytest.approx(0.7)
    got = store.get(ev.evaluation_id)
    assert got is not None and got.num_samples == 90


def test_a_conflict_stops_the_block_after_the_chunks_before_it(store: Store) -> None:
    ev, _ = open_rank(store)
    out = store.commit_chunks(ev.evaluation_id, 0, [chunk(0), chunk(2), chunk(3)])
    assert len(out) == 2 and isinstance(out[0], StoredChunk) and isinstance(out[1], SequenceConflict)
    assert (out[1].expected, out[1].got) == (1, 2)
    assert store.chunk_records(ev.evaluation_id) == [b"chunk-0"]


def test_closed_shards_finalized_evaluations_and_unknown_ones_take_nothing(store: Store) -> None:
    ev, _ = open_rank(store, world=2)
    open_rank(store, rank=1, world=2)
    commit(store, ev.evaluation_id, 0, chunk(0))
    store.close_shard(ev.evaluation_id, 0)
    with pytest.raises(NotWritable) as closed:
        store.commit_chunks(ev.evaluation_id, 0, [chunk(1), chunk(2)])
    assert not closed.value.finalized and closed.value.rank == 0
    store.finalize(ev.evaluation_id, b"result", b"records", 3)
    with pytest.raises(NotWritable) as done:
        store.commit_chunks(ev.evaluation_id, 1, [chunk(0)])
    assert done.value.finalized
    with pytest.raises(NotFound):
        store.commit_chunks("no-such-evaluation", 0, [chunk(0)])
    with pytest.raises(NotFound):
        store.commit_chunks(ev.evaluation_id, 5, [chunk(0)])
    assert [s.next_sequence for s in store.shards(ev.evaluation_id)] == [1, 0]


def test_concurrent_ranks_lose_no_commit(store: Store) -> None:
    world = 8
    ids = [open_rank(store, rank=r, world=world)[0].evaluation_id for r in range(world)]
    errors: list[BaseException] = []

    def write(rank: int) -> None:
        try:
            for seq in range(25):
                commit(store, ids[rank], rank, chunk(seq, samples=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [s.next_sequence for s in store.shards(ids[0])] == [25] * world
    got = store.get(ids[0])
    assert got is not None and got.num_samples == 25 * world


def test_each_chunk_keeps_the_digest_of_its_input_and_a_resend_does_not_replace_it(store: Store) -> None:
    """The digest judges a re-sent sequence on any replica, so it is stored in the chunk's own commit
    (refused chunks included) and a resend of the sequence, with any digest, leaves it as it was."""
    ev, _ = open_rank(store)
    first = ChunkCommit(0, 3, b"chunk-0", 1.5, 2, digest=b"\x01first")
    refused = ChunkCommit(1, rejection=Rejection(1, "non_finite", "a NaN"), digest=b"\x01refused")
    undecoded = ChunkCommit(2, rejection=Rejection(2, "bad_dtype", "dtype unset"))
    commit(store, ev.evaluation_id, 0, first, refused, undecoded)
    assert store.chunk_digest(ev.evaluation_id, 0, 0) == b"\x01first"
    assert store.chunk_digest(ev.evaluation_id, 0, 1) == b"\x01refused"
    assert store.chunk_digest(ev.evaluation_id, 0, 2) is None  # refused before it decoded
    assert store.chunk_digest(ev.evaluation_id, 0, 3) is None  # not committed
    conflict(store, ev.evaluation_id, 0, ChunkCommit(0, 3, b"other", 1.5, 2, digest=b"\x01other"))
    assert store.chunk_digest(ev.evaluation_id, 0, 0) == b"\x01first"
    assert store.chunk_records(ev.evaluation_id) == [b"chunk-0"]
