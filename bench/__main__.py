"""Run every registered benchmark (or the ones named on the command line)."""

from __future__ import annotations

import importlib
import sys

from bench import BENCHMARKS


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; registered: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    status = 0
    for name in names:
        print(f"== {name} ==")
        result = importlib.import_module(BENCHMARKS[name]).main([])
        # A benchmark's main returns an exit status (int) or its results (anything else: success).
        if isinstance(result, int) and not isinstance(result, bool):
            status |= result
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
