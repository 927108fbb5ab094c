"""The small interface every store implements (SQLite now; a shared store for replicas later).

The store owns durable state only: evaluations, shard progress (next sequence
number, committed samples), the per-chunk records of open evaluations, and the
merged records and result of finalized ones. Each method is one atomic step,
so ingest never acknowledges anything the store has not committed.
Methods are blocking; async callers run them in an executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from evalstream.service.errors import ResourceExhausted
from evalstream.service.status import FinalizedView

OPEN = "open"
FINALIZED = "finalized"


@dataclass(frozen=True)
class EvaluationKey:
    run: str
    model: str
    split: str
    step: int


@dataclass(frozen=True)
class ShardOpenRequest:
    """What a rank asks for when it opens its shard."""

    key: EvaluationKey
    rank: int
    world_size: int
    num_classes: int
    score_kind: str  # "logits" | "log_probabilities"
    dataset_size: int
    pin: bool


@dataclass(frozen=True)
class EvaluationRow:
    evaluation_id: str
    key: EvaluationKey
    state: str
    world_size: int
    num_classes: int
    score_kind: str
    dataset_size: int
    created_at: float
    finalized_at: float | None
    num_samples: int
    ranks_closed: int
    pinned: bool
    records_available: bool
    # Serialized evalstream.v1.EvaluationResult, once finalized.
    result: bytes | None

    @property
    def finalized(self) -> bool:
        return self.state == FINALIZED


@dataclass(frozen=True)
class ShardRow:
    evaluation_id: str
    rank: int
    next_sequence: int
    samples: int
    chunks: int
    rejected_chunks: int
    closed: bool
    nll_sum: float
    correct: int
    updated_at: float


@dataclass(frozen=True)
class Rejection:
    """Why a chunk was refused; kept so a retried chunk hears the same answer."""

    sequence: int
    code: str
    reason: str
    message: str


@dataclass(frozen=True)
class ChunkCommit:
    """One chunk of a staging block as the store takes it: its records, or why it was refused."""

    sequence: int
    samples: int = 0
    records: bytes | None = None
    nll_sum: float = 0.0
    correct: int = 0
    rejection: Rejection | None = None


@dataclass(frozen=True)
class StoredChunk:
    """What committing one chunk left: the shard after it, and the rejection if it was refused."""

    shard: ShardRow
    rejection: Rejection | None = None


# A chunk refused by ``commit_chunks`` because the evaluation would exceed max_samples.
TOO_LARGE = ("RESOURCE_EXHAUSTED", "evaluation_too_large")


class SequenceConflict(Exception):
    """The chunk's sequence is not the shard's next one (a duplicate or a gap)."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"expected sequence {expected}, got {got}")
        self.expected = expected
        self.got = got


class Store(ABC):
    """Durable state of the service. Every write is atomic and durable when it returns."""

    @abstractmethod
    def open_shard(self, request: ShardOpenRequest) -> tuple[EvaluationRow, ShardRow]:
        """Create or join the evaluation and create or load the shard.

        Raises ``FailedPrecondition`` when world size, class count or score kind
        disagree with the evaluation already open.
        """

    @abstractmethod
    def commit_chunk(
        self,
        evaluation_id: str,
        rank: int,
        sequence: int,
        samples: int,
        records: bytes | None,
        nll_sum: float,
        correct: int,
        max_samples: int,
    ) -> ShardRow:
        """Store a chunk's records and advance the shard to ``sequence + 1`` in one transaction.

        Raises ``SequenceConflict`` if ``sequence`` is not the shard's next one,
        ``FailedPrecondition`` if the shard is closed or the evaluation finalized,
        ``ResourceExhausted`` if the evaluation would exceed ``max_samples``.
        """

    def commit_chunks(
        self, evaluation_id: str, rank: int, chunks: Sequence[ChunkCommit], max_samples: int
    ) -> list[StoredChunk | SequenceConflict]:
        """Commit a staging block's chunks in sequence order, as if by ``commit_chunk`` and
        ``reject_chunk`` one after another (records + next sequence of each), in one transaction.

        A chunk that would take the evaluation over ``max_samples`` is stored as a rejection
        (``TOO_LARGE``) instead. A ``SequenceConflict`` stops the block: it is the last item, and the
        chunks before it are committed. ``FailedPrecondition`` (closed shard, finalized evaluation)
        commits nothing. This default makes one call per chunk; a store should do one transaction.
        """
        out: list[StoredChunk | SequenceConflict] = []
        for chunk in chunks:
            try:
                rejection = chunk.rejection
                if rejection is None:
                    try:
                        shard = self.commit_chunk(
                            evaluation_id,
                            rank,
                            chunk.sequence,
                            chunk.samples,
                            chunk.records,
                            chunk.nll_sum,
                            chunk.correct,
                            max_samples,
                        )
                        out.append(StoredChunk(shard))
                        continue
                    except ResourceExhausted as exc:
                        rejection = Rejection(chunk.sequence, *TOO_LARGE, exc.message)
                out.append(StoredChunk(self.reject_chunk(evaluation_id, rank, rejection), rejection))
            except SequenceConflict as exc:
                out.append(exc)
                break
        return out

    @abstractmethod
    def reject_chunk(self, evaluation_id: str, rank: int, rejection: Rejection) -> ShardRow:
        """Consume the rejected chunk's sequence number and remember why; nothing else changes."""

    @abstractmethod
    def rejection(self, evaluation_id: str, rank: int, sequence: int) -> Rejection | None:
        """The stored rejection of a chunk, if it was refused."""

    @abstractmethod
    def close_shard(self, evaluation_id: str, rank: int) -> EvaluationRow:
        """Mark the shard closed (idempotent); the row tells how many ranks have closed."""

    @abstractmethod
    def chunk_records(self, evaluation_id: str) -> list[bytes]:
        """Every committed chunk's records blob of an open evaluation (rank, sequence order)."""

    @abstractmethod
    def finalize(
        self, evaluation_id: str, result: bytes, records: bytes, num_samples: int, keep_latest: int
    ) -> EvaluationRow:
        """Store the result and merged records, mark finalized, drop chunk rows, apply retention."""

    @abstractmethod
    def apply_retention(self, keep_latest: int) -> list[str]:
        """Drop records past retention in every series (not only the one just finalized); their ids.

        Needed at start: a lowered ``retention_keep_latest`` must not wait for
        each series' next finalize to take effect.
        """

    @abstractmethod
    def get(self, evaluation_id: str) -> EvaluationRow | None: ...

    @abstractmethod
    def find(self, run: str, model: str, split: str, step: int | None) -> EvaluationRow | None:
        """The evaluation of (run, model, split, step); step None means the highest step."""

    @abstractmethod
    def list_evaluations(
        self, run: str = "", model: str = "", split: str = "", limit: int = 50, before: int | None = None
    ) -> tuple[list[EvaluationRow], int | None]:
        """Evaluations newest first, filtered by non-empty fields; returns the page and the next cursor."""

    @abstractmethod
    def latest_per_model(self, run: str, split: str) -> list[EvaluationRow]:
        """The finalized evaluation at the highest step of every model of a run on a split."""

    @abstractmethod
    def shards(self, evaluation_id: str) -> list[ShardRow]: ...

    @abstractmethod
    def open_shards(self) -> Iterable[tuple[EvaluationRow, ShardRow]]:
        """Every shard of every evaluation not yet finalized."""

    @abstractmethod
    def set_pinned(self, evaluation_id: str, pinned: bool, keep_latest: int) -> EvaluationRow: ...

    @abstractmethod
    def final_records(self, evaluation_id: str) -> bytes | None:
        """The merged records of a finalized evaluation, or None once retention dropped them."""

    @abstractmethod
    def pending_finalize(self) -> list[EvaluationRow]:
        """Open evaluations whose ranks have all closed (a crash interrupted their finalize)."""

    @abstractmethod
    def latest_finalized(self) -> Iterable[FinalizedView]:
        """The latest finalized evaluation per (run, model, split), newest first (the exporter's view)."""

    @abstractmethod
    def close(self) -> None:
        """Flush pending writes and release files."""
