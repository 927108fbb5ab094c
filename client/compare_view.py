"""CompareModels for people: the recommendation first, one compact table, then why metrics
disagree (each cause once) and which classes the recommended model broke; and a figure
(reliability diagrams, NLL against temperature with each T*, accuracy by class bucket) titled
with the recommendation.

matplotlib is an optional extra (``pip install evalstream[plot]``), imported only by
``plot_comparison``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from evalstream.v1 import compare_pb2, evaluation_pb2, service_pb2

WIDTH = 100
# Headline columns after the primary metric: (metric, header, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("nll", "NLL", "{:.4f}"),
    ("accuracy_top1", "acc@1", "pct"),
    ("balanced_accuracy", "bal.acc", "pct"),
    ("ece", "ECE", "{:.4f}"),
    ("best_temperature", "T*", "{:.2f}"),
    ("calibrated_nll", "NLL@T*", "{:.4f}"),
)
CAUSE_TEXT = {
    "confidence_scale": "confidence scale (temperature scaling fixes the loss gap)",
    "low_confidence_correct": "right with low confidence",
    "confidently_wrong": "confidently wrong errors",
    "underconfident": "under-confident",
    "overconfident": "over-confident",
    "majority_bias": "predicts frequent classes more",
    "unexplained": "no single cause",
}
# Rows of the per-class table in the text (--json has every class).
CLASS_ROWS = 10


def candidate_names(candidates: Sequence[compare_pb2.CandidateResult]) -> list[str]:
    """Shortest unambiguous name: model, else model@step, else run/model@step."""
    keys = [(c.ref.run, c.ref.model, c.ref.step) for c in candidates]
    for form in (lambda r, m, s: m, lambda r, m, s: f"{m}@{s}", lambda r, m, s: f"{r}/{m}@{s}"):
        names = [form(*k) for k in keys]
        if len(set(names)) == len(names):
            return names
    return [c.evaluation_id for c in candidates]


def _cell(value: float | None, fmt: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value:.1f}%" if fmt == "pct" else fmt.format(value)


def _metric_cell(metrics: Mapping[str, float], name: str, fmt: str) -> str:
    """One table cell; a T* beyond the temperature grid shows as its bound ("<0.05", ">20")."""
    text = _cell(metrics.get(name), fmt)
    side = metrics.get("temperature_beyond_grid", 0.0) if name == "best_temperature" else 0.0
    return f"{'>' if side > 0 else '<'}{metrics[name]:g}" if side and text != "-" else text


def _p_value(c: compare_pb2.CandidateResult) -> str:
    p = c.mcnemar_p_value
    if math.isnan(p):
        return "-"
    return "<1e-6" if p < 1e-6 else f"{p:.3g}"


def _difference(c: compare_pb2.CandidateResult, rank: int) -> str:
    if rank == 1:
        return "best"
    if not c.HasField("primary_difference"):
        return "not tested"
    iv = c.primary_difference
    mark = " *" if c.distinguishable_from_best else ""
    return f"{iv.estimate:+.4f} [{iv.lower:+.4f}, {iv.upper:+.4f}]{mark}"


def _table(resp: service_pb2.CompareModelsResponse, names: list[str]) -> list[str]:
    primary = resp.primary_metric
    columns = [(primary, primary, "{:.4f}")] + [c for c in COLUMNS if c[0] != primary]
    level = next(
        (c.primary_difference.level for c in resp.candidates if c.HasField("primary_difference")), 0.95
    )
    gated = any(c.HasField("gate") for c in resp.candidates)
    header = [
        "#",
        "model",
        *[h for _, h, _ in columns],
        f"Δ{primary} vs best [{100 * level:g}% CI]",
        "McNemar p",
    ]
    header += ["samples"] + (["gate"] if gated else [])
    rows = [header]
    for c, name in zip(resp.candidates, names, strict=True):
        row = [str(c.rank), name, *[_metric_cell(c.metrics, m, f) for m, _, f in columns]]
        row += [_difference(c, c.rank), _p_value(c), f"{c.samples_used:,}" if c.samples_used else "-"]
        if gated:
            row.append(("pass" if c.gate.passed else "FAIL") if c.HasField("gate") else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _wrap(text: str, indent: str = "") -> list[str]:
    follow = " " * len(indent) if indent else "  "
    wrapped = textwrap.wrap(
        text, WIDTH, initial_indent=indent, subsequent_indent=follow, break_on_hyphens=False
    )
    return wrapped or [indent]


def _diagnosis(d: compare_pb2.PairDiagnosis, full: bool) -> list[str]:
    """A disagreeing pair: its causes and flips in one line, with every finding when ``full``."""
    causes = ", ".join(CAUSE_TEXT.get(c, c) for c in d.causes)
    head = f"{d.model_a} (lower loss) vs {d.model_b} (higher accuracy): {causes}"
    if d.paired and not full:
        f = d.flips
        head += (
            f"; flips: {d.model_a} alone right on {f.a_right_b_wrong:,}, {d.model_b} on {f.b_right_a_wrong:,}"
        )
    out = _wrap(head)
    if not full:
        return out
    for finding in d.findings:
        out += _wrap(finding, "  - ")
    if d.paired:
        f = d.flips
        out += _wrap(
            f"flips: {d.model_a} alone right on {f.a_right_b_wrong:,} samples (its confidence "
            f"{f.a_confidence_on_a_wins:.2f}), {d.model_b} alone right on {f.b_right_a_wrong:,} "
            f"(confidence {f.b_confidence_on_b_wins:.2f})",
            "  - ",
        )
    return out


def _pair_groups(diagnoses: Sequence[compare_pb2.PairDiagnosis]) -> list[str]:
    """Pairs with the same causes under one line naming the causes once; flips per pair."""
    groups: dict[tuple[str, ...], list[compare_pb2.PairDiagnosis]] = {}
    for d in diagnoses:
        groups.setdefault(tuple(d.causes), []).append(d)
    out = []
    for causes, pairs in groups.items():
        out += _wrap(", ".join(CAUSE_TEXT.get(c, c) for c in causes) + ":", "  ")
        for d in pairs:
            text = f"{d.model_a} (lower loss) vs {d.model_b} (higher accuracy)"
            if d.paired:
                f = d.flips
                text += f"; alone right: {d.model_a} {f.a_right_b_wrong:,}, {d.model_b} {f.b_right_a_wrong:,}"
            out += _wrap(text, "    ")
    return out


def _class_regressions(resp: service_pb2.CompareModelsResponse) -> list[str]:
    """One summary line per other model, then the CLASS_ROWS largest-support regressions of all."""
    found = list(resp.class_regressions)
    if not found:
        return []
    first = found[0]
    lines = [
        f"Per-class recall of {first.model} (top-1, shared samples; McNemar per class, "
        f"Benjamini-Hochberg at {100 * first.fdr_level:g}%):"
    ]
    rows = []
    for r in found:
        lines += _wrap(
            f"vs {r.other}: {r.worse} classes worse, {r.better} better, of {r.classes_tested:,} testable",
            "  ",
        )
        rows += [(r.other, ch) for ch in r.changes if ch.recall < ch.other_recall]
    rows.sort(key=lambda x: (-x[1].support, x[1].class_index))
    if rows:
        header = ["class", "support", f"recall {first.model}", "recall other", "other", "q"]
        table = [header] + [
            [
                str(ch.class_index),
                f"{ch.support:,}",
                f"{100 * ch.recall:.1f}%",
                f"{100 * ch.other_recall:.1f}%",
                other,
                f"{ch.q_value:.2g}",
            ]
            for other, ch in rows[:CLASS_ROWS]
        ]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        shown = min(len(rows), CLASS_ROWS)
        lines.append(f"  regressions, largest support first ({shown} of {len(rows)}; --json lists all):")
        lines += [
            "    "
            + "  ".join(
                v.ljust(w) if i == 4 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in table
        ]
    return lines


def _headline(resp: service_pb2.CompareModelsResponse, names: list[str]) -> list[str]:
    """The recommendation first ("on"), or the primary ranking then the advice ("advisory");
    without a recommendation the verdict paragraph."""
    if not resp.HasField("recommendation"):
        return _wrap(resp.verdict)
    rec = resp.recommendation
    if rec.mode == compare_pb2.RECOMMENDATION_MODE_ADVISORY:
        best = f"{names[0]} is best by {resp.primary_metric} (the primary metric decides)."
        return [*_wrap(best), *_wrap(f"Advice: {rec.text}")]
    return _wrap(f"Recommendation: {rec.text}")


def _agreements(resp: service_pb2.CompareModelsResponse) -> list[str]:
    """Kendall's tau of every headline metric with the primary one (or the first listed): one line."""
    if not resp.agreements:
        return []
    if all(a.kendall_tau == 1.0 for a in resp.agreements):
        return ["Every headline metric ranks the candidates the same way (Kendall's tau = 1)."]
    names = {a.metric_a for a in resp.agreements} | {a.metric_b for a in resp.agreements}
    anchor = resp.primary_metric if resp.primary_metric in names else resp.agreements[0].metric_a
    taus = [
        (a.metric_b if a.metric_a == anchor else a.metric_a, a.kendall_tau)
        for a in resp.agreements
        if anchor in (a.metric_a, a.metric_b)
    ]
    agree = [f"{m} {t:+.2f}" for m, t in sorted(taus, key=lambda x: -x[1])]
    return _wrap(f"Kendall's tau with {anchor}'s ranking (+1 agrees, -1 reversed): " + ", ".join(agree))


def render_comparison(
    resp: service_pb2.CompareModelsResponse,
    evaluations: Mapping[str, evaluation_pb2.Evaluation] | None = None,
) -> str:
    """Recommendation first, then the table, gate reasons, causes, disagreeing pairs, per-class
    regressions and metric agreement, in about 100 columns (the verdict first when there is no
    recommendation).

    ``evaluations`` (by evaluation id) is not needed for the text; it is accepted so
    callers can pass the same arguments as to ``plot_comparison``."""
    del evaluations
    names = candidate_names(resp.candidates)
    lines = [*_headline(resp, names), "", *_table(resp, names)]
    mode = (
        f"paired on {resp.common_samples:,} common samples"
        if resp.paired
        else "unpaired (no shared sample ids)"
    )
    lines.append(
        f"* distinguishable from the best; bootstrap {mode}, {resp.bootstrap_replicates:,} replicates, "
        f"seed {resp.seed}"
    )
    for c, name in zip(resp.candidates, names, strict=True):
        if c.HasField("gate") and not c.gate.passed:
            lines += _wrap(f"gate: {name} fails: " + "; ".join(c.gate.reasons))
    # With a recommendation the verdict is not printed whole: its causes are listed here instead.
    full = not resp.HasField("recommendation")
    if resp.causes and not full:
        lines += ["", "Causes (each defined by its number in docs/compare.md):"]
        for cause in resp.causes:
            lines += _wrap(f"{cause.name}: {cause.finding}", "  - ")
    if resp.diagnoses:
        lines += ["", "Where loss and accuracy disagree:"]
        if full:
            for d in resp.diagnoses:
                lines += _diagnosis(d, full)
        else:
            lines += _pair_groups(resp.diagnoses)
    regressions = _class_regressions(resp)
    if regressions:
        lines += ["", *regressions]
    agreement = _agreements(resp)
    if agreement:
        lines += ["", *agreement]
    return "\n".join(lines)


def plot_comparison(
    resp: service_pb2.CompareModelsResponse, evaluations: Mapping[str, evaluation_pb2.Evaluation], path: str
) -> None:
    """Write ``comparison_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = comparison_figure(resp, evaluations)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_figure(
    resp: service_pb2.CompareModelsResponse, evaluations: Mapping[str, evaluation_pb2.Evaluation]
) -> Any:
    """A matplotlib Figure titled with the recommendation: reliability diagrams overlaid, NLL
    against temperature with each T* marked (star and dashed line), and top-1 accuracy by head /
    torso / tail bucket, one colour per candidate (best first). The caller closes it."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("plotting needs matplotlib: pip install 'evalstream[plot]'") from err

    names = candidate_names(resp.candidates)
    results = [evaluations[c.evaluation_id].result for c in resp.candidates if c.evaluation_id in evaluations]
    shown = [n for c, n in zip(resp.candidates, names, strict=True) if c.evaluation_id in evaluations]
    if not results:
        raise ValueError("plot_comparison needs the candidates' evaluations (keyed by evaluation id)")
    fig, (rel, temp, buck) = plt.subplots(1, 3, figsize=(16, 5))
    palette = plt.get_cmap("tab10")
    colours = [palette(i) for i in range(10)]
    rel.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfectly calibrated")
    for i, (name, result) in enumerate(zip(shown, results, strict=True)):
        colour = colours[i % len(colours)]
        bins = [b for b in result.calibration.bins if b.count > 0]
        ece = result.calibration.ece
        rel.plot(
            [b.mean_confidence for b in bins],
            [b.accuracy for b in bins],
            marker="o",
            color=colour,
            label=f"{name} (ECE {ece:.3f})",
        )
        scan = result.temperature
        temp.plot(list(scan.temperatures), list(scan.nll), marker=".", color=colour, label=name)
        temp.plot(
            [scan.best_temperature],
            [scan.calibrated_nll],
            marker="*",
            markersize=14,
            color=colour,
            linestyle="",
        )
        temp.axvline(scan.best_temperature, color=colour, linestyle="--", linewidth=0.8)
        temp.annotate(
            f"T*{'>' if scan.beyond_grid > 0 else '<' if scan.beyond_grid < 0 else '='}"
            f"{scan.best_temperature:.2f}",
            (scan.best_temperature, scan.calibrated_nll),
            textcoords="offset points",
            xytext=(4, 8),
            color=colour,
        )
    rel.set(
        title="Reliability (top-1)", xlabel="mean confidence in bin", ylabel="accuracy in bin", xlim=(0, 1)
    )
    rel.set_ylim(0, 1)
    rel.legend(loc="upper left", fontsize="small")
    temp.set_xscale("log")
    ticks = [t for t in (0.25, 0.5, 1.0, 2.0, 4.0) if any(t in r.temperature.temperatures for r in results)]
    temp.set_xticks(ticks, [f"{t:g}" for t in ticks])
    temp.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    temp.axvline(1.0, color="0.6", linestyle=":")
    temp.set(title="NLL against temperature (★ = T*)", xlabel="temperature T", ylabel="NLL (nats)")
    temp.legend(fontsize="small")
    bucket_names = ["head", "torso", "tail"]
    width = 0.8 / len(results)
    for i, (name, result) in enumerate(zip(shown, results, strict=True)):
        acc = {b.name: b.accuracy for b in result.imbalance.buckets}
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(3)]
        buck.bar(
            xs, [acc.get(b, 0.0) for b in bucket_names], width, color=colours[i % len(colours)], label=name
        )
    buck.set_xticks(range(3), [f"{b}\n(frequent)" if b == "head" else b for b in bucket_names])
    buck.set(title="Top-1 accuracy by class frequency", ylabel="accuracy")
    buck.legend(fontsize="small")
    title = resp.recommendation.text if resp.HasField("recommendation") else resp.verdict.split(". ")[0]
    fig.suptitle("\n".join(textwrap.wrap(textwrap.shorten(title, 300), 150)), fontsize="medium")
    fig.tight_layout()
    return fig
