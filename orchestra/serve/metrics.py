"""Prometheus metrics shared by the server and the router.

One :class:`ServingMetrics` per process owns every serving metric in its own
:class:`~prometheus_client.CollectorRegistry`, so two instances in one process (tests, a router
embedding a server) never collide in the global registry. Every metric is labelled by the model
``version`` being served (the A/B arm) and, where it applies, the ``model`` name the client asked
for, so one dashboard compares arms side by side. All methods are safe to call from the engine
thread and the asyncio loop at the same time: prometheus_client's metrics lock internally and the
one piece of state kept here (the tokens-per-second window) has its own lock.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = [
    "BATCH_BUCKETS",
    "FEEDBACK_BUCKETS",
    "LATENCY_BUCKETS",
    "TTFT_BUCKETS",
    "ServingMetrics",
    "is_finite_number",
    "is_integer",
]

# Whole-request latency: a cached short completion (~5 ms) up to a long generation (2 min).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Time to first token is prefill plus queueing: finer at the low end, where users notice it.
TTFT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Sequences per decode step; powers of two match the batch sizes an engine is usually capped at.
BATCH_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(9))  # 1 .. 256
# Feedback scores are meant to lie in [0, 1]; other values still count (below 0 or in +Inf).
FEEDBACK_BUCKETS: tuple[float, ...] = tuple(i / 10 for i in range(11))

DEFAULT_TOKENS_WINDOW_S = 10.0


def is_finite_number(value: object) -> bool:
    """A finite real number, numpy scalars included (a function, so type checkers keep the caller's type)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def is_integer(value: object) -> bool:
    """An integer, numpy integers included, but not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _check_non_negative(name: str, value: float) -> None:
    if not (is_finite_number(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_code(code: int) -> None:
    if not (is_integer(code) and 100 <= code <= 599):
        raise ValueError(f"code must be an HTTP status code (100..599), got {code!r}")


def _default_error_type(code: int) -> str:
    """OpenAI's error ``type`` names, for callers that report only a status code."""
    if code == 429:
        return "rate_limit_error"
    if code >= 500:
        return "server_error"
    return "invalid_request_error"


class _TokensWindow:
    """Generated tokens per second over the last ``window_s`` seconds of wall time.

    Each decode step is recorded as the interval ``[end - seconds, end]`` with its token count;
    a step straddling the window's start counts pro rata. The rate is the tokens inside the
    window divided by the window's length, clipped to the time since the first recorded step so a
    freshly started process does not read low, and it falls to 0 once decoding stops.
    """

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._steps: deque[tuple[float, float, int]] = deque()  # (start, end, tokens)
        self._first_start: float | None = None

    def add(self, tokens: int, seconds: float) -> None:
        end = self._clock()
        start = end - seconds
        with self._lock:
            if self._first_start is None or start < self._first_start:
                self._first_start = start
            self._steps.append((start, end, tokens))
            self._evict(end)

    def _evict(self, now: float) -> None:
        horizon = now - self._window_s
        while self._steps and self._steps[0][1] <= horizon:
            self._steps.popleft()

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            self._evict(now)
            if self._first_start is None:
                return 0.0
            horizon = max(now - self._window_s, self._first_start)
            span = now - horizon
            if span <= 0:
                return 0.0
            total = 0.0
            for start, end, tokens in self._steps:
                length = end - start
                if length <= 0:
                    total += tokens if end > horizon else 0
                else:
                    overlap = min(end, now) - max(start, horizon)
                    total += tokens * max(0.0, overlap) / length
            return total / span


class ServingMetrics:
    """Every metric of one process (server or router), in its own CollectorRegistry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        tokens_window_s: float = DEFAULT_TOKENS_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_non_negative("tokens_window_s", tokens_window_s)
        if tokens_window_s == 0:
            raise ValueError("tokens_window_s must be > 0")
        self.registry = registry if registry is not None else CollectorRegistry()
        self._tokens_window_s = tokens_window_s
        self._clock = clock
        self._windows: dict[tuple[str, str], _TokensWindow] = {}
        self._windows_lock = threading.Lock()
        reg = self.registry

        self.requests = Counter(
            "orchestra_requests",
            "HTTP requests answered, by model version, model, endpoint and status code.",
            ["version", "model", "endpoint", "code"],
            registry=reg,
        )
        self.request_errors = Counter(
            "orchestra_request_errors",
            "Requests answered with a status code >= 400, by error type.",
            ["version", "model", "code", "type"],
            registry=reg,
        )
        self.request_latency = Histogram(
            "orchestra_request_latency_seconds",
            "Wall time from receiving a request to sending its last byte.",
            ["version", "model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.first_token = Histogram(
            "orchestra_time_to_first_token_seconds",
            "Wall time from receiving a request to its first generated token (queueing + prefill).",
            ["version", "model"],
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "orchestra_prompt_tokens",
            "Prompt tokens read.",
            ["version", "model"],
            registry=reg,
        )
        self.completion_tokens = Counter(
            "orchestra_completion_tokens",
            "Completion tokens generated and returned.",
            ["version", "model"],
            registry=reg,
        )
        self.queue_depth = Gauge(
            "orchestra_queue_depth",
            "Requests waiting for a slot in the running batch.",
            ["version", "model"],
            registry=reg,
        )
        self.running = Gauge(
            "orchestra_running_sequences",
            "Sequences in the running batch.",
            ["version", "model"],
            registry=reg,
        )
        self.batch_size = Histogram(
            "orchestra_batch_size",
            "Sequences per decode step (one observation per step).",
            ["version", "model"],
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.tokens_per_second = Gauge(
            "orchestra_generated_tokens_per_second",
            f"Tokens generated per second over the last {tokens_window_s:g} s.",
            ["version", "model"],
            registry=reg,
        )
        self.feedback = Counter(
            "orchestra_feedback",
            "User feedback received, by the model version that produced the answer.",
            ["version"],
            registry=reg,
        )
        self.feedback_score = Histogram(
            "orchestra_feedback_score",
            "User feedback scores (0 = bad, 1 = good).",
            ["version"],
            buckets=FEEDBACK_BUCKETS,
            registry=reg,
        )
        self.shadow_requests = Counter(
            "orchestra_shadow_requests",
            "Requests mirrored to a shadow version, by its status code.",
            ["version", "code"],
            registry=reg,
        )
        self.shadow_latency = Histogram(
            "orchestra_shadow_latency_seconds",
            "Latency of mirrored requests at the shadow version.",
            ["version"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )

    def observe_request(
        self,
        *,
        version: str,
        model: str,
        endpoint: str,
        code: int,
        latency_s: float,
        error_type: str | None = None,
    ) -> None:
        """One answered request; a status >= 400 also counts as an error of ``error_type``."""
        _check_code(code)
        _check_non_negative("latency_s", latency_s)
        self.requests.labels(version=version, model=model, endpoint=endpoint, code=str(int(code))).inc()
        if code >= 400:
            kind = error_type if error_type is not None else _default_error_type(code)
            self.request_errors.labels(version=version, model=model, code=str(int(code)), type=kind).inc()
        self.request_latency.labels(version=version, model=model, endpoint=endpoint).observe(latency_s)

    def observe_first_token(self, *, version: str, model: str, seconds: float) -> None:
        _check_non_negative("seconds", seconds)
        self.first_token.labels(version=version, model=model).observe(seconds)

    def add_tokens(self, *, version: str, model: str, prompt: int, completion: int) -> None:
        _check_non_negative("prompt", prompt)
        _check_non_negative("completion", completion)
        self.prompt_tokens.labels(version=version, model=model).inc(prompt)
        self.completion_tokens.labels(version=version, model=model).inc(completion)

    def set_queue_depth(self, *, version: str, model: str, depth: int) -> None:
        _check_non_negative("depth", depth)
        self.queue_depth.labels(version=version, model=model).set(depth)

    def set_running(self, *, version: str, model: str, running: int) -> None:
        _check_non_negative("running", running)
        self.running.labels(version=version, model=model).set(running)

    def observe_batch(self, *, version: str, model: str, size: int) -> None:
        _check_non_negative("size", size)
        self.batch_size.labels(version=version, model=model).observe(size)

    def observe_decode(self, *, version: str, model: str, tokens: int, seconds: float) -> None:
        """One decode step that produced ``tokens`` tokens in ``seconds`` and ended just now."""
        _check_non_negative("tokens", tokens)
        _check_non_negative("seconds", seconds)
        self._window(version, model).add(tokens, seconds)

    def _window(self, version: str, model: str) -> _TokensWindow:
        key = (version, model)
        with self._windows_lock:
            window = self._windows.get(key)
            if window is None:
                window = _TokensWindow(self._tokens_window_s, self._clock)
                self._windows[key] = window
                # Evaluated at scrape time, so the rate decays to 0 while nothing is decoded.
                self.tokens_per_second.labels(version=version, model=model).set_function(window.rate)
            return window

    def observe_feedback(self, *, version: str, score: float) -> None:
        if not is_finite_number(score):
            raise ValueError(f"score must be a finite number, got {score!r}")
        self.feedback.labels(version=version).inc()
        self.feedback_score.labels(version=version).observe(score)

    def observe_shadow(self, *, version: str, code: int, latency_s: float) -> None:
        _check_code(code)
        _check_non_negative("latency_s", latency_s)
        self.shadow_requests.labels(version=version, code=str(int(code))).inc()
        self.shadow_latency.labels(version=version).observe(latency_s)

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
