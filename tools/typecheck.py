"""Type-check the project as it is installed: ``evalstream.service`` and ``evalstream.client``.

The sources live in the top-level folders ``service/`` and ``client/``, which setuptools installs as
``evalstream.service`` and ``evalstream.client`` (``package-dir`` in pyproject.toml). mypy cannot
see that mapping (it reads files, not import hooks), so this builds the installed layout out of
links under ``build/typecheck/`` (a build output, never committed), runs mypy there with the
project's configuration, and prints every path as the source path a reader opens.

    python tools/typecheck.py            # what `make typecheck` runs
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"
# installed path -> source path, for everything mypy checks (pyproject's [tool.mypy] files).
LAYOUT = {
    "evalstream/service": "service",
    "evalstream/client": "client",
    "evalstream/__init__.py": "evalstream/__init__.py",
    "evalstream/cli.py": "evalstream/cli.py",
    "evalstream/wire": "evalstream/wire",
    "evalstream/py.typed": "evalstream/py.typed",
    "evalstream/v1": "evalstream/v1",
    "tests": "tests",
    "bench": "bench",
    "examples": "examples",
    "tools": "tools",
    "pyproject.toml": "pyproject.toml",
}


def build_tree() -> None:
    shutil.rmtree(TREE, ignore_errors=True)
    for installed, source in LAYOUT.items():
        link = TREE / installed
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT / source)


def main() -> int:
    build_tree()
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *sys.argv[1:]], cwd=TREE, capture_output=True, text=True
    )
    out = proc.stdout.replace("evalstream/service/", "service/").replace("evalstream/client/", "client/")
    sys.stdout.write(out)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
