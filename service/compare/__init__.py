"""CompareModels: which of several evaluated models is better, whether the difference is real,
and why loss and accuracy disagree. Pure: records and metrics in, a response message out.

``compare_models`` is what the servicer calls; ``compare`` returns the same
comparison as dataclasses. Errors are ``CompareError(code, message)`` with a
gRPC status name as the code. See docs/compare.md for the method.
"""

from __future__ import annotations

from evalstream.service.compare.core import compare
from evalstream.service.compare.inputs import CandidateInput, CompareError, CompareOptions
from evalstream.service.compare.result import CandidateOutcome, Comparison
from evalstream.service.compare.to_proto import to_response
from evalstream.v1 import service_pb2


def compare_models(
    candidates: list[CandidateInput], options: CompareOptions, baseline: CandidateInput | None = None
) -> service_pb2.CompareModelsResponse:
    """Rank the candidates, test their differences to the best, gate them against the baseline
    and diagnose every pair that loss and accuracy rank differently."""
    return to_response(compare(candidates, options, baseline))


__all__ = [
    "CandidateInput",
    "CandidateOutcome",
    "CompareError",
    "CompareOptions",
    "Comparison",
    "compare",
    "compare_models",
]
