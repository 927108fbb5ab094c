"""This client and server against the last release's (``RELEASE`` in the Makefile): the wire stays
compatible both ways.

The release is exported from git history and its own stubs generated, then run in a subprocess
(its server, or its client), so the peer is the code users run, not a stand-in. The release's
server refuses the ``OpenShard.ack_mode`` field it does not know; this client must notice, ask for
cumulative acknowledgements the old way (gRPC metadata) and stream on. The release's client asks
with that metadata and must still be served.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from evalstream.client import EvalClient
from evalstream.service.server import BackgroundServer
from tests.client.conftest import FAST_RETRY, NUM_CLASSES, make_batches

ROOT = Path(__file__).resolve().parents[2]


def _release() -> str:
    """The last release's commit, as the Makefile names it for ``make breaking``."""
    found = re.search(r"^RELEASE := (\w+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile names no RELEASE"
    return found.group(1)


RELEASE = _release()

SERVE = textwrap.dedent(
    """
    import sys
    from evalstream.service.server import BackgroundServer
    from evalstream.service.settings import Settings

    settings = Settings.load(
        env={}, data_dir=sys.argv[1], grpc_address="127.0.0.1:0", metrics_address="", device="cpu",
        worker_threads=2, engine_backend="eager",
    )
    with BackgroundServer(settings) as server:
        print(server.target, flush=True)
        sys.stdin.read()  # until the test closes our stdin
    """
)

STREAM = textwrap.dedent(
    """
    import sys
    import numpy as np
    from evalstream.client import EvalClient

    rng = np.random.default_rng(3)
    with EvalClient(sys.argv[1]) as client:
        key = {"run": "released-client", "model": "m", "step": 0}
        with client.evaluation(**key, num_classes=50, chunk_bytes=4096) as ev:
            for b in range(6):
                ev.add(rng.standard_normal((100, 50)).astype(np.float32), rng.integers(0, 50, 100),
                       sample_ids=np.arange(100 * b, 100 * (b + 1)))
        print(ev.result(timeout=120).result.num_samples)
    """
)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release's tree with its stubs generated; skipped where git or the commit is missing."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    out = tmp_path_factory.mktemp("release")
    archive = subprocess.run(["git", "archive", RELEASE], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {RELEASE} is not in this clone: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    subprocess.run([sys.executable, "tools/gen_proto.py"], cwd=out, check=True, capture_output=True)
    return out


def _in_release(release: Path, script: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    # cwd first on sys.path: ``evalstream`` is the release's, not this checkout's.
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=release, text=True, stdin=stdin, stdout=subprocess.PIPE
    )


@pytest.fixture
def released_server(release: Path, tmp_path: Path) -> Iterator[str]:
    proc = _in_release(release, SERVE, str(tmp_path / "data"), stdin=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        target = proc.stdout.readline().strip()
        assert target.startswith("127.0.0.1:"), f"the released server did not start (exit {proc.poll()})"
        yield target
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_this_client_streams_to_the_released_server(released_server: str) -> None:
    batches = make_batches(6, 100)
    with EvalClient(released_server, retry=FAST_RETRY) as client:
        with client.evaluation(
            run="this-client", model="m", step=0, num_classes=NUM_CLASSES, chunk_bytes=4096
        ) as ev:
            for logits, labels, ids in batches:
                ev.add(logits, labels, sample_ids=ids)
        assert ev.summary is not None and ev.summary.samples == 600 and ev.summary.rejected_chunks == 0
        result = ev.result(timeout=120).result
    assert result.num_samples == 600
    expected = np.mean([np.argmax(lg, 1) == lb for lg, lb, _ in batches])
    assert result.metrics["accuracy_top1"] == pytest.approx(expected)


def test_the_released_client_streams_to_this_server(release: Path, server: BackgroundServer) -> None:
    proc = _in_release(release, STREAM, server.target)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and out.strip() == "600"
