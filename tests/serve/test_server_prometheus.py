"""A real Prometheus server scrapes a running orchestra-serve: its numbers read back through PromQL
equal what the clients saw (requests by code, tokens, time to first token, batch sizes)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from orchestra.config import ServeConfig
from orchestra.serve.app import Server, create_app
from orchestra.train.checkpoint.load import load_for_eval
from tests.serve.live import running, tiny_checkpoint
from tests.serve.prometheus import PrometheusServer, prometheus_fixture, value

pytestmark = pytest.mark.slow

prometheus = prometheus_fixture()


def test_prometheus_reads_the_servers_numbers(
    tmp_path: Path, prometheus: Callable[..., PrometheusServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ORCHESTRA_API_KEYS", raising=False)
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    cfg = ServeConfig(ckpt=str(ckpt), model_name="tiny", version="v7", max_batch_size=8, default_max_tokens=8)
    server = Server(cfg, load_for_eval(ckpt))
    with running(create_app(server)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        completion_tokens = []

        def ask(i: int) -> None:
            r = client.completions.create(
                model="tiny", prompt="def f():" * (1 + i % 3), max_tokens=6, temperature=0
            )
            completion_tokens.append(r.usage.completion_tokens)  # type: ignore[union-attr]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for _ in range(2):
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="other", prompt="a", max_tokens=2)

        prom = prometheus([url.removeprefix("http://")])
        prom.wait_for('up{job="orchestra"}', lambda r: bool(r) and r[0]["value"][1] == "1")
        ok = 'orchestra_requests_total{version="v7",model="tiny",endpoint="/v1/completions",code="200"}'
        assert value(prom.query(ok)) == 8
        assert value(prom.query('sum(orchestra_request_errors_total{version="v7",code="404"})')) == 2
        assert value(prom.query('orchestra_completion_tokens_total{version="v7"}')) == sum(completion_tokens)
        assert value(prom.query('orchestra_time_to_first_token_seconds_count{version="v7"}')) == 8
        steps = value(prom.query('orchestra_batch_size_count{version="v7"}'))
        tokens_in_steps = value(prom.query('orchestra_batch_size_sum{version="v7"}'))
        # Each decode step adds its batch size: every token but a request's first (its prefill's),
        # plus at most one stop token per request (which ends it and is not returned).
        assert sum(completion_tokens) - 8 <= tokens_in_steps <= sum(completion_tokens)
        assert steps < tokens_in_steps  # requests shared decode steps (mean batch above 1)
        p95 = value(
            prom.query(
                'histogram_quantile(0.95, orchestra_request_latency_seconds_bucket{version="v7",code!="404"})'
            )
        )
        assert 0 < p95 < 60
        assert value(prom.query('orchestra_queue_depth{version="v7"}')) == 0
