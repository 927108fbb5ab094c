"""Contract: records are kept for the latest N finalized steps of a series and for pinned ones;
metrics are kept for all. The policy is given once, when the store is opened."""

from __future__ import annotations

from evalstream.service.store import StorePolicy
from tests.store.contract.backends import Backend
from tests.store.contract.support import finalized, open_rank


def test_retention_keeps_latest_and_pinned_records_but_every_result(backend: Backend) -> None:
    store = backend.open(StorePolicy(retention_keep_latest=2))
    ids = {step: finalized(store, step, pin=(step == 0)) for step in range(5)}
    other = finalized(store, 0, model="other")
    kept = {step for step, i in ids.items() if store.final_records(i) is not None}
    assert kept == {0, 3, 4}  # step 0 is pinned; 3 and 4 are the latest two
    assert store.final_records(ids[4]) == b"records-4"
    assert store.final_records(other) == b"records-0"  # another series has its own retention
    for step, i in ids.items():
        row = store.get(i)
        assert row is not None and row.finalized and row.result == f"result-{step}".encode()
        assert row.records_available == (step in kept) and row.pinned == (step == 0)


def test_unpinning_lets_retention_drop_and_pinning_at_open_keeps(backend: Backend) -> None:
    store = backend.open(StorePolicy(retention_keep_latest=1))
    first = finalized(store, 0, pin=True)
    finalized(store, 1)
    assert store.final_records(first) == b"records-0"
    row = store.set_pinned(first, False)
    assert not row.pinned and not row.records_available and store.final_records(first) is None
    # A rank may ask for a pin when it opens; a later rank's open without it does not unpin.
    ev, _ = open_rank(store, step=5, world=2, pin=True)
    again, _ = open_rank(store, step=5, rank=1, world=2)
    assert ev.pinned and again.pinned


def test_a_lowered_retention_applies_to_every_series_at_start(backend: Backend) -> None:
    store = backend.open()  # keeps everything
    ids = [finalized(store, step, model=model) for model in ("a", "b") for step in range(3)]
    assert all(store.final_records(i) is not None for i in ids)
    lowered = backend.reopen(store, StorePolicy(retention_keep_latest=1))
    dropped = lowered.apply_retention()
    assert sorted(dropped) == sorted(ids[0:2] + ids[3:5])
    assert [lowered.final_records(i) is not None for i in ids] == [False, False, True] * 2
    assert lowered.apply_retention() == []  # nothing left to drop
