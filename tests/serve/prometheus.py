"""A real Prometheus server for tests: scrapes given targets, answers PromQL through its HTTP API.

    from tests.serve.prometheus import prometheus_fixture

    prometheus = prometheus_fixture()          # a fixture in the test module

    def test_x(prometheus) -> None:
        server = prometheus(["127.0.0.1:8000"])  # started, ready, scraping every second
        server.wait_for('up{job="orchestra"}', lambda r: r and r[0]["value"][1] == "1")

The binary is Debian's ``prometheus`` package, installed with apt-get when missing (CI runs as
root on a fresh Debian machine); without root or apt-get the tests that need it are skipped. The
package's own service is never used: every instance here has its own config, its own loopback
port and its own storage in a temporary folder, and a ``policy-rc.d`` stops the package from
starting its service during the install.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from filelock import FileLock

APT_PACKAGE = "prometheus"
POLICY_RC = Path("/usr/sbin/policy-rc.d")
READY_TIMEOUT_S = 60.0


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered a query with an error."""


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_prometheus() -> str:
    """Path of the prometheus binary, installing Debian's package if needed; skips if it cannot."""
    found = shutil.which("prometheus")
    if found:
        return found
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("no prometheus binary, and installing it needs root and apt-get")
    # One install at a time, also across pytest processes.
    with FileLock(os.path.join(tempfile.gettempdir(), "orchestra-prometheus-install.lock")):
        found = shutil.which("prometheus")
        if found:
            return found
        log = Path(tempfile.gettempdir()) / "orchestra-prometheus-apt.log"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Exit code 101 tells invoke-rc.d not to start the package's service.
        added_policy = not POLICY_RC.exists()
        if added_policy:
            POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
            POLICY_RC.chmod(0o755)
        try:
            with log.open("w") as out:
                for cmd in (
                    ["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", APT_PACKAGE],
                ):
                    done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600)
                    if done.returncode != 0:
                        tail = log.read_text(errors="replace")[-2000:]
                        raise PrometheusError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{tail}")
        finally:
            if added_policy:
                POLICY_RC.unlink(missing_ok=True)
    found = shutil.which("prometheus")
    if not found:
        raise PrometheusError(f"apt-get installed {APT_PACKAGE} but no prometheus binary is on PATH")
    return found


def _config(job: str, targets: Sequence[str], scrape_interval: str, metrics_path: str) -> str:
    """prometheus.yml; JSON is valid YAML, so the targets need no quoting rules of their own."""
    return json.dumps(
        {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": metrics_path,
                    "scrape_timeout": scrape_interval,
                    "static_configs": [{"targets": list(targets)}],
                }
            ],
        },
        indent=2,
    )


class PrometheusServer:
    """One Prometheus process on a free loopback port, scraping ``targets`` (``host:port``)."""

    def __init__(
        self,
        targets: Sequence[str],
        workdir: Path,
        *,
        job: str = "orchestra",
        scrape_interval: str = "1s",
        metrics_path: str = "/metrics",
        binary: str | None = None,
    ) -> None:
        self.targets = list(targets)
        self.workdir = Path(workdir)
        self.job = job
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.binary = binary or ensure_prometheus()
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(_config(self.job, self.targets, self.scrape_interval, self.metrics_path))
        for _attempt in range(3):  # a free port can be taken before Prometheus binds it
            self.port = free_port()
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={self.workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--storage.tsdb.retention.time=1h",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                )
            if self._wait_ready():
                return self
            if "address already in use" not in self.log_path.read_text(errors="replace"):
                break
        self.stop()
        raise PrometheusError(f"Prometheus did not become ready; its log:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        return False

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"

    def _get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as err:  # 400/422: a bad expression, with Prometheus's reason
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params or ''}: {body.get('errorType')}: {body.get('error')}")
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant query's result: [{"metric": {...}, "value": [time, "text"]}, ...]."""
        data = self._get("/api/v1/query", {"query": expr})["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(
        self, expr: str, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Query until ``predicate(result)`` holds; the result, or an error with the last one seen."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{expr!r} did not reach the expected value in {timeout} s; last result: {result}; "
                    f"targets: {self.target_health()}"
                )
            time.sleep(0.25)

    def target_health(self) -> list[dict[str, Any]]:
        """Each active target's scrape URL, health and last error (what a failing test should show)."""
        active = self._get("/api/v1/targets")["data"]["activeTargets"]
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in active]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def value(result: list[dict[str, Any]]) -> float:
    """The single sample of an instant-query result, as a number."""
    if len(result) != 1:
        raise AssertionError(f"expected one series, got {len(result)}: {result}")
    return float(result[0]["value"][1])


def prometheus_fixture(scope: str = "function") -> Any:
    """A pytest fixture (assign it to a name in the test module) yielding ``start(targets, **kw)``.

    Each call starts a :class:`PrometheusServer` in a fresh temporary folder, ready to query;
    every server started is stopped when the fixture's scope ends.
    """

    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., PrometheusServer]]:
        binary = ensure_prometheus()
        started: list[PrometheusServer] = []

        def start(targets: Sequence[str], **kwargs: Any) -> PrometheusServer:
            server = PrometheusServer(targets, tmp_path_factory.mktemp("prometheus"), binary=binary, **kwargs)
            started.append(server)
            return server.start()

        try:
            yield start
        finally:
            for server in started:
                server.stop()

    return fixture
