"""Bad input tried systematically, property tests, a bounded fuzzer, resource limits and a small load
test (docs/reliability.md)."""
