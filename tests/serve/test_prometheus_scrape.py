"""A real Prometheus scrapes a ServingMetrics registry; the numbers come back through PromQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from prometheus_client import start_http_server

from orchestra.serve.metrics import ServingMetrics
from tests.serve.prometheus import PrometheusServer, free_port, prometheus_fixture, value

pytestmark = pytest.mark.slow

prometheus = prometheus_fixture()


@pytest.fixture
def exposed() -> Iterator[tuple[ServingMetrics, str]]:
    """A ServingMetrics registry served on a loopback port, as the server's /metrics would be."""
    metrics = ServingMetrics()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        yield metrics, f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def expected_quantile(q: float, buckets: list[tuple[float, int]]) -> float:
    """histogram_quantile as Prometheus documents it: linear inside the bucket holding rank q * n."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    raise AssertionError("rank beyond the last finite bucket")


def test_scraped_counters_and_latency_quantiles(
    exposed: tuple[ServingMetrics, str], prometheus: Callable[..., PrometheusServer]
) -> None:
    metrics, target = exposed
    arm = {"version": "a", "model": "tiny", "endpoint": "/v1/chat/completions"}
    # Latencies: 4 in (0.01, 0.025], 6 in (0.25, 0.5]; 3 of the requests failed with 500.
    for i, latency in enumerate([0.02] * 4 + [0.3] * 6):
        metrics.observe_request(**arm, code=500 if i < 3 else 200, latency_s=latency)
    metrics.add_tokens(version="a", model="tiny", prompt=120, completion=45)
    metrics.observe_feedback(version="a", score=1.0)
    metrics.observe_feedback(version="a", score=0.5)

    server = prometheus([target])
    server.wait_for('up{job="orchestra"}', lambda r: bool(r) and r[0]["value"][1] == "1")
    assert value(server.query('orchestra_requests_total{version="a",code="200"}')) == 7
    assert value(server.query('orchestra_requests_total{version="a",code="500"}')) == 3
    assert value(server.query('sum(orchestra_request_errors_total{type="server_error"})')) == 3
    assert value(server.query("orchestra_completion_tokens_total")) == 45
    mean = "orchestra_feedback_score_sum / orchestra_feedback_score_count"
    assert value(server.query(mean)) == pytest.approx(0.75)

    buckets = [(0.005, 0), (0.01, 0), (0.025, 4), (0.05, 4), (0.1, 4), (0.25, 4), (0.5, 10)]
    for q in (0.5, 0.95, 0.99):
        expr = (
            f'histogram_quantile({q}, sum by (le) (orchestra_request_latency_seconds_bucket{{version="a"}}))'
        )
        assert value(server.query(expr)) == pytest.approx(expected_quantile(q, buckets))
    assert expected_quantile(0.5, buckets) == pytest.approx(0.25 + 0.25 / 6)

    # Later observations reach Prometheus at the next scrape.
    for _ in range(5):
        metrics.observe_request(**arm, code=200, latency_s=0.02)
    server.wait_for(
        'orchestra_requests_total{version="a",code="200"}',
        lambda r: bool(r) and float(r[0]["value"][1]) == 12,
    )
    metrics.set_queue_depth(version="a", model="tiny", depth=9)
    server.wait_for("orchestra_queue_depth", lambda r: bool(r) and float(r[0]["value"][1]) == 9)


def test_bad_expression_is_refused(prometheus: Callable[..., PrometheusServer]) -> None:
    from tests.serve.prometheus import PrometheusError

    server = prometheus([])
    with pytest.raises(PrometheusError, match="bad_data"):
        server.query("sum(rate(orchestra_requests_total[5m])")
