"""The Grafana dashboard: valid, every query names metrics the server renders, Prometheus runs them all."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import pytest
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from orchestra.serve.drift import DriftMonitor
from orchestra.serve.metrics import ServingMetrics
from tests.serve.prometheus import PrometheusServer, free_port, prometheus_fixture

prometheus = prometheus_fixture()

METRIC = re.compile(r"\borchestra_[a-z_]+\b")
# Grafana's variables, as Grafana would substitute them (all versions; a window of 10 scrapes).
SUBSTITUTIONS = {"$__rate_interval": "10s", "$version": ".*"}


def dashboard() -> dict[str, Any]:
    text = resources.files("orchestra.serve.dashboards").joinpath("grafana.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def expressions(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p["targets"]]


def promql(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def observed_once() -> ServingMetrics:
    """A registry with one observation of every method, the drift monitor's gauges included."""
    metrics = ServingMetrics()
    arm = {"version": "a", "model": "tiny"}
    metrics.observe_request(**arm, endpoint="/v1/completions", code=500, latency_s=0.1)
    metrics.observe_first_token(**arm, seconds=0.05)
    metrics.add_tokens(**arm, prompt=10, completion=4)
    metrics.set_queue_depth(**arm, depth=1)
    metrics.set_running(**arm, running=2)
    metrics.observe_batch(**arm, size=2)
    metrics.observe_decode(**arm, tokens=2, seconds=0.01)
    metrics.observe_feedback(version="a", score=1.0)
    metrics.observe_shadow(version="a", code=200, latency_s=0.2)
    drift = DriftMonitor(2, registry=metrics.registry)
    for nll in (2.0, 2.5, 3.0, 3.5):
        drift.observe(version="a", prompt_tokens=8, text="How is the weather in Paris today?", prompt_nll=nll)
    return metrics


def rendered_names(metrics: ServingMetrics) -> set[str]:
    families = text_string_to_metric_families(metrics.render()[0].decode())
    return {sample.name for family in families for sample in family.samples}


def test_dashboard_is_valid_grafana_json() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    version = variables["version"]
    assert version["type"] == "query" and version["includeAll"] and version["allValue"] == ".*"
    assert version["query"]["query"] == "label_values(orchestra_requests_total, version)"

    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    for p in panels(board):
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert 'version=~"$version"' in t["expr"], t["expr"]


def test_expected_panels_are_there() -> None:
    titles = " | ".join(p["title"].lower() for p in panels(dashboard()))
    for wanted in ("request rate", "error rate", "p50 / p95 / p99", "first token", "tokens per second",
                   "queue depth", "running sequences", "batch size p50", "tokens in / out", "feedback mean",
                   "ks", "js", "nll"):  # fmt: skip
        assert wanted in titles, wanted
    exprs = expressions(dashboard())
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}, " in e and "request_latency" in e for e in exprs)


def test_queries_name_exactly_the_rendered_metrics() -> None:
    names = rendered_names(observed_once())
    used = {m for e in expressions(dashboard()) for m in METRIC.findall(e)}
    assert used - names == set(), "the dashboard queries metrics nothing renders"
    # And the other way: every metric family rendered is on the dashboard (gauges, counters
    # by their _total, histograms by _bucket / _sum / _count).
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in names}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families - shown == set(), "metrics missing from the dashboard"


@pytest.fixture
def exposed() -> Iterator[str]:
    metrics = observed_once()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


@pytest.mark.slow
def test_prometheus_runs_every_query(exposed: str, prometheus: Callable[..., PrometheusServer]) -> None:
    server = prometheus([exposed])
    server.wait_for('up{job="orchestra"}', lambda r: bool(r) and r[0]["value"][1] == "1")
    # The version variable's values, as Grafana's label_values would list them.
    versions = server.wait_for("count by (version) (orchestra_requests_total)", bool)
    assert [r["metric"]["version"] for r in versions] == ["a"]
    for expr in expressions(dashboard()):
        # Accepted (a parse error raises) and, once two scrapes are in, returns a series for version a.
        result = server.wait_for(promql(expr), bool, timeout=20)
        assert {r["metric"].get("version") for r in result} == {"a"}, expr
