"""Render the dashboard's main panels to a PNG from a live server and a real Prometheus.

    .venv/bin/python -m tests.observability.render_dashboard /tmp/evalstream-dashboard.png

Streams six training steps of two models (3,000 Zipf-imbalanced classes, ``trajectory.py``): the
candidate's loss falls below the baseline's by the middle of training while its top-1 accuracy
stays lower at every step, the disagreement the dashboard's first two panels exist to show. Leaves
one evaluation open with a rank missing, lets Prometheus scrape every second, then draws the
panels from the dashboard's own queries (range queries re-indexed by the step gauge, so the
x-axis is the training step).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.v1 import evaluation_pb2, service_pb2_grpc
from tests.observability import dashboard
from tests.observability.prom import Prometheus, wait_for
from tests.observability.streaming import make_data, stream_shard
from tests.observability.trajectory import CLASSES, STEPS, step_data

RUN, SPLIT = "resnet-imbalanced", "validation"
P99 = "histogram_quantile(0.99, sum by (le) (rate(evalstream_{}_seconds_bucket[$__rate_interval])))"
VALUES = {"run": RUN, "model": "baseline|candidate", "split": SPLIT}


def by_step(prom: Prometheus, expr: str, start: float, end: float) -> dict[str, dict[int, float]]:
    """{model: {step: value}}: the panel's series re-indexed by the evalstream_eval_step gauge."""
    steps = {
        r["metric"]["model"]: {float(t): int(float(v)) for t, v in r["values"]}
        for r in prom.query_range(
            dashboard.substitute('evalstream_eval_step{run="$run",split="$split"}', VALUES),
            start,
            end,
            "1s",
        )
    }
    out: dict[str, dict[int, float]] = {}
    for r in prom.query_range(dashboard.substitute(expr, VALUES), start, end, "1s"):
        model = r["metric"]["model"]
        for t, v in r["values"]:
            step = steps.get(model, {}).get(float(t))
            if step is not None:
                out.setdefault(model, {})[step] = float(v)
    return out


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.load(
            env={},
            grpc_address="127.0.0.1:0",
            metrics_address="127.0.0.1:0",
            data_dir=f"{tmp}/data",
            device="cpu",
            engine_backend=os.environ.get("EVALSTREAM_ENGINE_BACKEND", "eager"),
        )
        with BackgroundServer(settings) as srv, Prometheus(Path(tmp), srv.metrics_target) as prom:
            wait_for("first scrape", lambda: prom.query('up{job="evalstream"} == 1'))
            start = time.time()
            with grpc.insecure_channel(srv.target) as ch:
                stub = service_pb2_grpc.EvalStreamServiceStub(ch)
                for i, step in enumerate(STEPS):
                    for model, data in step_data(i).items():
                        key = evaluation_pb2.EvaluationKey(run=RUN, model=model, split=SPLIT, step=step)
                        stream_shard(stub, key, data)
                    time.sleep(2.5)  # a few scrapes of this step before the next replaces the gauges
                key = evaluation_pb2.EvaluationKey(run=RUN, model="candidate", split=SPLIT, step=700)
                stream_shard(stub, key, make_data(7, 300, CLASSES, 2.7, 2.5), rank=0, world_size=4)
                key.step = 700
                stream_shard(stub, key, make_data(8, 200, CLASSES, 2.7, 2.5), rank=2, world_size=4)
            time.sleep(3)
            end = time.time()
            render(prom, start, end, out)


def by_bin(prom: Prometheus, expr: str) -> dict[str, float]:
    """{bin: value} of an instant query over the reliability-diagram bins (bin = upper confidence edge)."""
    return {r["metric"]["bin"]: float(r["value"][1]) for r in prom.query(expr)}


def finish(ax: plt.Axes, title: str, xlabel: str, ylabel: str, grid: bool = True) -> None:
    """Title, axis labels, grid and legend: the same dress for every panel."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if grid:
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def disagreeing_steps(prom: Prometheus, start: float, end: float) -> list[int]:
    """Steps where the model with the lower loss has the lower top-1 accuracy (read from Prometheus)."""
    k = 'run="$run",model=~"$model",split="$split"'
    nll = by_step(prom, f"evalstream_eval_nll{{{k}}}", start, end)
    top1 = by_step(prom, f"evalstream_eval_accuracy_top1_ratio{{{k}}}", start, end)
    if not {"baseline", "candidate"} <= nll.keys() & top1.keys():
        return []
    steps = set(nll["baseline"]) & set(nll["candidate"]) & set(top1["baseline"]) & set(top1["candidate"])
    return sorted(
        s
        for s in steps
        if (nll["candidate"][s] < nll["baseline"][s]) != (top1["candidate"][s] > top1["baseline"][s])
    )


def shade(ax: plt.Axes, steps: list[int], spacing: float) -> None:
    """Mark the steps where loss and accuracy rank the two models differently."""
    for i, step in enumerate(steps):
        label = "loss and top-1 disagree" if i == 0 else None
        ax.axvspan(step - spacing / 2, step + spacing / 2, color="tab:red", alpha=0.08, lw=0, label=label)


def render(prom: Prometheus, start: float, end: float, out: Path) -> None:
    fig, axes = plt.subplots(3, 3, figsize=(18, 13))
    fig.suptitle(f"evalstream dashboard panels — run {RUN}, split {SPLIT} (from Prometheus)", fontsize=14)
    colors = {"baseline": "tab:blue", "candidate": "tab:orange"}

    def lines(ax: plt.Axes, title: str, series: list[tuple[str, str, str]], ylabel: str) -> None:
        for expr, label, style in series:
            for model, pts in by_step(prom, expr, start, end).items():
                xs = sorted(pts)
                ax.plot(
                    xs,
                    [pts[x] for x in xs],
                    style,
                    color=colors[model],
                    label=f"{model} {label}",
                    marker="o",
                    ms=3,
                )
        finish(ax, title, "training step", ylabel)

    k = 'run="$run",model=~"$model",split="$split"'
    disagree = disagreeing_steps(prom, start, end)
    for ax in axes[0, :2]:
        shade(ax, disagree, STEPS[1] - STEPS[0])
    for ax, title, series, unit in (
        (
            axes[0, 0],
            "Loss (NLL) over steps",
            [
                (f"evalstream_eval_nll{{{k}}}", "NLL", "-"),
                (f"evalstream_eval_calibrated_nll{{{k}}}", "NLL at T*", "--"),
            ],
            "nats",
        ),
        (
            axes[0, 1],
            "Top-k accuracy over steps",
            [
                (f"evalstream_eval_accuracy_top1_ratio{{{k}}}", "top-1", "-"),
                (f"evalstream_eval_accuracy_top5_ratio{{{k}}}", "top-5", "--"),
            ],
            "ratio",
        ),
        (
            axes[0, 2],
            "Calibration error over steps",
            [
                (f"evalstream_eval_ece_ratio{{{k}}}", "ECE", "-"),
                (f"evalstream_eval_adaptive_ece_ratio{{{k}}}", "adaptive ECE", ":"),
                (f"evalstream_eval_mce_ratio{{{k}}}", "MCE", "--"),
            ],
            "ratio",
        ),
        (
            axes[1, 1],
            "Balanced accuracy and macro-F1",
            [
                (f"evalstream_eval_balanced_accuracy_ratio{{{k}}}", "balanced acc", "-"),
                (f"evalstream_eval_macro_f1_ratio{{{k}}}", "macro-F1", "--"),
            ],
            "ratio",
        ),
        (
            axes[1, 2],
            "Accuracy on head / torso / tail classes",
            [
                (f"evalstream_eval_accuracy_head_ratio{{{k}}}", "head", "-"),
                (f"evalstream_eval_accuracy_torso_ratio{{{k}}}", "torso", "--"),
                (f"evalstream_eval_accuracy_tail_ratio{{{k}}}", "tail", ":"),
            ],
            "ratio",
        ),
    ):
        lines(ax, title, series, unit)
    # Reliability diagram of the latest step (instant queries).
    ax = axes[1, 0]
    for j, model in enumerate(("baseline", "candidate")):
        sel = f'run="{RUN}",model="{model}",split="{SPLIT}"'
        acc = by_bin(prom, f"evalstream_eval_reliability_accuracy_ratio{{{sel}}}")
        conf = by_bin(prom, f"evalstream_eval_reliability_confidence_ratio{{{sel}}}")
        bins = sorted(acc, key=float)
        xs = [float(b) for b in bins]
        ax.bar(
            [x - 0.0167 + j * 0.0167 for x in xs],
            [acc[b] for b in bins],
            width=0.0167,
            color=colors[model],
            label=f"{model} accuracy",
            align="edge",
        )
        ax.plot(
            xs,
            [conf[b] for b in bins],
            "x",
            color=colors[model],
            label=f"{model} mean confidence",
        )
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    finish(ax, "Reliability diagram, latest step", "confidence bin (upper edge)", "accuracy", grid=False)
    # Live evaluation: samples per rank and ranks closed.
    ax = axes[2, 0]
    shards = prom.query(dashboard.substitute(f"evalstream_open_shard_samples{{{k}}}", VALUES))
    closed = prom.query(dashboard.substitute(f"evalstream_open_ranks_closed{{{k}}}", VALUES))
    world = prom.query(dashboard.substitute(f"evalstream_open_world_size{{{k}}}", VALUES))
    ranks = sorted(shards, key=lambda r: int(r["metric"]["rank"]))
    ax.barh(
        [f"rank {r['metric']['rank']}" for r in ranks],
        [float(r["value"][1]) for r in ranks],
        color="tab:orange",
    )
    ax.set_title(
        f"Open evaluation (candidate): ranks closed {closed[0]['value'][1]} of {world[0]['value'][1]}"
    )
    ax.set_xlabel("samples committed")
    # Ingest throughput and latency over wall time.
    for ax, title, queries, unit in (
        (
            axes[2, 1],
            "Ingest throughput",
            [("sum(rate(evalstream_ingest_samples_total[$__rate_interval]))", "samples/s")],
            "per second",
        ),
        (
            axes[2, 2],
            "Chunk latency p99",
            [
                (P99.format("chunk_decode"), "decode"),
                (P99.format("chunk_compute"), "compute"),
                (P99.format("store_commit"), "commit"),
            ],
            "seconds",
        ),
    ):
        for expr, label in queries:
            for r in prom.query_range(dashboard.substitute(expr, VALUES, "5s"), start, end, "1s"):
                ts = [float(t) - start for t, _ in r["values"]]
                ax.plot(ts, [float(v) for _, v in r["values"]], label=label)
        finish(ax, title, "seconds since start", unit)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/evalstream-dashboard.png"))
