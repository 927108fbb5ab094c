"""The load test, small (CI): 16 concurrent rank streams of a 3,000-class workload into one server
process. A correctness test, not a timing: no errors, every sample counted exactly once, no stream
starved (each within 3x of the median stream's throughput), server memory bounded. The full run
(64 streams, figures in bench/results/load.json) is ``python -m bench.load``."""

from __future__ import annotations

from bench.load import STARVATION_FACTOR, run_load

MIB = 1 << 20


def test_sixteen_concurrent_streams_of_three_thousand_classes() -> None:
    report = run_load(streams=16, chunks=8, rows=80, procs=2, model="ci-load")
    print(
        f"{report.samples_per_s:.0f} samples/s, ack p99 {report.ack_latency_ms['p99']:.0f} ms, "
        f"slowest/median {report.slowest_vs_median:.2f}, "
        f"peak RSS {report.server_peak_rss_bytes / MIB:.0f} MiB"
    )
    assert report.errors == []
    assert report.samples_finalized == report.samples_sent == 16 * 8 * 80
    assert report.ack_latency_ms["count"] == 16 * 8
    assert report.starved_streams == 0, f"slowest stream {report.slowest_vs_median:.1f}x below the median"
    assert report.slowest_vs_median <= STARVATION_FACTOR
    # Each stream holds at most two 16 MiB staging blocks and a bounded pipeline.
    assert report.server_peak_rss_bytes - report.server_rss_before_bytes < 16 * 48 * MIB
