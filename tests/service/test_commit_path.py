"""The one commit path, driven through the Coordinator with a real SQLite store: a batch that meets
chunks a late commit already stored answers those as duplicates and commits the rest together."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

from evalstream import wire
from evalstream.service.decode import decode_raw
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.ingest import ChunkOutcome, Coordinator
from evalstream.service.store import ChunkCommit, EvaluationKey, ShardOpenRequest, SqliteStore
from tests.service.conftest import NUM_CLASSES, small_settings
from tests.service.helpers import chunk_request, make_data


def _count(coordinator: Coordinator, name: str) -> float:
    value = coordinator.telemetry.registry.get_sample_value(name)
    return 0.0 if value is None else value


def test_a_batch_behind_the_store_answers_duplicates_and_commits_the_rest_at_once(tmp_path: Path) -> None:
    settings = small_settings(tmp_path)
    store = SqliteStore(settings.data_path, policy=settings.store_policy())
    parts = [make_data(20, NUM_CLASSES, seed=s, id_offset=100 * s) for s in range(4)]
    request = ShardOpenRequest(
        EvaluationKey("r", "m", "validation", 0), 0, 1, NUM_CLASSES, "logits", 0, False
    )

    async def run() -> tuple[list[ChunkOutcome], float, float]:
        coordinator = Coordinator(store, settings)
        opened = await coordinator.open(request, "peer")
        lease = opened.lease
        assert lease is not None and lease.next_sequence == 0
        # A previous stream's commit of chunks 0 and 1 lands after this stream opened the rank.
        reducer = ChunkReducer(NUM_CLASSES, settings.engine_config())
        late = [
            ChunkCommit(s, 20, reducer.reduce(p.scores, p.labels, p.ids).to_bytes())
            for s, p in enumerate(parts[:2])
        ]
        assert len(store.commit_chunks(lease.evaluation_id, 0, late)) == 2
        before = _count(coordinator, "evalstream_store_commit_seconds_count")
        futures = []
        for seq, part in enumerate(parts):
            raw = wire.raw_chunk(chunk_request(seq, part).chunk)
            decode = functools.partial(decode_raw, raw, NUM_CLASSES, settings.max_chunk_rows)
            futures.append(await coordinator.submit_chunk(lease, seq, decode))
        coordinator.flush(lease)
        outcomes = list(await asyncio.gather(*futures))
        commits = _count(coordinator, "evalstream_store_commit_seconds_count") - before
        duplicates = _count(coordinator, "evalstream_ingest_duplicate_chunks_total")
        coordinator.release(lease)
        await coordinator.drain()
        coordinator.close_executors()
        return outcomes, commits, duplicates

    outcomes, commits, duplicates = asyncio.run(run())
    assert [(o.next_sequence, o.samples_committed, o.duplicate) for o in outcomes] == [
        (2, 40, True),
        (2, 40, True),
        (3, 60, False),
        (4, 80, False),
    ]
    assert duplicates == 2
    assert commits == 2  # the transaction that met the conflict, then chunks 2 and 3 together
    row = store.find("r", "m", "validation", 0)
    assert row is not None
    (shard,) = store.shards(row.evaluation_id)
    assert (shard.next_sequence, shard.samples, shard.chunks) == (4, 80, 4)
    store.close()
