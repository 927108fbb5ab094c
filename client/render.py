"""Plain-text views for a terminal: one evaluation (``show``), many (``list``), and a progress bar.

Fixed-width tables with no dependencies, so the output reads the same in a
terminal, a CI log or a pasted issue comment.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from evalstream.v1 import evaluation_pb2

_STATE: dict[int, str] = {
    evaluation_pb2.EVALUATION_STATE_OPEN: "open",
    evaluation_pb2.EVALUATION_STATE_FINALIZED: "finalized",
}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    out = [line(list(headers)), indent + "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _when(ts: object) -> str:
    seconds = getattr(ts, "seconds", 0)
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def state_name(state: int) -> str:
    return _STATE.get(state, "unknown")


def render_list(evaluations: Sequence[evaluation_pb2.Evaluation]) -> str:
    """One row per evaluation: identity, progress, headline metrics."""
    if not evaluations:
        return "no evaluations"
    rows: list[list[object]] = []
    for e in evaluations:
        finalized = e.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
        m: dict[str, object] = dict(e.result.metrics) if finalized else {}
        rows.append(
            [
                e.key.run,
                e.key.model,
                e.key.split or "validation",
                e.key.step,
                state_name(e.state),
                f"{e.ranks_closed}/{e.world_size}",
                e.num_samples,
                m.get("nll", "-"),
                m.get("accuracy_top1", "-"),
                m.get("ece", "-"),
                _when(e.finalized_at if finalized else e.created_at),
            ]
        )
    headers = ["run", "model", "split", "step", "state", "ranks", "samples", "nll", "acc@1", "ece", "time"]
    return table(headers, rows, indent="")


def render_evaluation(e: evaluation_pb2.Evaluation, max_bins: int = 20, max_confusions: int = 5) -> str:
    """A readable report of one evaluation: loss, accuracy, calibration, imbalance, temperature."""
    head = (
        f"{e.key.run} / {e.key.model}  split={e.key.split or 'validation'}  step={e.key.step}  "
        f"state={state_name(e.state)}  ranks={e.ranks_closed}/{e.world_size}  samples={e.num_samples}  "
        f"classes={e.num_classes}  id={e.evaluation_id}"
    )
    if e.state != evaluation_pb2.EVALUATION_STATE_FINALIZED:
        return head + "\n\nnot finalized yet: metrics appear when every rank has closed (or on finalize)"
    r = e.result
    sections = [head]
    if r.duplicates_dropped:
        sections.append(f"({r.duplicates_dropped} duplicate sample ids dropped)")
    if r.tie_warning_share and r.label_tie_share > r.tie_warning_share:
        sections.append(tie_warning(r))
    sections.append(_loss(r))
    sections.append(_accuracy(r))
    sections.append(_calibration(r, max_bins))
    sections.append(_imbalance(r, max_confusions))
    sections.append(_temperature(r))
    return "\n\n".join(sections)


def tie_warning(r: evaluation_pb2.EvaluationResult) -> str:
    """The line that flags heavy ties at the label's score (usually a numerical problem upstream)."""
    return (
        f"WARNING: {r.label_tie_share:.1%} of samples had their label's score exactly tied with another "
        f"class (above {r.tie_warning_share:.0%}): saturated, quantized or collapsed scores? Accuracies "
        "count ties as random tie-breaking would (docs/metrics.md, Ties)."
    )


def _loss(r: evaluation_pb2.EvaluationResult) -> str:
    loss = r.loss
    rows: list[list[object]] = [
        ["mean", loss.mean],
        ["p50 / p90 / p99", f"{loss.p50:.4f} / {loss.p90:.4f} / {loss.p99:.4f}"],
        ["mean on top-1 correct", loss.mean_correct],
        ["mean on top-1 wrong", loss.mean_wrong],
        ["share of loss from wrong", loss.share_wrong],
    ]
    return "Loss (NLL, nats)\n" + table(["", "value"], rows)


def _accuracy(r: evaluation_pb2.EvaluationResult) -> str:
    rows: list[list[object]] = [[f"top-{t.k}", t.accuracy] for t in r.top_k]
    return "Accuracy\n" + table(["", "value"], rows)


def _calibration(r: evaluation_pb2.EvaluationResult, max_bins: int) -> str:
    c = r.calibration
    rows: list[list[object]] = [
        ["ECE", c.ece],
        ["RMS calibration error", c.rms_ce],
        ["MCE", c.mce],
        ["adaptive ECE", c.adaptive_ece],
        ["mean confidence", c.mean_confidence],
        ["overconfidence (conf - acc)", c.overconfidence],
        ["Brier", r.brier],
        ["entropy (nats)", r.entropy],
    ]
    out = f"Calibration ({c.num_bins} bins, {c.bin_edges or '(lo, hi]'})\n" + table(["", "value"], rows)
    bins = [b for b in c.bins if b.count][:max_bins]
    if bins:
        bin_rows = [
            [
                f"({b.lower:.2f}, {b.upper:.2f}]",
                b.count,
                b.mean_confidence,
                b.accuracy,
                b.mean_confidence - b.accuracy,
            ]
            for b in bins
        ]
        out += "\n\n  Reliability (non-empty bins)\n" + table(
            ["confidence", "count", "mean conf", "accuracy", "gap"], bin_rows, indent="  "
        )
    return out


def _imbalance(r: evaluation_pb2.EvaluationResult, max_confusions: int) -> str:
    im = r.imbalance
    rows: list[list[object]] = [
        ["balanced accuracy", im.balanced_accuracy],
        ["macro precision", im.macro_precision],
        ["macro F1", im.macro_f1],
        ["classes present", f"{im.classes_present} of {r.num_classes}"],
        ["prediction shift (TV)", im.prediction_shift_tv],
    ]
    out = "Class imbalance\n" + table(["", "value"], rows)
    if im.buckets:
        out += "\n\n" + table(
            ["bucket", "classes", "samples", "accuracy"],
            [[b.name, b.num_classes, b.num_samples, b.accuracy] for b in im.buckets],
        )
    confusions = list(im.top_confusions)[:max_confusions]
    if confusions:
        out += "\n\n  Most frequent confusions\n" + table(
            ["label", "predicted", "count"], [[p.label, p.prediction, p.count] for p in confusions]
        )
    return out


def _temperature(r: evaluation_pb2.EvaluationResult) -> str:
    t = r.temperature
    best = f"best T = {t.best_temperature:.3f}"
    if t.beyond_grid:
        # The NLL still falls at the grid's end: the optimum is beyond it, not at it.
        best = (
            f"T* {'>' if t.beyond_grid > 0 else '<'} {t.best_temperature:.4g} (beyond the grid); at the end"
        )
    head = (
        f"Temperature\n  {best}: NLL {r.loss.mean:.4f} -> {t.calibrated_nll:.4f}"
        f" ({t.calibrated_nll - r.loss.mean:+.4f})"
    )
    if not t.temperatures:
        return head
    return (
        head
        + "\n\n"
        + table(["T", "NLL"], [[f"{x:.3f}", y] for x, y in zip(t.temperatures, t.nll, strict=False)])
    )


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second.

    On a terminal it redraws in place; otherwise (logs, pipes) it prints a
    line at every tenth of the way, so captured output stays short.
    """

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, done: int) -> None:
        now = time.monotonic()
        frac = min(1.0, done / self.total)
        if self._tty:
            if now - self._last_draw < 0.1 and done < self.total:
                return
            self._last_draw = now
            self.stream.write("\r" + self._line(done, frac, now))
        else:
            decile = int(frac * 10)
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(self._line(done, frac, now) + "\n")
        self.stream.flush()

    def close(self, done: int) -> None:
        self._last_draw = 0.0
        self.update(done)
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, done: int, frac: float, now: float) -> str:
        filled = int(frac * self.width)
        elapsed = max(1e-9, now - self._start)
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label} [{bar}] {frac:6.1%} {done:,}/{self.total:,} samples  {done / elapsed:,.0f}/s"
