"""ServingMetrics: what /metrics exposes, read back through prometheus_client's own text parser."""

from __future__ import annotations

import math
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestra.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, ServingMetrics


def samples(metrics: ServingMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the rendered exposition, keyed by (sample name, labels)."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def expected_buckets(observations: list[float], bounds: tuple[float, ...]) -> dict[str, float]:
    """Cumulative bucket counts as the exposition format defines them: observations <= le."""
    out = {repr(float(b)): float(sum(1 for o in observations if o <= b)) for b in bounds}
    out["+Inf"] = float(len(observations))
    return out


def bucket_counts(found: dict, name: str, **labels: str) -> dict[str, float]:
    out = {}
    for (sample_name, sample_labels), v in found.items():
        lab = dict(sample_labels)
        le = lab.pop("le", None)
        if sample_name == name + "_bucket" and lab == labels and le is not None:
            out[repr(float(le)) if le != "+Inf" else "+Inf"] = v
    return out


def test_requests_errors_and_latency_histogram() -> None:
    m = ServingMetrics()
    chat = {"version": "v1", "model": "tiny", "endpoint": "/v1/chat/completions"}
    latencies = [0.003, 0.02, 0.02, 0.7, 3.0, 150.0]
    for latency in latencies:
        m.observe_request(**chat, code=200, latency_s=latency)
    m.observe_request(**chat, code=400, latency_s=0.001, error_type="invalid_request_error")
    m.observe_request(**chat, code=503, latency_s=0.5)
    m.observe_request(version="v2", model="tiny", endpoint="/v1/completions", code=429, latency_s=0.01)

    found = samples(m)
    assert value(found, "orchestra_requests_total", **chat, code="200") == 6
    assert value(found, "orchestra_requests_total", **chat, code="400") == 1
    assert value(found, "orchestra_requests_total", **chat, code="503") == 1
    errors = {k: v for k, v in found.items() if k[0] == "orchestra_request_errors_total"}
    assert errors == {
        ("orchestra_request_errors_total", frozenset(
            {"version": "v1", "model": "tiny", "code": "400", "type": "invalid_request_error"}.items())): 1,
        ("orchestra_request_errors_total", frozenset(
            {"version": "v1", "model": "tiny", "code": "503", "type": "server_error"}.items())): 1,
        ("orchestra_request_errors_total", frozenset(
            {"version": "v2", "model": "tiny", "code": "429", "type": "rate_limit_error"}.items())): 1,
    }  # fmt: skip

    all_v1 = [*latencies, 0.001, 0.5]
    name = "orchestra_request_latency_seconds"
    assert bucket_counts(found, name, **chat) == expected_buckets(all_v1, LATENCY_BUCKETS)
    assert value(found, name + "_count", **chat) == len(all_v1)
    assert value(found, name + "_sum", **chat) == pytest.approx(sum(all_v1))
    assert LATENCY_BUCKETS[0] == 0.005 and LATENCY_BUCKETS[-1] == 120.0


def test_tokens_gauges_batch_first_token() -> None:
    m = ServingMetrics()
    arm = {"version": "b", "model": "llama"}
    m.add_tokens(**arm, prompt=12, completion=30)
    m.add_tokens(**arm, prompt=5, completion=0)
    m.set_queue_depth(**arm, depth=7)
    m.set_queue_depth(**arm, depth=3)
    m.set_running(**arm, running=16)
    sizes = [1, 3, 3, 8, 200, 256, 300]
    for size in sizes:
        m.observe_batch(**arm, size=size)
    for ttft in (0.04, 0.3):
        m.observe_first_token(**arm, seconds=ttft)

    found = samples(m)
    assert value(found, "orchestra_prompt_tokens_total", **arm) == 17
    assert value(found, "orchestra_completion_tokens_total", **arm) == 30
    assert value(found, "orchestra_queue_depth", **arm) == 3
    assert value(found, "orchestra_running_sequences", **arm) == 16
    assert BATCH_BUCKETS == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert bucket_counts(found, "orchestra_batch_size", **arm) == expected_buckets(sizes, BATCH_BUCKETS)
    assert value(found, "orchestra_time_to_first_token_seconds_count", **arm) == 2
    assert value(found, "orchestra_time_to_first_token_seconds_sum", **arm) == pytest.approx(0.34)


def test_feedback_and_shadow() -> None:
    m = ServingMetrics()
    scores = [1.0, 0.0, 0.75, 1.0, -0.5, 2.0]
    for score in scores:
        m.observe_feedback(version="a", score=score)
    m.observe_shadow(version="c", code=200, latency_s=0.2)
    m.observe_shadow(version="c", code=500, latency_s=1.5)
    m.observe_shadow(version="c", code=200, latency_s=0.4)

    found = samples(m)
    assert value(found, "orchestra_feedback_total", version="a") == len(scores)
    assert value(found, "orchestra_feedback_score_sum", version="a") == pytest.approx(sum(scores))
    buckets = bucket_counts(found, "orchestra_feedback_score", version="a")
    assert buckets == expected_buckets(scores, tuple(i / 10 for i in range(11)))
    assert buckets["0.0"] == 2 and buckets["1.0"] == 5 and buckets["+Inf"] == 6
    assert value(found, "orchestra_shadow_requests_total", version="c", code="200") == 2
    assert value(found, "orchestra_shadow_requests_total", version="c", code="500") == 1
    assert value(found, "orchestra_shadow_latency_seconds_sum", version="c") == pytest.approx(2.1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tokens_per_second_sliding_window() -> None:
    clock = FakeClock()
    m = ServingMetrics(clock=clock)
    arm = {"version": "a", "model": "m"}
    rate = "orchestra_generated_tokens_per_second"

    # 20 back-to-back steps of 0.5 s, 4 tokens each: 8 tokens/s while busy.
    for _ in range(20):
        clock.now += 0.5
        m.observe_decode(**arm, tokens=4, seconds=0.5)
    assert value(samples(m), rate, **arm) == pytest.approx(8.0)

    # A faster stretch: 10 steps of 0.25 s with 6 tokens (24 tokens/s) for the last 2.5 s.
    for _ in range(10):
        clock.now += 0.25
        m.observe_decode(**arm, tokens=6, seconds=0.25)
    # Window = last 10 s: 7.5 s at 8 tokens/s + 2.5 s at 24 tokens/s.
    assert value(samples(m), rate, **arm) == pytest.approx((7.5 * 8 + 2.5 * 24) / 10)

    # Idle for 4 s: the window's last 6 s of decoding remain, 3.5 s at 8/s and 2.5 s at 24/s.
    clock.now += 4.0
    assert value(samples(m), rate, **arm) == pytest.approx((3.5 * 8 + 2.5 * 24) / 10)
    # Idle past the window: nothing decoded in the last 10 s.
    clock.now += 10.0
    assert value(samples(m), rate, **arm) == 0.0

    # A step straddling the window start counts pro rata: one 4 s step of 40 tokens, then 8 s idle.
    clock.now += 4.0
    m.observe_decode(**arm, tokens=40, seconds=4.0)
    clock.now += 8.0
    assert value(samples(m), rate, **arm) == pytest.approx(40 * (2.0 / 4.0) / 10)


def test_tokens_per_second_young_process_is_not_diluted() -> None:
    clock = FakeClock()
    m = ServingMetrics(clock=clock)
    clock.now += 1.0
    m.observe_decode(version="a", model="m", tokens=50, seconds=1.0)
    # One second of history: 50 tokens/s, not 5 (50 over the full 10 s window).
    assert value(samples(m), "orchestra_generated_tokens_per_second", version="a", model="m") == 50.0


def test_concurrent_calls_lose_nothing() -> None:
    m = ServingMetrics()
    threads, per_thread = 8, 500
    arm = {"version": "a", "model": "m"}

    def work() -> None:
        for i in range(per_thread):
            m.observe_request(**arm, endpoint="/v1/completions", code=200, latency_s=0.01)
            m.add_tokens(**arm, prompt=2, completion=3)
            m.observe_decode(**arm, tokens=1, seconds=0.001)
            if i % 50 == 0:  # scrapes interleaved with updates
                m.render()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    found = samples(m)
    total = threads * per_thread
    assert value(found, "orchestra_requests_total", **arm, endpoint="/v1/completions", code="200") == total
    assert value(found, "orchestra_completion_tokens_total", **arm) == 3 * total
    assert math.isfinite(value(found, "orchestra_generated_tokens_per_second", **arm))


def test_instances_do_not_share_a_registry() -> None:
    a, b = ServingMetrics(), ServingMetrics()
    a.observe_feedback(version="x", score=1.0)
    assert ("orchestra_feedback_total", frozenset({"version": "x"}.items())) not in samples(b)


@pytest.mark.parametrize(
    ("call", "culprit"),
    [
        (
            lambda m: m.observe_request(version="a", model="m", endpoint="/", code=200, latency_s=-1),
            "latency_s",
        ),
        (lambda m: m.observe_request(version="a", model="m", endpoint="/", code=42, latency_s=1), "code"),
        (lambda m: m.add_tokens(version="a", model="m", prompt=-1, completion=0), "prompt"),
        (lambda m: m.set_queue_depth(version="a", model="m", depth=-3), "depth"),
        (lambda m: m.observe_decode(version="a", model="m", tokens=1, seconds=math.inf), "seconds"),
        (lambda m: m.observe_feedback(version="a", score=math.nan), "score"),
        (lambda m: m.observe_shadow(version="a", code=200, latency_s=math.nan), "latency_s"),
    ],
)
def test_bad_values_name_the_argument(call, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        call(ServingMetrics())


def test_numpy_scalars_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    m = ServingMetrics()
    arm = {"version": "a", "model": "m"}
    m.observe_request(**arm, endpoint="/v1/completions", code=np.int64(200), latency_s=np.float32(0.5))
    m.add_tokens(**arm, prompt=np.int64(3), completion=np.int32(2))
    m.observe_feedback(version="a", score=np.float32(0.5))
    found = samples(m)
    assert value(found, "orchestra_requests_total", **arm, endpoint="/v1/completions", code="200") == 1
    assert value(found, "orchestra_prompt_tokens_total", **arm) == 3
