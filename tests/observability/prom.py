"""A real Prometheus server on loopback for the end-to-end tests, and its HTTP query API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

from tests.observability.promtools import binary
from tests.support.ports import reserve_port

T = TypeVar("T")
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "evalstream.rules.yml"


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 30.0, every: float = 0.25) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


class Prometheus:
    """``prometheus`` scraping one target or several every second, with the project's rules loaded.

    Several targets are one job, as ``deploy/prometheus/prometheus.replicas.yml`` scrapes replicas:
    each series carries its replica's address as the ``instance`` label.
    """

    def __init__(self, workdir: Path, target: str | Sequence[str], scrape_interval: str = "1s") -> None:
        self.workdir = workdir
        self.port = reserve_port()
        self.url = f"http://127.0.0.1:{self.port}"
        targets = [target] if isinstance(target, str) else list(target)
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "evalstream", "static_configs": [{"targets": targets}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = workdir / "prometheus.log"

    def __enter__(self) -> Prometheus:
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for("Prometheus to be ready", self._ready, timeout=30)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self._log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, path: str, **params: str | list[str]) -> Any:
        """GET /api/v1/<path>; returns ``data`` and raises on an error status."""
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; a list of {"metric": labels, "value": [t, "v"]}."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: str) -> list[dict[str, Any]]:
        return list(self.api("query_range", query=expr, start=str(start), end=str(end), step=step)["result"])

    def label_values(self, selector: str, label: str) -> set[str]:
        """What Grafana's ``label_values(selector, label)`` lists."""
        return {s[label] for s in self.api("series", **{"match[]": [selector]}) if label in s}
