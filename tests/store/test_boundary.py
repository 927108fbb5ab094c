"""The store speaks the domain's language: no gRPC or protobuf under service/store/, and every
refusal it raises has exactly one status, decided in ``service/errors.py``."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import grpc
import pytest

from evalstream.service.errors import status_of
from evalstream.service.store import errors as store_errors

STORE = Path(__file__).resolve().parents[2] / "service" / "store"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("path", sorted(STORE.glob("*.py")), ids=lambda p: p.name)
def test_no_grpc_or_protobuf_under_the_store(path: Path) -> None:
    bad = {
        n
        for n in _imports(path)
        if n.split(".")[0] in ("grpc", "google")
        or n.endswith("_pb2")
        or ".v1." in n
        or n.endswith(".v1")
        or (n.startswith("evalstream.service.") and not n.startswith("evalstream.service.store"))
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize(
    ("refusal", "code", "words"),
    [
        (store_errors.NotFound("e1"), grpc.StatusCode.NOT_FOUND, "no evaluation with id 'e1'"),
        (store_errors.NotFound("e1", 3), grpc.StatusCode.NOT_FOUND, "no shard for rank 3; open it first"),
        (
            store_errors.ShardMismatch("r/m/validation@0", "world_size", 2, 3),
            grpc.StatusCode.FAILED_PRECONDITION,
            "opened with world_size=2, this shard says 3; every rank must send the same world size",
        ),
        (
            store_errors.ShardMismatch("r/m/validation@0", "num_classes", 10, 11),
            grpc.StatusCode.FAILED_PRECONDITION,
            "every rank must send the same class count",
        ),
        (
            store_errors.NotWritable("e1", 0, finalized=True),
            grpc.StatusCode.FAILED_PRECONDITION,
            "is finalized; no more chunks are accepted (use a new step)",
        ),
        (store_errors.NotWritable("e1", 2, finalized=False), grpc.StatusCode.FAILED_PRECONDITION, "rank 2"),
        (
            store_errors.StoreFull("database or disk is full"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "out of space",
        ),
        (store_errors.StoreReadOnly("SQLITE_READONLY"), grpc.StatusCode.UNAVAILABLE, "cannot be written"),
        (OSError(errno.ENOSPC, "No space left on device"), grpc.StatusCode.RESOURCE_EXHAUSTED, "free space"),
        (OSError(errno.EROFS, "Read-only file system"), grpc.StatusCode.UNAVAILABLE, "data_dir is writable"),
    ],
)
def test_each_store_refusal_has_one_status(refusal: BaseException, code: grpc.StatusCode, words: str) -> None:
    got, message = status_of(refusal)
    assert got == code and words in message, message
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        assert "chunks acknowledged before are kept" in message
