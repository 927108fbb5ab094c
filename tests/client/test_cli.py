"""The ``evalstream`` console script, run as a subprocess against a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from evalstream.client import EvalClient
from evalstream.service.server import BackgroundServer
from tests.client.conftest import NUM_CLASSES, make_batches

EXE = shutil.which("evalstream", path=str(Path(sys.executable).parent)) or "evalstream"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EVALSTREAM_")}


def evalstream(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([EXE, *args], capture_output=True, text=True, env=_env(), timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"evalstream {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


@pytest.fixture
def populated(server: BackgroundServer) -> str:
    """Two finalized models (steps 1 and 2 of "a", step 1 of "b") in run "cli"."""
    with EvalClient(server.target) as client:
        for model, step, seed in (("a", 1, 0), ("a", 2, 1), ("b", 1, 2)):
            with client.evaluation(run="cli", model=model, step=step, num_classes=NUM_CLASSES) as ev:
                for scores, labels, ids in make_batches(2, 100, seed=seed):
                    ev.add(scores, labels, ids)
            ev.result(timeout=30)
    return server.target


def test_list_show_and_compare(populated: str) -> None:
    listed = evalstream("list", "--target", populated).stdout
    assert re.search(r"cli\s+a\s+validation\s+2\s+finalized\s+1/1\s+200", listed)
    assert re.search(r"cli\s+b\s+validation\s+1\s+finalized", listed)
    rows = json.loads(
        evalstream("list", "--run", "cli", "--model", "a", "--json", "--target", populated).stdout
    )
    assert [r["key"]["step"] for r in rows] == ["2", "1"]  # int64 is a string in the JSON mapping

    shown = evalstream("show", "cli", "a", "--step", "1", "--target", populated).stdout
    for section in ("Loss (NLL, nats)", "Accuracy", "Calibration", "Class imbalance", "Temperature", "top-5"):
        assert section in shown
    assert "step=1" in shown
    latest = json.loads(evalstream("show", "cli", "a", "--json", "--per-class", "--target", populated).stdout)
    assert latest["key"]["step"] == "2" and len(latest["result"]["imbalance"]["per_class"]["support"]) == 50

    compared = json.loads(evalstream("compare", "cli", "a", "b", "--json", "--target", populated).stdout)
    assert {c["ref"]["model"] for c in compared["candidates"]} == {"a", "b"}
    text = evalstream("compare", "cli", "--target", populated).stdout
    assert "a" in text and "b" in text and "nll" in text
    assert (
        text.startswith("Recommendation: ") and compared["recommendation"]["mode"] == "RECOMMENDATION_MODE_ON"
    )
    off = evalstream("compare", "cli", "--recommendation", "off", "--target", populated).stdout
    assert re.match(r"[ab] is best by nll", off) and "Recommendation:" not in off
    advisory = evalstream("compare", "cli", "--recommendation", "advisory", "--target", populated).stdout
    assert re.match(r"[ab] is best by nll \(the primary metric decides\)\.\nAdvice: ", advisory)


def test_compare_plot_writes_a_png(populated: str, tmp_path: Path) -> None:
    chart = tmp_path / "compare.png"
    done = evalstream("compare", "cli", "a", "b", "--plot", str(chart), "--target", populated)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    assert f"chart saved to {chart}" in done.stderr


def test_missing_evaluation_and_unreachable_server_exit_1(populated: str) -> None:
    missing = evalstream("show", "cli", "nope", "--target", populated, check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    down = evalstream("list", "--target", "127.0.0.1:1", "--timeout", "2", check=False)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_demo_json_shows_loss_and_accuracy_disagree(tmp_path: Path) -> None:
    chart = tmp_path / "demo.png"
    done = evalstream(
        "demo", "--json", "--samples", "3000", "--no-progress", "--run", "d", "--plot", str(chart)
    )
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads(done.stdout)
    metrics = {name: m["evaluation"]["result"]["metrics"] for name, m in out["models"].items()}
    assert metrics["smooth"]["nll"] < metrics["sharp"]["nll"]
    assert metrics["smooth"]["accuracy_top1"] < metrics["sharp"]["accuracy_top1"]
    assert metrics["overconfident"]["ece"] > metrics["sharp"]["ece"] > 0
    assert out["comparison"]["candidates"][0]["ref"]["model"] == "smooth"
    assert out["comparison"]["recommendation"]["model"] == "overconfident"
    assert out["streamed"]["samples"] == 9000
    assert "in-process server" in done.stderr


def test_serve_starts_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [EXE, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--metrics-address", ""],
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stderr is not None
        target = ""
        for line in proc.stderr:
            found = re.search(r"evalstream serving grpc=(\S+)", line)
            if found:
                target = found.group(1)
                break
        assert target, "server did not report its address"
        assert evalstream("list", "--target", target).stdout.strip() == "no evaluations"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
