"""CompareModels for people: the verdict first, one compact table, then why metrics disagree;
and a figure (reliability diagrams, NLL against temperature, accuracy by class bucket).

matplotlib is an optional extra (``pip install evalstream[plot]``), imported only by
``plot_comparison``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

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
    "confidently_wrong": "confidently wrong errors",
    "overconfident": "overconfidence",
    "majority_bias": "predicts frequent classes more",
    "unexplained": "no single cause",
}


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
        row = [str(c.rank), name, *[_cell(c.metrics.get(m), f) for m, _, f in columns]]
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
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=follow) or [indent]


def _diagnosis(d: compare_pb2.PairDiagnosis) -> list[str]:
    causes = ", ".join(CAUSE_TEXT.get(c, c) for c in d.causes)
    out = _wrap(f"{d.model_a} (lower loss) vs {d.model_b} (higher accuracy): {causes}")
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
    """Verdict, table, diagnoses, gate reasons and metric agreement, in about 100 columns.

    ``evaluations`` (by evaluation id) is not needed for the text; it is accepted so
    callers can pass the same arguments as to ``plot_comparison``."""
    del evaluations
    names = candidate_names(resp.candidates)
    lines = [*_wrap(resp.verdict), "", *_table(resp, names)]
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
    if resp.diagnoses:
        lines += ["", "Why loss and accuracy disagree:"]
        for d in resp.diagnoses:
            lines += _diagnosis(d)
    agreement = _agreements(resp)
    if agreement:
        lines += ["", *agreement]
    return "\n".join(lines)


def plot_comparison(
    resp: service_pb2.CompareModelsResponse, evaluations: Mapping[str, evaluation_pb2.Evaluation], path: str
) -> None:
    """Write a PNG: reliability diagrams overlaid, NLL against temperature with each T* marked,
    and top-1 accuracy by head / torso / tail bucket, one colour per candidate (best first)."""
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
        temp.annotate(
            f"T*={scan.best_temperature:.2f}",
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
    fig.suptitle(textwrap.shorten(resp.verdict.split(". ")[0], 150), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
