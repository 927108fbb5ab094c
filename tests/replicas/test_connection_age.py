"""``max_connection_age_s``: the server ends old connections so clients re-resolve; streams resume.

A stream longer than the age limit is cut by the server (GOAWAY after the age, then the grace);
the client reconnects and resumes from the committed sequence, so the result is exact and the
reconnects show the limit was applied.
"""

from __future__ import annotations

from pathlib import Path

from evalstream.service.server import BackgroundServer
from tests.faults.workload import (
    PATIENT,
    RankRun,
    assert_same_result,
    fetch_result,
    rank_batches,
    reference,
    stream_rank,
)
from tests.support.servers import small_settings

CLASSES = 20


def test_a_stream_outliving_the_connection_age_resumes_exactly(tmp_path: Path) -> None:
    settings = small_settings(tmp_path / "data", max_connection_age_s=1.0)
    batches = rank_batches(0, 40, 32, CLASSES, seed=2)
    with BackgroundServer(settings) as server:
        run = RankRun(0)
        stream_rank(
            server.target,
            run,
            model="aged",
            world_size=1,
            batches=batches,
            num_classes=CLASSES,
            pace_s=0.1,  # ~4 s of streaming: past the age and its grace at least once
            chunk_bytes=1 << 12,
            retry=PATIENT,
        )
        assert run.error is None, run.error
        assert run.reconnects >= 1
        got = fetch_result(server.target, "aged").result
    assert_same_result(got, reference([batches], CLASSES, settings.engine_config()))
