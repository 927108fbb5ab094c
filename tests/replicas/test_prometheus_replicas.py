"""Three replicas on one PostgreSQL, a real Prometheus scraping all three, every dashboard query.

Each replica serves /metrics; Prometheus scrapes them as one job, one ``instance`` per replica
(as ``deploy/prometheus/prometheus.replicas.yml`` does). Evaluations are streamed with their
ranks spread over the replicas; then every query of the Grafana dashboard (its variables
substituted as Grafana would) and every recording and alerting rule is evaluated by that
Prometheus, and each evaluation must appear exactly once, with its true value (a duplicate
summed or counted would double it). The service counters are per replica and add up to what
was sent. Then the replica exporting the evaluation gauges is SIGKILLed: another takes over,
and over the whole window, takeover included, every evaluation query still draws one series
per evaluation with the right values and no gap longer than ``GAP_S``.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import yaml

from evalstream.client import EvalClient
from tests.faults.workload import PATIENT, rank_batches
from tests.observability import dashboard
from tests.observability.prom import RULES, Prometheus, wait_for
from tests.observability.promtools import binary
from tests.replicas.cluster import Cluster
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.timeout(420)
T = TypeVar("T")

RUN, SPLIT, CLASSES, ROWS, WORLD = "sweep", "validation", 10, 40, 3
# (model, step) -> ranks that stream and close; rank r sends r + 1 batches of ROWS rows.
# c/200 misses its last rank, so it stays open and feeds the open_* gauges.
EVALUATIONS = {("a", 100): 3, ("a", 200): 3, ("b", 100): 3, ("b", 200): 3, ("c", 100): 3, ("c", 200): 2}
LATEST = {"a": 200, "b": 200, "c": 100}  # the latest finalized step: what the eval_* gauges show
OPEN_MODEL = "c"
VALUES = {"run": RUN, "model": "a|b|c", "split": SPLIT}  # the dashboard with "All" models selected
# Longest a series may miss points in a range query at 1 s resolution: the takeover happens at a
# surviving replica's first scrape after the database ends the dead one's session (about one
# scrape interval); the rest is room for a busy 2-core machine delaying scrapes.
GAP_S = 10.0
# Labels Prometheus adds per target; an evaluation is what remains.
TARGET_LABELS = {"__name__", "instance", "job"}


def rank_rows(rank: int) -> int:
    return ROWS * (rank + 1)


def evaluation_samples(ranks: int) -> float:
    return float(sum(rank_rows(r) for r in range(ranks)))


# The value every series of an evaluation gauge must hold (model -> value), where it is known
# exactly: a duplicate that a query summed or counted would change it.
EXACT: dict[str, dict[str, float]] = {
    "evalstream_eval_step": {m: float(s) for m, s in LATEST.items()},
    "evalstream_eval_samples": {m: evaluation_samples(WORLD) for m in LATEST},
    "evalstream_eval_classes": {m: float(CLASSES) for m in LATEST},
    "evalstream_open_step": {OPEN_MODEL: 200.0},
    "evalstream_open_world_size": {OPEN_MODEL: float(WORLD)},
    "evalstream_open_ranks_closed": {OPEN_MODEL: 2.0},
    "evalstream_open_samples": {OPEN_MODEL: evaluation_samples(2)},
}


@dataclass
class Scenario:
    cluster: Cluster
    prom: Prometheus
    sent: dict[str, float]  # instance -> samples streamed to that replica
    ready_at: float  # every gauge has been scraped since


def replica_for(index: int, rank: int) -> int:
    """Ranks of one evaluation on different replicas, rotating from one evaluation to the next."""
    return (index + rank) % 3


def stream_all(cluster: Cluster) -> dict[str, float]:
    sent = {address: 0.0 for address in cluster.metrics}
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(EvalClient(t, retry=PATIENT)) for t in cluster.targets]
        for index, ((model, step), ranks) in enumerate(EVALUATIONS.items()):
            for rank in range(ranks):
                replica = replica_for(index, rank)
                ev = clients[replica].evaluation(
                    run=RUN,
                    model=model,
                    split=SPLIT,
                    step=step,
                    rank=rank,
                    world_size=WORLD,
                    num_classes=CLASSES,
                    reduce="server",
                )
                for scores, labels in rank_batches(rank, rank + 1, ROWS, CLASSES, seed=index):
                    ev.add(scores, labels)
                ev.close(timeout=60)
                sent[cluster.metrics[replica]] += rank_rows(rank)
            if ranks == WORLD:
                clients[index % 3].wait_for(RUN, model, step=step, split=SPLIT, timeout=60)
    return sent


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer) -> Iterator[Scenario]:
    binary("prometheus")
    tmp = tmp_path_factory.mktemp("prom-replicas")
    name = f"t_{uuid.uuid4().hex[:16]}"
    cluster = Cluster(tmp, postgres_server.create_database(name), metrics=True)
    try:
        cluster.start()
        with Prometheus(tmp, cluster.metrics) as prom:
            wait_for("every replica scraped", lambda: prom.query('count(up{job="evalstream"} == 1) == 3'), 60)
            sent = stream_all(cluster)
            total = sum(sent.values())
            wait_for(
                "a scrape of everything streamed",
                lambda: (
                    prom.query(f"sum(evalstream_ingest_samples_total) == {total}")
                    and prom.query("count(evalstream_eval_step) >= 3")
                    and prom.query("evalstream_open_ranks_closed == 2")
                ),
                timeout=60,
            )
            time.sleep(2.5)  # rates need two points
            yield Scenario(cluster, prom, sent, ready_at=time.time() - 2.0)
    finally:
        cluster.close()
        postgres_server.drop_database(name)


# -- what a result holds -----------------------------------------------------------------------


def evaluation_key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """A series' identity without the labels Prometheus adds per replica."""
    return tuple(sorted((k, v) for k, v in labels.items() if k not in TARGET_LABELS))


def gauge_name(expr: str) -> str | None:
    """The evaluation gauge (evalstream_eval_* / evalstream_open_*, or a series recorded from
    one, evalstream:eval_* / evalstream:open_*) an expression reads, if any."""
    m = re.search(r"\bevalstream[_:](?:eval|open)_[a-z0-9_]+", expr)
    return m.group(0) if m else None


def expected_models(name: str) -> set[str]:
    return {OPEN_MODEL} if name.removeprefix("evalstream").startswith(("_open_", ":open_")) else set(LATEST)


def check_once(what: str, series: list[dict[str, Any]], models: set[str]) -> None:
    """Each evaluation (run/model/split, and bin or rank where the gauge has one) appears once."""
    keys = [evaluation_key(s["metric"]) for s in series]
    dupes = {k for k in keys if keys.count(k) > 1}
    assert not dupes, f"{what}: evaluations returned more than once: {sorted(dupes)}"
    got = {(s["metric"].get("run"), s["metric"].get("model"), s["metric"].get("split")) for s in series}
    assert got == {(RUN, m, SPLIT) for m in models}, (what, got)


def check_values(what: str, name: str, series: list[dict[str, Any]]) -> None:
    want = EXACT.get(name)
    for s in series:
        points = s["values"] if "values" in s else [s["value"]]
        if want is not None:
            assert {float(v) for _, v in points} == {want[s["metric"]["model"]]}, (what, s)
        if name == "evalstream_open_shard_samples":
            assert {float(v) for _, v in points} == {float(rank_rows(int(s["metric"]["rank"])))}, (what, s)


def eventually(check: Callable[[], T], tries: int = 5) -> T:
    """``check()``, again up to ``tries`` times a second apart while it fails.

    A scrape that times out on a busy machine marks that replica's series stale until its next
    scrape, so an instant query can miss a series for a second. A duplicate, which is what these
    checks look for, is in every scrape and fails every try.
    """
    for _ in range(tries - 1):
        try:
            return check()
        except AssertionError:
            time.sleep(1.0)
    return check()


def exporting_instances(prom: Prometheus) -> set[str]:
    """Replicas whose own scrape carries evaluation gauges (raw series, no aggregation)."""
    result = prom.query('count by (instance) ({__name__=~"evalstream_(eval|open)_.+"})')
    return {r["metric"]["instance"] for r in result}


def the_exporter(prom: Prometheus) -> str:
    found = exporting_instances(prom)
    assert len(found) == 1, found
    return found.pop()


def check_dashboard_instant(s: Scenario) -> int:
    checked = 0
    for q in dashboard.queries():
        name = gauge_name(q.expr)
        if name is None:
            continue
        expr = dashboard.substitute(q.expr, VALUES)
        result = s.prom.query(expr)
        what = f"{q.panel} / {q.ref}: {expr}"
        check_once(what, result, expected_models(name))
        check_values(what, name, result)
        checked += 1
    return checked


# -- tests (in order: the last one kills a replica) --------------------------------------------


def test_one_replica_exports_the_evaluation_gauges(scenario: Scenario) -> None:
    """Raw series, before any aggregation: fails if two replicas export (each evaluation x2)."""
    prom = scenario.prom

    def once() -> None:
        assert len(exporting_instances(prom)) == 1
        counts = prom.query('count by (run, model, split) (evalstream_eval_step{job="evalstream"})')
        assert {r["metric"]["model"]: float(r["value"][1]) for r in counts} == {m: 1.0 for m in LATEST}
        keys = prom.query("max(evalstream_exporter_series_keys)")
        assert float(keys[0]["value"][1]) == len(LATEST)

    eventually(once)


def test_every_dashboard_query_returns_each_evaluation_once(scenario: Scenario) -> None:
    assert eventually(lambda: check_dashboard_instant(scenario)) >= 30
    for q in dashboard.queries():
        if gauge_name(q.expr) is None:  # service queries: aggregates over replicas, one series each
            result = scenario.prom.query(dashboard.substitute(q.expr, VALUES))
            assert result or "rpc_errors" in q.expr, f"{q.panel} / {q.ref}: no data"  # no RPC failed
            assert all("run" not in r["metric"] for r in result), q.expr
            assert all(not math.isnan(float(r["value"][1])) for r in result if "rate(" in q.expr), q.expr


def test_template_variables_list_each_key_once(scenario: Scenario) -> None:
    variables = dashboard.variables()
    want = {"run": {RUN}, "model": set(LATEST), "split": {SPLIT}}
    for name, expected in want.items():
        selector, label = dashboard.label_values_query(variables[name]["definition"])
        selector = dashboard.substitute(selector, {"run": RUN})
        assert scenario.prom.label_values(selector, label) == expected, name


def test_service_counters_are_per_replica_and_sum_to_what_was_sent(scenario: Scenario) -> None:
    prom = scenario.prom
    per_replica = {
        r["metric"]["instance"]: float(r["value"][1]) for r in prom.query("evalstream_ingest_samples_total")
    }
    assert per_replica == scenario.sent
    assert all(v > 0 for v in per_replica.values())  # the ranks really were spread
    finalized = prom.query("sum(evalstream_evaluations_finalized_total)")
    assert float(finalized[0]["value"][1]) == sum(1 for r in EVALUATIONS.values() if r == WORLD)


def check_rules(prom: Prometheus) -> None:
    """Every rule over the evaluation gauges, as Prometheus evaluates it and as it recorded it."""
    spec = yaml.safe_load(RULES.read_text())
    for rule in (r for g in spec["groups"] for r in g["rules"]):
        name = gauge_name(rule["expr"])
        if name is None:
            continue
        result = prom.query(rule["expr"])
        what = f"rule {rule.get('record') or rule.get('alert')}: {rule['expr']}"
        if "alert" in rule:  # conditions that do not hold return nothing; what they return is once
            keys = [evaluation_key(r["metric"]) for r in result]
            assert len(keys) == len(set(keys)), (what, keys)
            continue
        check_once(what, result, expected_models(name))
        check_once(f"recorded {rule['record']}", prom.query(rule["record"]), expected_models(name))
    missing = prom.query("evalstream:open_ranks_missing")
    assert [float(r["value"][1]) for r in missing] == [1.0]


def test_rules_return_each_evaluation_once(scenario: Scenario) -> None:
    prom = scenario.prom

    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        done = rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
        return rules if done else None

    rules = wait_for("every rule to be evaluated", evaluated, timeout=30)
    time.sleep(2)  # one more evaluation after the data settled
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    eventually(lambda: check_rules(prom))


def test_after_the_exporter_is_killed_each_evaluation_is_still_returned_once(scenario: Scenario) -> None:
    s = scenario
    prom = s.prom
    dead = eventually(lambda: the_exporter(prom))
    s.cluster.replicas[s.cluster.metrics.index(dead)].kill()
    wait_for(
        "another replica to export the evaluation gauges",
        lambda: prom.query(f'count(evalstream_eval_step{{instance!="{dead}"}}) == {len(LATEST)}'),
        timeout=60,
    )
    time.sleep(3)  # a few scrapes of the new exporter
    end = time.time()
    new = eventually(lambda: the_exporter(prom))
    assert new != dead
    assert eventually(lambda: check_dashboard_instant(s)) >= 30
    eventually(lambda: check_rules(prom))
    # Over the whole window, takeover included, as a time-series panel draws it.
    for q in dashboard.queries():
        name = gauge_name(q.expr)
        if name is None:
            continue
        expr = dashboard.substitute(q.expr, VALUES)
        result = prom.query_range(expr, s.ready_at, end, "1s")
        what = f"{q.panel} / {q.ref} over the takeover: {expr}"
        check_once(what, result, expected_models(name))
        check_values(what, name, result)
        for series in result:
            stamps = [float(t) for t, _ in series["values"]]
            gaps = [b - a for a, b in zip([s.ready_at, *stamps], [*stamps, end], strict=True)]
            assert max(gaps) <= GAP_S, (what, series["metric"], max(gaps))
