"""Ordering with tolerance ties, secondary metric and name; gating reasons."""

from __future__ import annotations

from evalstream.service.compare.gate import GateSpec, evaluate_gate
from evalstream.service.compare.ranking import competition_ranks, display_names, order_candidates, oriented


def test_primary_then_secondary_then_name() -> None:
    # Oriented (larger is better). b and c tie on primary within tolerance; c wins on secondary.
    primary = [0.5, 0.9, 0.9 + 1e-12, 0.1]
    secondary = [0.0, 0.3, 0.4, 0.9]
    names = ["a", "b", "c", "d"]
    assert order_candidates(primary, secondary, names, 1e-9) == [2, 1, 0, 3]
    # Full tie: name decides, whatever the input order.
    assert order_candidates([1.0, 1.0], [0.2, 0.2], ["zeta", "alpha"], 1e-9) == [1, 0]


def test_nan_ranks_last_and_direction_is_applied() -> None:
    assert oriented(2.0, False) == -2.0
    assert order_candidates([oriented(float("nan"), True), 0.1], [0, 0], ["a", "b"], 0.0) == [1, 0]


def test_competition_ranks_share_within_tolerance() -> None:
    assert competition_ranks([0.9, 0.5, 0.9 - 1e-12, 0.1], 1e-9) == [1, 3, 1, 4]


def test_display_names_are_shortest_unambiguous() -> None:
    assert display_names([("r", "a", 1), ("r", "b", 1)]) == ["a", "b"]
    assert display_names([("r", "a", 1), ("r", "a", 2)]) == ["a@1", "a@2"]
    assert display_names([("r", "a", 1), ("s", "a", 1)]) == ["r/a@1", "s/a@1"]


def test_gate_passes_when_not_worse_by_default() -> None:
    out = evaluate_gate(GateSpec(), "nll", False, {"nll": 1.0}, {"nll": 1.0})
    assert out.passed and out.reasons == []


def test_gate_reasons_name_each_failed_check() -> None:
    spec = GateSpec(
        min_absolute_improvement=0.05,
        min_relative_improvement=0.10,
        upper_bounds={"ece": 0.05},
        lower_bounds={"balanced_accuracy": 0.5},
    )
    cand = {"nll": 1.9, "ece": 0.08, "balanced_accuracy": 0.4}
    out = evaluate_gate(spec, "nll", False, cand, {"nll": 2.0})
    assert not out.passed
    # Improvement 0.1 meets the absolute margin 0.05; the other three checks fail.
    assert len(out.reasons) == 3
    assert not any("needs at least" in r for r in out.reasons)
    assert any("relative improvement 5.00%" in r for r in out.reasons)
    assert any("ece 0.08 exceeds its upper bound 0.05" in r for r in out.reasons)
    assert any("balanced_accuracy 0.4 is below its lower bound 0.5" in r for r in out.reasons)


def test_gate_direction_higher_is_better() -> None:
    spec = GateSpec(min_absolute_improvement=0.01)
    assert evaluate_gate(spec, "accuracy_top1", True, {"accuracy_top1": 0.72}, {"accuracy_top1": 0.70}).passed
    worse = evaluate_gate(spec, "accuracy_top1", True, {"accuracy_top1": 0.69}, {"accuracy_top1": 0.70})
    assert not worse.passed and "needs at least 0.01" in worse.reasons[0]
