"""One import identity: the source folders service/ and client/ are only evalstream.service and
evalstream.client, never top-level ``service`` / ``client`` modules that would hold second copies
of every class (an ``except ChunkError`` that misses the other ChunkError)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import evalstream.service.engine.errors as errors

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["service", "service.engine.errors", "client", "client.stream"])
def test_source_folders_cannot_be_imported_by_their_folder_name(name: str) -> None:
    # The repository root is on sys.path here (pytest puts it there for the tests package).
    assert str(ROOT) in sys.path or "" in sys.path or any(Path(p).resolve() == ROOT for p in sys.path)
    with pytest.raises(ImportError, match="import it by that name"):
        importlib.import_module(name)


def test_an_engine_error_is_one_class_wherever_it_is_caught() -> None:
    from evalstream.service.engine import reducer

    assert reducer.ChunkError is errors.ChunkError
    assert Path(errors.__file__).resolve() == ROOT / "service" / "engine" / "errors.py"


def test_no_symlinks_are_tracked() -> None:
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True)
    if staged.returncode != 0:
        pytest.skip("not a git checkout")
    links = [line.split("\t", 1)[1] for line in staged.stdout.splitlines() if line.startswith("120000")]
    assert links == []


def test_tests_import_no_bare_source_or_support_names() -> None:
    """tests/ names its own helpers tests.support..., never ``support`` / ``client`` / ``service``."""
    bare = ("support", "client", "service", "faults", "engine", "compare")
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from") and words[1].split(".")[0] in bare:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
