"""The store's contract: the domain values it takes and returns, and the ``Store`` interface.

The store owns durable state only: evaluations, shard progress (next sequence
number, committed samples), the per-chunk records of open evaluations, and the
merged records and result of finalized ones. Each method is one atomic step,
so ingest never acknowledges anything the store has not committed. Methods are
blocking; async callers run them in an executor.

Everything here is plain data: no gRPC status, no protobuf message. A result is
the opaque bytes the caller serialized; a refusal is an exception from
``service/store/errors.py``. Limits and retention are given once, at
construction (``StorePolicy``), so every backend applies the same ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from evalstream.service.store.errors import SequenceConflict

OPEN = "open"
FINALIZED = "finalized"
# The reason a chunk is refused when it would take its evaluation over max_samples_per_evaluation.
TOO_LARGE = "evaluation_too_large"


class Closeable(Protocol):
    """Something running that the store's owner stops (a finalization listener)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class StorePolicy:
    """Limits and retention a store applies to every write."""

    # A chunk that would take its evaluation over this many samples is refused (TOO_LARGE).
    max_samples_per_evaluation: int = 1 << 62
    # Per-sample records are kept for the latest N finalized evaluations of each series (and pinned
    # ones); older ones keep their metrics only. 0 keeps all.
    retention_keep_latest: int = 0


@dataclass(frozen=True)
class EvaluationKey:
    run: str
    model: str
    split: str
    step: int

    @property
    def name(self) -> str:
        """run/model/split@step, as messages and logs name an evaluation."""
        return f"{self.run}/{self.model}/{self.split}@{self.step}"


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
    # The result the caller stored at finalize (opaque bytes to the store), once finalized.
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
    """Why a chunk was refused (a stable reason key and a message); kept so a retry hears the same."""

    sequence: int
    reason: str
    message: str


@dataclass(frozen=True)
class ChunkCommit:
    """One chunk as the store takes it: its records, or why it was refused."""

    sequence: int
    samples: int = 0
    records: bytes | None = None
    nll_sum: float = 0.0
    correct: int = 0
    rejection: Rejection | None = None
    # The digest of the chunk's received input (``service/digest.py``), kept to judge a re-sent
    # sequence on any replica; None when the chunk was refused before it decoded.
    digest: bytes | None = None


@dataclass(frozen=True)
class StoredChunk:
    """What committing one chunk left: the shard after it, and the rejection if it was refused."""

    shard: ShardRow
    rejection: Rejection | None = None


class Store(ABC):
    """Durable state of the service. Every write is atomic and durable when it returns.

    Every backend passes ``tests/store/contract``; a method's refusals are the
    ``StoreError`` subclasses its docstring names, and a failed write (no space,
    read-only) is ``StoreFull`` / ``StoreReadOnly`` with nothing of it committed.
    """

    policy: StorePolicy

    @abstractmethod
    def open_shard(self, request: ShardOpenRequest) -> tuple[EvaluationRow, ShardRow]:
        """Create or join the evaluation and create or load the shard.

        Raises ``ShardMismatch`` when world size, class count or score kind
        disagree with the evaluation already open.
        """

    @abstractmethod
    def commit_chunks(
        self, evaluation_id: str, rank: int, chunks: Sequence[ChunkCommit]
    ) -> list[StoredChunk | SequenceConflict]:
        """Commit chunks (a staging block, or one chunk) in sequence order, in one transaction.

        Each chunk's records (or its rejection) is stored together with the
        shard's next sequence; a refused chunk consumes its sequence number and
        changes nothing else. A chunk that would take the evaluation over
        ``policy.max_samples_per_evaluation`` is stored as a rejection
        (``TOO_LARGE``) instead. A ``SequenceConflict`` (a chunk not at the
        shard's next sequence) stops the block: it is the last item, and the
        chunks before it are committed. ``NotWritable`` (closed shard, finalized
        evaluation) and ``NotFound`` commit nothing.
        """

    @abstractmethod
    def rejection(self, evaluation_id: str, rank: int, sequence: int) -> Rejection | None:
        """The stored rejection of a chunk, if it was refused."""

    @abstractmethod
    def chunk_digest(self, evaluation_id: str, rank: int, sequence: int) -> bytes | None:
        """The digest a committed chunk (or refused one) was stored with; None if none was, or the
        chunk rows are gone (dropped at finalize, when the shard is closed and takes nothing)."""

    @abstractmethod
    def close_shard(self, evaluation_id: str, rank: int) -> EvaluationRow:
        """Mark the shard closed (idempotent); the row tells how many ranks have closed."""

    @abstractmethod
    def chunk_records(self, evaluation_id: str) -> list[bytes]:
        """Every committed chunk's records blob of an open evaluation (rank, sequence order)."""

    @abstractmethod
    def finalize(self, evaluation_id: str, result: bytes, records: bytes, num_samples: int) -> EvaluationRow:
        """Store the result and merged records, mark finalized, drop chunk rows, apply retention.

        Exactly once: finalizing an evaluation already finalized keeps what is stored.
        """

    @abstractmethod
    def apply_retention(self) -> list[str]:
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
    def open_shards(self) -> list[tuple[EvaluationRow, ShardRow]]:
        """Every shard of every evaluation not yet finalized."""

    @abstractmethod
    def set_pinned(self, evaluation_id: str, pinned: bool) -> EvaluationRow:
        """Pin (keep records whatever retention says) or unpin, then apply retention to its series."""

    @abstractmethod
    def final_records(self, evaluation_id: str) -> bytes | None:
        """The merged records of a finalized evaluation, or None once retention dropped them."""

    @abstractmethod
    def pending_finalize(self) -> list[EvaluationRow]:
        """Open evaluations whose ranks have all closed (a crash interrupted their finalize)."""

    @abstractmethod
    def latest_finalized(self) -> list[EvaluationRow]:
        """The latest finalized evaluation per (run, model, split), newest first (the exporter reads it)."""

    def finalization_listener(
        self, announce: Callable[[str], None], connected: Callable[[bool], None]
    ) -> Closeable | None:
        """Where other processes finalize this store's evaluations too (replicas), start relaying
        each committed finalization's id to ``announce``, and the listener's connection state to
        ``connected`` (``service/finalizations.py``); the running listener, to close. None (the
        default) where only this process finalizes: its own finalizer's announcements are complete.
        """
        return None

    @abstractmethod
    def close(self) -> None:
        """Flush pending writes and release files."""
