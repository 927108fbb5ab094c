"""docs/architecture.md is the map a newcomer reads first: it must name every module and no ghost.

The layout block names a module by its path (``service/ingest.py``), by its name under the folder
line above it (``  fused.py`` under ``service/engine/``), or, in the compact lines, by its stem
(``core`` under ``service/compare/``, on a line naming no ``.py``). A line starting at column 0
sets the folder.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def _layout() -> list[tuple[str, str]]:
    """(folder, line) for every line of the fenced layout block at the top of the document."""
    match = re.search(r"```\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/architecture.md has no layout block"
    out, folder = [], ""
    for line in match.group(1).splitlines():
        if line and not line[0].isspace():
            first = line.split()[0]
            folder = first if first.endswith("/") else first.rsplit("/", 1)[0] + "/"
        out.append((folder, line))
    return out


def _named_files() -> set[str]:
    """Every ``*.py`` the block names, as a path from the repository root."""
    out = set()
    for folder, line in _layout():
        for token in re.findall(r"[\w/]+\.py\b", line):
            out.add(token if "/" in token else folder + token)
    return out


def _modules() -> list[str]:
    return [
        str(path.relative_to(ROOT))
        for top in ("service", "client")
        for path in sorted((ROOT / top).rglob("*.py"))
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    ]


def test_every_service_and_client_module_is_listed() -> None:
    words: dict[str, set[str]] = defaultdict(set)
    for folder, line in _layout():
        if ".py" not in line:  # a compact line of stems; elsewhere a stem is just a word ("fused pass")
            words[folder].update(re.findall(r"\w+", line))
    named = _named_files()
    missing = [
        m for m in _modules() if m not in named and Path(m).stem not in words[str(Path(m).parent) + "/"]
    ]
    assert not missing, f"docs/architecture.md does not list {missing}"


def test_every_listed_file_exists() -> None:
    gone = sorted(p for p in _named_files() if not (ROOT / p).exists())
    assert not gone, f"docs/architecture.md lists files that do not exist: {gone}"
