"""The replicated store: PostgreSQL, shared by any number of stateless evalstream replicas.

Every coordination rule that one process used to enforce in memory is a row
lock or a conditional statement here, so it holds across replicas:

- Exactly-once ingest: a block's chunks are inserted if absent under the
  primary key (evaluation, rank, sequence), in the transaction that advances
  the shard (whose row is locked ``FOR UPDATE``), committed before the caller
  acknowledges anything. Two streams of one rank on two replicas serialize on
  the shard row; the second finds the sequence taken (``SequenceConflict``).
- The last close: ``evaluations.closed`` is incremented on the evaluation row,
  only by the close that flips its shard from open to closed, so concurrent
  last closes on two replicas serialize on that row and exactly one of them
  gets ``closed = world_size`` back (see ``postgres_schema.py``).
- Finalize exactly once: ``UPDATE ... WHERE state = 'open' RETURNING``; a
  racing finalize finds the row no longer open and keeps what is stored. With a
  claim (``postgres_claims.py``) the update is also conditioned on the claim's
  epoch, so a finalizer that lost its claim changes nothing.
- A finalize sends ``NOTIFY evalstream_finalized`` in its transaction: waiters
  on every replica hear it once, when (and only if) it commits (``postgres_listen.py``).
- One live stream per rank across replicas: a hold in ``shard_owners``, taken at
  open, renewed by a heartbeat, released at stream end (``postgres_ownership.py``).

Lock order is evaluation row, then shard row, in every write, so two writes
never wait on each other in a cycle. Calls retry while the database is
unreachable (``PostgresReads._run``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence

import psycopg

from evalstream.service.store.base import (
    FINALIZED,
    OPEN,
    TOO_LARGE,
    ChunkCommit,
    EvaluationKey,
    EvaluationRow,
    Rejection,
    ShardOpenRequest,
    ShardRow,
    Store,
    StoredChunk,
    StorePolicy,
)
from evalstream.service.store.errors import SequenceConflict
from evalstream.service.store.postgres_claims import Claims
from evalstream.service.store.postgres_leader import ExporterLease
from evalstream.service.store.postgres_listen import CHANNEL, FinalizationListener
from evalstream.service.store.postgres_ownership import Ownership
from evalstream.service.store.postgres_reads import NOW, PostgresReads, Row, eval_in, make_pool, shard_in
from evalstream.service.store.postgres_schema import LATEST, migrate
from evalstream.service.store.rules import check_agrees, check_writable, too_large

log = logging.getLogger(__name__)

# Merged records are stored in pieces of this size: far below the 1 GB bytea limit, small enough
# that neither side of the connection holds one value of a huge evaluation in one buffer twice.
PIECE_BYTES = 16 << 20
DEFAULT_POOL_SIZE = 20
# How long a finalizer's claim lives without renewal: the delay before another replica takes over the
# finalize of a replica that died or stalled. Renewed every third of it while the finalizer works.
DEFAULT_CLAIM_S = 30.0
# How long a stream's hold on its rank lives without renewal: how long after its replica died another
# replica accepts the rank. Renewed every third of it. The client's default retries (8 attempts, ~9 s
# and more of backoff) outlast it, so a stream whose replica was killed resumes on another.
DEFAULT_SHARD_LEASE_S = 5.0
# Completed evaluations one sweep claims at most.
SWEEP_LIMIT = 16


class PostgresStore(PostgresReads, Store):
    """Store in a PostgreSQL database given by a libpq URL (``postgresql://user@host:port/db``)."""

    def __init__(
        self,
        url: str,
        policy: StorePolicy | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        schema_version: int = LATEST,
        claim_s: float = DEFAULT_CLAIM_S,
        shard_lease_s: float = DEFAULT_SHARD_LEASE_S,
    ) -> None:
        self.url = url
        self.policy = policy or StorePolicy()
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn, schema_version)
        super().__init__(make_pool(url, pool_size))
        self.claims = Claims(claim_s)
        self.claims.start(lambda: self._run(self.claims.renew_in))
        self.exporter = ExporterLease(url)
        self.ownership = Ownership(shard_lease_s)
        self.ownership.start(lambda: self._run(self.ownership.renew_in))

    def finalization_listener(
        self, announce: Callable[[str], None], connected: Callable[[bool], None]
    ) -> FinalizationListener:
        """Other replicas finalize too: their NOTIFYs reach this one's waiters (``postgres_listen.py``)."""
        return FinalizationListener(self.url, announce, connected)

    def exports_evaluations(self) -> bool:
        """Whether this replica is the one exporting evaluation gauges (``postgres_leader.py``)."""
        return self.exporter.held()

    # -- writes -------------------------------------------------------------------------------------

    def open_shard(self, request: ShardOpenRequest) -> tuple[EvaluationRow, ShardRow]:
        def op(conn: psycopg.Connection[Row]) -> tuple[EvaluationRow, ShardRow]:
            k = request.key
            # Two ranks opening a new evaluation on two replicas at once: one insert wins, the other
            # waits for it and does nothing; both then read the same row.
            conn.execute(
                "INSERT INTO evaluations (id, run, model, split, step, state, world_size, num_classes, "
                f"score_kind, dataset_size, created_at, pinned) VALUES "
                f"(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, {NOW}, %s) "
                "ON CONFLICT (run, model, split, step) DO NOTHING",
                (
                    uuid.uuid4().hex,
                    k.run,
                    k.model,
                    k.split,
                    k.step,
                    OPEN,
                    request.world_size,
                    request.num_classes,
                    request.score_kind,
                    request.dataset_size,
                    request.pin,
                ),
            )
            found = conn.execute(
                "SELECT id FROM evaluations WHERE run = %s AND model = %s AND split = %s AND step = %s",
                (k.run, k.model, k.split, k.step),
            ).fetchone()
            assert found is not None  # inserted above or by the insert this one waited for
            evaluation_id = found["id"]
            ev = eval_in(conn, evaluation_id, "FOR UPDATE OF e")
            check_agrees(ev, request)
            if request.pin and not ev.pinned:
                conn.execute("UPDATE evaluations SET pinned = true WHERE id = %s", (evaluation_id,))
            conn.execute(
                f"INSERT INTO shards (evaluation_id, rank, updated_at) VALUES (%s, %s, {NOW}) "
                "ON CONFLICT DO NOTHING",
                (evaluation_id, request.rank),
            )
            return eval_in(conn, evaluation_id), shard_in(conn, evaluation_id, request.rank)

        return self._run(op)

    def commit_chunks(
        self, evaluation_id: str, rank: int, chunks: Sequence[ChunkCommit]
    ) -> list[StoredChunk | SequenceConflict]:
        """A block in one transaction: the evaluation row is shared-locked (a finalize waits for the
        commit, and the commit for a finalize), the shard row locked for update, the chunk rows
        inserted if absent, the shard written once."""
        max_samples = self.policy.max_samples_per_evaluation

        def op(conn: psycopg.Connection[Row]) -> list[StoredChunk | SequenceConflict]:
            ev = eval_in(conn, evaluation_id, "FOR SHARE OF e")
            shard = shard_in(conn, evaluation_id, rank, "FOR UPDATE")
            check_writable(ev, shard)
            total = ev.num_samples
            out: list[StoredChunk | SequenceConflict] = []
            rows: list[tuple[str, int, int, int, bytes | None, bytes | None]] = []
            refused: list[tuple[str, int, int, str, str, bytes | None]] = []
            next_sequence, samples, count, rejected = shard.next_sequence, 0, 0, 0
            nll_sum, correct = 0.0, 0
            for chunk in chunks:
                if chunk.sequence != next_sequence:
                    out.append(SequenceConflict(next_sequence, chunk.sequence))
                    break
                rejection = chunk.rejection
                if rejection is None and total + chunk.samples > max_samples:
                    rejection = Rejection(
                        chunk.sequence, TOO_LARGE, too_large(ev, total + chunk.samples, max_samples)
                    )
                if rejection is None:
                    rows.append(
                        (evaluation_id, rank, chunk.sequence, chunk.samples, chunk.records, chunk.digest)
                    )
                    total += chunk.samples
                    samples += chunk.samples
                    count += 1
                    nll_sum += chunk.nll_sum
                    correct += chunk.correct
                else:
                    why = (rejection.reason, rejection.message)
                    refused.append((evaluation_id, rank, chunk.sequence, *why, chunk.digest))
                    rejected += 1
                next_sequence = chunk.sequence + 1
                out.append(
                    StoredChunk(
                        ShardRow(
                            evaluation_id,
                            rank,
                            next_sequence,
                            shard.samples + samples,
                            shard.chunks + count,
                            shard.rejected_chunks + rejected,
                            False,
                            shard.nll_sum + nll_sum,
                            shard.correct + correct,
                            shard.updated_at,
                        ),
                        rejection,
                    )
                )
            if not rows and not refused:
                return out
            with conn.cursor() as cur:
                if rows:
                    cur.executemany(
                        "INSERT INTO chunks (evaluation_id, rank, sequence, samples, records, digest) "
                        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        rows,
                    )
                    if cur.rowcount != len(rows):  # the shard lock makes this unreachable; the key decides
                        raise SequenceConflict(shard.next_sequence + len(out), rows[0][2])
                if refused:
                    cur.executemany(
                        "INSERT INTO rejections (evaluation_id, rank, sequence, reason, message, digest) "
                        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        refused,
                    )
            updated = conn.execute(
                "UPDATE shards SET next_sequence = %s, samples = samples + %s, chunks = chunks + %s, "
                "rejected = rejected + %s, nll_sum = nll_sum + %s, correct = correct + %s, "
                f"updated_at = {NOW} "
                "WHERE evaluation_id = %s AND rank = %s RETURNING updated_at",
                (next_sequence, samples, count, rejected, nll_sum, correct, evaluation_id, rank),
            ).fetchone()
            assert updated is not None
            return [_stamped(item, updated["updated_at"]) for item in out]

        return self._run(op)

    def close_shard(self, evaluation_id: str, rank: int) -> EvaluationRow:
        def op(conn: psycopg.Connection[Row]) -> tuple[EvaluationRow, int | None]:
            eval_in(conn, evaluation_id, "FOR UPDATE OF e")
            shard_in(conn, evaluation_id, rank)
            flipped = conn.execute(
                f"UPDATE shards SET closed = true, updated_at = {NOW} "
                "WHERE evaluation_id = %s AND rank = %s AND NOT closed RETURNING rank",
                (evaluation_id, rank),
            ).fetchone()
            epoch = None
            if flipped is not None:  # a retried close counts once
                conn.execute("UPDATE evaluations SET closed = closed + 1 WHERE id = %s", (evaluation_id,))
                # The close that completes the evaluation claims its finalize, in the same transaction.
                epoch = self.claims.claim_in(conn, evaluation_id)
            return eval_in(conn, evaluation_id), epoch

        row, epoch = self._run(op)
        if epoch is not None:
            self.claims.hold({evaluation_id: epoch})
        return row

    def acquire_shard(self, evaluation_id: str, rank: int, token: str) -> ShardRow | None:
        """Own the rank for the stream ``token``: the shard as it stands, or None while a live stream
        of another replica owns it (``postgres_ownership.py``)."""
        owned = None
        self.ownership.taking(token)
        try:
            owned = self._run(lambda conn: self.ownership.acquire_in(conn, evaluation_id, rank, token))
        finally:
            self.ownership.acquired(evaluation_id, rank, token, owned is not None)
        return owned

    def release_shard(self, evaluation_id: str, rank: int, token: str) -> None:
        self._run(lambda conn: self.ownership.release_in(conn, evaluation_id, rank, token))

    def shard_lost(self, token: str) -> bool:
        return self.ownership.lost(token)

    def claim_pending(self) -> list[str]:
        """Claim completed evaluations whose finalizer's claim expired (or that none holds); their ids.

        Every replica calls this periodically (``service/sweeper.py``); what it returns, it finalizes.
        """
        claimed = self._run(lambda conn: self.claims.claim_pending_in(conn, SWEEP_LIMIT))
        self.claims.hold(claimed)
        return list(claimed)

    def finalize(self, evaluation_id: str, result: bytes, records: bytes, num_samples: int) -> EvaluationRow:
        """Finalize under this replica's claim if it holds one (a late finalizer whose claim another
        replica took over commits nothing), else as long as the evaluation is open (an explicit
        FinalizeEvaluation). Either way the answer is the row as stored."""
        epoch = self.claims.take(evaluation_id)
        row = self.finalize_claimed(evaluation_id, epoch, result, records, num_samples)
        return row or self._get(evaluation_id)

    def finalize_claimed(
        self, evaluation_id: str, epoch: int | None, result: bytes, records: bytes, num_samples: int
    ) -> EvaluationRow | None:
        """Finalize if the evaluation is still open (and, with ``epoch``, still claimed at that epoch).

        Returns the finalized row if this call finalized it; None if another call did first, or
        the claim moved on (a newer claimer finalizes; this one's work is discarded).
        """

        def op(conn: psycopg.Connection[Row]) -> EvaluationRow | None:
            condition = "" if epoch is None else " AND claim_epoch = %s"
            args: tuple[object, ...] = (FINALIZED, result, num_samples, evaluation_id, OPEN)
            won = conn.execute(
                f"UPDATE evaluations SET state = %s, finalized_at = {NOW}, result = %s, num_samples = %s, "
                "records_available = true, claim_owner = NULL, claim_expires = NULL "
                f"WHERE id = %s AND state = %s{condition} RETURNING id, run, model, split",
                args if epoch is None else (*args, epoch),
            ).fetchone()
            if won is None:
                eval_in(conn, evaluation_id)  # NotFound for an unknown id
                return None
            with conn.cursor().copy("COPY final_records (evaluation_id, piece, data) FROM STDIN") as copy:
                for piece, start in enumerate(range(0, max(len(records), 1), PIECE_BYTES)):
                    copy.write_row((evaluation_id, piece, records[start : start + PIECE_BYTES]))
            conn.execute("DELETE FROM chunks WHERE evaluation_id = %s", (evaluation_id,))
            self._retention_in(conn, EvaluationKey(won["run"], won["model"], won["split"], 0))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, evaluation_id))
            return eval_in(conn, evaluation_id)

        return self._run(op)

    def _get(self, evaluation_id: str) -> EvaluationRow:
        return self._run(lambda conn: eval_in(conn, evaluation_id))

    def set_pinned(self, evaluation_id: str, pinned: bool) -> EvaluationRow:
        def op(conn: psycopg.Connection[Row]) -> EvaluationRow:
            ev = eval_in(conn, evaluation_id, "FOR UPDATE OF e")
            conn.execute("UPDATE evaluations SET pinned = %s WHERE id = %s", (pinned, evaluation_id))
            self._retention_in(conn, ev.key)
            return eval_in(conn, evaluation_id)

        return self._run(op)

    def apply_retention(self) -> list[str]:
        def op(conn: psycopg.Connection[Row]) -> list[str]:
            series = conn.execute(
                "SELECT DISTINCT run, model, split FROM evaluations WHERE state = %s", (FINALIZED,)
            ).fetchall()
            dropped: list[str] = []
            for s in series:
                dropped += self._retention_in(conn, EvaluationKey(s["run"], s["model"], s["split"], 0))
            return dropped

        return self._run(op)

    def _retention_in(self, conn: psycopg.Connection[Row], key: EvaluationKey) -> list[str]:
        """Drop the records beyond the latest ``retention_keep_latest`` finalized steps of the series,
        in the caller's transaction (rows and pieces go together: nothing to orphan)."""
        keep_latest = self.policy.retention_keep_latest
        if keep_latest <= 0:
            return []
        rows = conn.execute(
            "UPDATE evaluations SET records_available = false WHERE id IN ("
            "SELECT id FROM evaluations WHERE run = %s AND model = %s AND split = %s AND state = %s "
            "AND records_available AND NOT pinned AND id NOT IN (SELECT id FROM evaluations "
            "WHERE run = %s AND model = %s AND split = %s AND state = %s "
            "ORDER BY step DESC, seq DESC LIMIT %s)) RETURNING id",
            (key.run, key.model, key.split, FINALIZED) * 2 + (keep_latest,),
        ).fetchall()
        ids = [r["id"] for r in rows]
        if ids:
            conn.execute("DELETE FROM final_records WHERE evaluation_id = ANY(%s)", (ids,))
        return ids

    def close(self) -> None:
        self.ownership.stop()
        try:  # not retried: a database that is away must not hold up a stop (the holds expire anyway)
            with self._pool.connection(timeout=2.0) as conn, conn.transaction():
                self.ownership.release_all_in(conn)
        except Exception:
            log.warning("releasing this replica's shard holds failed", exc_info=True)
        self.claims.stop()
        self.exporter.close()
        self._pool.close()


def _stamped(item: StoredChunk | SequenceConflict, updated_at: float) -> StoredChunk | SequenceConflict:
    if isinstance(item, SequenceConflict):
        return item
    s = item.shard
    shard = ShardRow(
        s.evaluation_id,
        s.rank,
        s.next_sequence,
        s.samples,
        s.chunks,
        s.rejected_chunks,
        s.closed,
        s.nll_sum,
        s.correct,
        updated_at,
    )
    return StoredChunk(shard, item.rejection)
