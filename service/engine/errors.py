"""Typed errors for bad chunks: the servicer maps ``reason`` to a gRPC status and a metric label."""

from __future__ import annotations


class ChunkError(ValueError):
    """A chunk the engine refuses. Raised before any state changes.

    ``reason`` is a short stable key ("label_out_of_range", "non_finite", ...)
    used as a Prometheus label value and in the in-band rejection; the message
    says what was wrong, where, and what to do.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
