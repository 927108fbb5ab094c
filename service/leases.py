"""The lease table: which stream holds which rank, within the server's and each peer's limits.

One stream holds a rank at a time; a second open of the same rank is ABORTED
until the first stream's lease is dropped, which happens only after its last
commit landed (so a reconnecting stream resumes from a settled shard). Used
from the event loop only. With replicas on one database the same hold is also
kept in the database (``OwningStore``), so a second stream on another replica
hears the same refusal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from evalstream.service.errors import Aborted, ResourceExhausted, ServiceError
from evalstream.service.store.base import EvaluationKey, ShardRow

if TYPE_CHECKING:
    from evalstream.service.shard_writer import ShardWriter

Slot = tuple[EvaluationKey, int]


@dataclass
class Lease:
    """One stream's hold on one rank of one evaluation, and where that shard stands."""

    evaluation_id: str
    key: EvaluationKey
    rank: int
    world_size: int
    num_classes: int
    score_kind: str
    peer: str
    next_sequence: int
    samples: int
    chunks: int
    rejected: int
    closed: bool = False
    # Chunks accepted for processing (>= next_sequence while some are in flight).
    accepted: int = 0
    # Stages, reduces and commits this stream's chunks in order (set when the lease is granted).
    writer: ShardWriter | None = field(default=None, repr=False)
    # Where this shard's scores are reduced: "server" (Chunk messages) or "client" (RecordsChunk).
    reduce: str = "server"
    # Set when the stream must stop (a re-sent sequence with other content, the shard changed under
    # it): every later chunk and the close get this error, and nothing more of the stream commits.
    broken: ServiceError | None = None
    # This stream's hold on the rank in a store shared by replicas ("" with the embedded store).
    owner_token: str = ""

    def __post_init__(self) -> None:
        self.accepted = max(self.accepted, self.next_sequence)

    @property
    def slot(self) -> Slot:
        return (self.key, self.rank)

    @property
    def name(self) -> str:
        return f"{self.key.name} rank {self.rank}"

    def advance(self, shard: ShardRow) -> None:
        """The shard as the store committed it."""
        self.next_sequence = shard.next_sequence
        self.samples = shard.samples
        self.chunks = shard.chunks
        self.rejected = shard.rejected_chunks
        self.accepted = max(self.accepted, shard.next_sequence)


def held(key: EvaluationKey, rank: int) -> Aborted:
    """The refusal of a second open of a rank while a stream holds it, on this replica or another."""
    return Aborted(
        f"rank {rank} of {key.name} is held by another open stream; "
        "retry once that stream has ended (a dropped connection is noticed within seconds)"
    )


@runtime_checkable
class OwningStore(Protocol):
    """A store shared by replicas that keeps which stream owns a rank (``postgres_ownership.py``).

    The lease table above holds a rank within one process; with several replicas the second stream
    may reach another process, so the hold must also live in the shared store.
    """

    def acquire_shard(self, evaluation_id: str, rank: int, token: str) -> ShardRow | None:
        """Own the rank for the stream ``token``; the shard as it stands, or None if a live stream
        (of another replica) owns it."""
        ...

    def release_shard(self, evaluation_id: str, rank: int, token: str) -> None:
        """Give the rank up (idempotent)."""
        ...

    def shard_lost(self, token: str) -> bool:
        """Whether the stream ``token`` lost its hold (not renewed in time, then taken over)."""
        ...


class SharedHolds:
    """The ranks' holds in a store shared by replicas, beside this process's lease table.

    The lease table still decides first (and alone among this process's streams); the store's hold
    then decides among replicas, with the same refusal.
    """

    def __init__(
        self,
        store: OwningStore,
        in_io: Callable[..., Awaitable[Any]],
        track: Callable[[asyncio.Future[Any]], asyncio.Future[Any]],
    ) -> None:
        self._store = store
        self._in_io = in_io
        self._track = track

    async def take(self, key: EvaluationKey, rank: int, evaluation_id: str, token: str) -> ShardRow:
        """Hold the rank for the stream ``token``; the shard as it stands once held.

        ABORTED, as on one replica, while a live stream of another replica holds it. The taking runs
        to its end even if the open is cancelled, and a hold it took is then given back.
        """
        taking = self._track(
            asyncio.ensure_future(self._in_io(self._store.acquire_shard, evaluation_id, rank, token))
        )
        try:
            owned: ShardRow | None = await asyncio.shield(taking)
        except BaseException:
            taking.add_done_callback(lambda _f: self.give_back(evaluation_id, rank, token))
            raise
        if owned is None:
            raise held(key, rank)
        return owned

    def give_back(self, evaluation_id: str, rank: int, token: str) -> None:
        """Release the hold of ``token`` in the background (nothing without a token)."""
        if token:
            self._track(
                asyncio.ensure_future(self._in_io(self._store.release_shard, evaluation_id, rank, token))
            )

    def check(self, lease: Lease) -> None:
        """A stream whose hold another replica's stream took over (it could not be renewed in time)
        stops (its next chunk gets ABORTED), as the second of two streams on one replica would
        never have started."""
        token = lease.owner_token
        if lease.broken is None and token and self._store.shard_lost(token):
            lease.broken = Aborted(
                f"rank {lease.rank} of {lease.key.name} was taken over by another stream while this "
                "server could not renew its hold; reopen it"
            )


class LeaseTable:
    """Leases by (evaluation key, rank), and how many each peer holds."""

    def __init__(self, max_open: int, max_per_peer: int) -> None:
        self.max_open = max_open
        self.max_per_peer = max_per_peer
        self._leases: dict[Slot, Lease | None] = {}
        self._per_peer: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def reserve(self, slot: Slot, peer: str) -> None:
        """Hold the slot while the store answers the open; refused when held or over a limit."""
        key, rank = slot
        if slot in self._leases:
            raise held(key, rank)
        if len(self._leases) >= self.max_open:
            raise ResourceExhausted(
                f"this server already streams {len(self._leases)} shards (max_open_shards="
                f"{self.max_open}); retry later or raise the limit"
            )
        if self._per_peer.get(peer, 0) >= self.max_per_peer:
            raise ResourceExhausted(
                f"this connection already streams {self._per_peer[peer]} shards "
                f"(max_open_shards_per_connection={self.max_per_peer}); close some first"
            )
        self._leases[slot] = None
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1

    def grant(self, lease: Lease) -> None:
        """The reserved slot now belongs to ``lease``."""
        self._leases[lease.slot] = lease

    def holds(self, lease: Lease) -> bool:
        return self._leases.get(lease.slot) is lease

    def drop(self, slot: Slot, peer: str) -> None:
        """Free the slot (idempotent)."""
        if slot not in self._leases:
            return
        del self._leases[slot]
        left = self._per_peer.get(peer, 0) - 1
        if left > 0:
            self._per_peer[peer] = left
        else:
            self._per_peer.pop(peer, None)
