"""Benchmarks: ``python -m bench`` runs every registered one; ``python -m bench.<name>`` runs one.

Timings belong here, never in tests. Each benchmark writes JSON under
bench/results/ through ``bench.common`` so runs can be compared later.
"""

# name -> module (under bench/) exposing ``main(argv: list[str] | None)``; an int return is an exit status.
BENCHMARKS: dict[str, str] = {
    "engine": "bench.engine",
    "transport": "bench.transport",
    "bootstrap": "bench.bootstrap",
    "e2e": "bench.e2e",
    "client_cost": "bench.client_cost",
    "memory": "bench.memory",
    "load": "bench.load",
    "windows": "bench.windows",
    "records": "bench.records",
    "replicas": "bench.replicas",
    "digest": "bench.digest",
}
