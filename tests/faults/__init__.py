"""Fault injection: real server processes on loopback, killed, cut off and starved, then checked
against the engine's result on exactly the data sent (see docs/reliability.md)."""
