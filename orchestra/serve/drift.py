"""Drift of the traffic a model version serves: are today's prompts still like the first ones?

Per version, the first ``window`` requests are the reference; every later full window of
``window`` requests is compared with it on three signals, each chosen to catch a different way
production traffic leaves what the model was tested on:

* prompt length in tokens: the two-sample Kolmogorov–Smirnov statistic and its p-value (the
  exact distribution for windows up to 2000 requests, Kolmogorov's limit beyond);
* language mix: the Jensen–Shannon distance (base 2, in [0, 1]) between the two windows'
  language distributions, from an offline language identifier (``langdetect``'s bundled
  profiles, 55 languages);
* the model's own mean negative log-likelihood per prompt token, on the requests the server
  scored: the difference of means and Welch's z-score. Prompts the model finds surprising are
  the ones its answers are least reliable on.

The latest scores are also Prometheus gauges (``orchestra_drift_*{version}``) so alerts can fire
on them. KS is computed with numpy here rather than scipy, which serving does not depend on.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

from orchestra.serve.metrics import is_finite_number, is_integer

if TYPE_CHECKING:
    from langdetect.detector_factory import DetectorFactory

__all__ = ["DriftMonitor", "identify_language", "jensen_shannon_distance", "kolmogorov_sf", "ks_2samp"]

# Texts with fewer letters than this are "und" (undetermined): a greeting or a number says
# nothing reliable about a language, and guessing would add noise to the language mix.
MIN_LETTERS = 12
# Language is read from the start of a prompt: enough for a confident guess, bounded cost.
LANGUAGE_PREFIX_CHARS = 1000
# Windows up to this many pairs (m * n, 2000 x 2000 requests) get the exact KS p-value, which costs
# O(m n) (~0.1 s at the limit); larger ones Kolmogorov's limit.
EXACT_KS_MAX_PAIRS = 4_000_000

_factory: DetectorFactory | None = None
_factory_lock = threading.Lock()


def _detector_factory() -> DetectorFactory:
    """langdetect's profiles, loaded once (~0.3 s), in a factory of our own with a fixed seed.

    langdetect samples n-grams at random; a seeded factory makes the same text always get the
    same language, without touching the library's module-level factory other code may use.
    """
    global _factory
    with _factory_lock:
        if _factory is None:
            from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

            factory = DetectorFactory()
            factory.load_profile(PROFILES_DIRECTORY)
            factory.set_seed(0)
            _factory = factory
        return _factory


def identify_language(text: str) -> str:
    """ISO 639-1 code of the text's language (``zh`` for Chinese), ``und`` when it is too short."""
    from langdetect.lang_detect_exception import LangDetectException

    head = text[:LANGUAGE_PREFIX_CHARS]
    if sum(ch.isalpha() for ch in head) < MIN_LETTERS:
        return "und"
    detector = _detector_factory().create()
    detector.append(head)
    try:
        code: str = detector.detect()
    except LangDetectException:
        return "und"
    return code.split("-")[0]


def _ks_exact_pvalue(d_scaled: int, m: int, n: int) -> float:
    """P(D >= observed) for two samples of sizes m, n from one continuous distribution.

    A uniformly random monotone lattice path from (0, 0) to (m, n) is a random interleaving of
    the two sorted samples; D >= d exactly when the path touches ``|i n - j m| >= d m n``. The
    probability mass is propagated one anti-diagonal at a time, each step weighted by the
    fraction of remaining steps in its direction (every path then weighs 1 / C(m + n, m)), so
    nothing overflows; mass that touches the boundary is summed and removed. Summing the
    outside mass, rather than taking 1 - inside, keeps tiny p-values accurate.
    """
    prev = np.array([1.0])  # the diagonal i + j = 0: the single cell (0, 0)
    prev_lo = 0
    outside = 0.0
    for k in range(1, m + n + 1):
        lo, hi = max(0, k - n), min(k, m)
        i = np.arange(lo, hi + 1)
        remaining = m + n - (k - 1)  # steps left from the previous diagonal
        cur = np.zeros(len(i))
        # From (i - 1, j): a step of the first sample, probability (m - (i - 1)) / remaining.
        from_i = i - 1 - prev_lo
        ok = (from_i >= 0) & (from_i < len(prev))
        cur[ok] += prev[from_i[ok]] * (m - (i[ok] - 1)) / remaining
        # From (i, j - 1): a step of the second sample, probability (n - (j - 1)) / remaining.
        from_j = i - prev_lo
        ok = (from_j >= 0) & (from_j < len(prev))
        cur[ok] += prev[from_j[ok]] * (n - (k - 1 - i[ok])) / remaining
        touched = np.abs(i * n - (k - i) * m) >= d_scaled
        outside += float(cur[touched].sum())
        cur[touched] = 0.0
        prev, prev_lo = cur, lo
    return min(1.0, outside)


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for Kolmogorov's limiting distribution, from whichever series converges fast."""
    if x <= 0:
        return 1.0
    if x < 1.0:
        # Jacobi theta form: 1 - sqrt(2 pi) / x * sum exp(-(2k-1)^2 pi^2 / (8 x^2)).
        total = sum(math.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * x * x)) for k in range(1, 50))
        return min(1.0, max(0.0, 1.0 - math.sqrt(2 * math.pi) / x * total))
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 100))
    return min(1.0, max(0.0, 2.0 * total))


def ks_2samp(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov–Smirnov statistic and p-value (as scipy's ``ks_2samp``).

    The statistic is the largest gap between the two empirical CDFs over the pooled sample.
    The p-value is exact (no ties assumed) while ``len(a) * len(b) <= EXACT_KS_MAX_PAIRS``,
    else Kolmogorov's asymptotic distribution at ``sqrt(m n / (m + n)) * D``.
    """
    x = np.sort(np.asarray(a, dtype=float))
    y = np.sort(np.asarray(b, dtype=float))
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError(f"ks_2samp needs two non-empty samples, got sizes {m} and {n}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("ks_2samp needs finite values (a sample holds NaN or infinity)")
    pooled = np.concatenate([x, y])
    # D = max |i/m - j/n| over the pooled points, with i, j the counts at or below each point:
    # kept as the integer max |i n - j m| so the p-value's boundary is exact.
    below_x = np.searchsorted(x, pooled, side="right").astype(np.int64)
    below_y = np.searchsorted(y, pooled, side="right").astype(np.int64)
    d_scaled = int(np.max(np.abs(below_x * n - below_y * m)))
    d = d_scaled / (m * n)
    if d_scaled == 0:
        return 0.0, 1.0
    if m * n <= EXACT_KS_MAX_PAIRS:
        return d, _ks_exact_pvalue(d_scaled, m, n)
    return d, kolmogorov_sf(math.sqrt(m * n / (m + n)) * d)


def jensen_shannon_distance(p: dict[str, float], q: dict[str, float]) -> float:
    """sqrt of the Jensen–Shannon divergence (base 2) of two distributions over labels: 0 .. 1."""
    labels = sorted(set(p) | set(q))
    pv = np.array([p.get(k, 0.0) for k in labels], dtype=float)
    qv = np.array([q.get(k, 0.0) for k in labels], dtype=float)
    if pv.sum() <= 0 or qv.sum() <= 0:
        raise ValueError("jensen_shannon_distance needs two non-empty distributions")
    pv, qv = pv / pv.sum(), qv / qv.sum()
    mid = (pv + qv) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / mid[nz])))

    return math.sqrt(max(0.0, (kl(pv) + kl(qv)) / 2))


@dataclass
class _Window:
    """The raw observations of one window of requests."""

    lengths: list[int] = field(default_factory=list)
    languages: Counter[str] = field(default_factory=Counter)
    nlls: list[float] = field(default_factory=list)

    def add(self, length: int, language: str, nll: float | None) -> None:
        self.lengths.append(length)
        self.languages[language] += 1
        if nll is not None:
            self.nlls.append(nll)

    def __len__(self) -> int:
        return len(self.lengths)

    def language_mix(self) -> dict[str, float]:
        total = sum(self.languages.values())
        return {lang: count / total for lang, count in sorted(self.languages.items())}

    def stats(self) -> dict[str, Any]:
        lengths = np.asarray(self.lengths, dtype=float)
        nll: dict[str, Any] | None = None
        if self.nlls:
            values = np.asarray(self.nlls)
            std = float(values.std(ddof=1)) if len(values) > 1 else None
            nll = {"n": len(values), "mean": float(values.mean()), "std": std}
        return {
            "n": len(self),
            "prompt_tokens": {
                "mean": float(lengths.mean()),
                "p50": float(np.percentile(lengths, 50)),
                "p95": float(np.percentile(lengths, 95)),
                "max": int(lengths.max()),
            },
            "languages": self.language_mix(),
            "prompt_nll": nll,
        }


def _nll_shift(reference: list[float], current: list[float]) -> tuple[float | None, float | None]:
    """Difference of mean NLL (current - reference) and Welch's z; None where undefined."""
    if not reference or not current:
        return None, None
    delta = float(np.mean(current) - np.mean(reference))
    if len(reference) < 2 or len(current) < 2:
        return delta, None
    se = math.sqrt(np.var(reference, ddof=1) / len(reference) + np.var(current, ddof=1) / len(current))
    if se == 0:
        return delta, 0.0 if delta == 0 else None
    return delta, delta / se


@dataclass
class _VersionState:
    reference: _Window = field(default_factory=_Window)
    reference_done: bool = False
    filling: _Window = field(default_factory=_Window)
    current: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None
    observed: int = 0
    windows_compared: int = 0


class DriftMonitor:
    """Reference-vs-current drift scores per model version, in a snapshot and as gauges."""

    def __init__(self, window: int, registry: CollectorRegistry | None = None) -> None:
        if not (is_integer(window) and window >= 2):
            raise ValueError(f"window must be an integer >= 2 (requests per drift window), got {window!r}")
        self.window = int(window)
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._versions: dict[str, _VersionState] = {}
        reg = self.registry
        self.length_ks = Gauge(
            "orchestra_drift_prompt_length_ks",
            "Kolmogorov-Smirnov statistic of prompt lengths, latest window vs the reference window.",
            ["version"],
            registry=reg,
        )
        self.length_ks_p = Gauge(
            "orchestra_drift_prompt_length_ks_pvalue",
            "p-value of the prompt-length KS test (small: the lengths changed).",
            ["version"],
            registry=reg,
        )
        self.language_js = Gauge(
            "orchestra_drift_language_js",
            "Jensen-Shannon distance (base 2) of the prompt language mix, latest window vs reference.",
            ["version"],
            registry=reg,
        )
        self.nll_delta = Gauge(
            "orchestra_drift_prompt_nll_delta",
            "Mean prompt NLL per token of the latest window minus the reference window's.",
            ["version"],
            registry=reg,
        )
        self.nll_z = Gauge(
            "orchestra_drift_prompt_nll_z",
            "Welch z-score of the prompt NLL difference.",
            ["version"],
            registry=reg,
        )

    def observe(
        self, *, version: str, prompt_tokens: int, text: str, prompt_nll: float | None = None
    ) -> None:
        """One served request: its prompt length, its text (for the language) and, if scored, its NLL."""
        if not (is_integer(prompt_tokens) and prompt_tokens >= 0):
            raise ValueError(f"prompt_tokens must be an integer >= 0, got {prompt_tokens!r}")
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        if prompt_nll is not None and not is_finite_number(prompt_nll):
            raise ValueError(f"prompt_nll must be a finite number or None, got {prompt_nll!r}")
        language = identify_language(text)
        nll = None if prompt_nll is None else float(prompt_nll)
        length = int(prompt_tokens)
        with self._lock:
            state = self._versions.setdefault(version, _VersionState())
            state.observed += 1
            if not state.reference_done:
                state.reference.add(length, language, nll)
                state.reference_done = len(state.reference) >= self.window
                return
            state.filling.add(length, language, nll)
            if len(state.filling) < self.window:
                return
            finished, state.filling = state.filling, _Window()
            self._compare(version, state, finished)

    def _compare(self, version: str, state: _VersionState, window: _Window) -> None:
        ref = state.reference
        ks, ks_p = ks_2samp(ref.lengths, window.lengths)
        js = jensen_shannon_distance(ref.language_mix(), window.language_mix())
        nll_delta, nll_z = _nll_shift(ref.nlls, window.nlls)
        state.current = window.stats()
        state.windows_compared += 1
        state.drift = {
            "prompt_length_ks": ks,
            "prompt_length_ks_pvalue": ks_p,
            "language_js": js,
            "prompt_nll_delta": nll_delta,
            "prompt_nll_z": nll_z,
        }
        self.length_ks.labels(version=version).set(ks)
        self.length_ks_p.labels(version=version).set(ks_p)
        self.language_js.labels(version=version).set(js)
        if nll_delta is not None:
            self.nll_delta.labels(version=version).set(nll_delta)
        if nll_z is not None:
            self.nll_z.labels(version=version).set(nll_z)

    def snapshot(self) -> dict[str, Any]:
        """Per version: the reference window's stats, the latest compared window's, and the scores.

        ``reference`` is None until the first ``window`` requests are in, ``current`` and
        ``drift`` until the next full window; ``filling`` counts the requests of the window
        being filled. Every value is JSON-safe (no NaN or infinity).
        """
        with self._lock:
            versions = {}
            for version, state in sorted(self._versions.items()):
                versions[version] = {
                    "observed": state.observed,
                    "reference": state.reference.stats() if state.reference_done else None,
                    "current": state.current,
                    "drift": dict(state.drift) if state.drift is not None else None,
                    "windows_compared": state.windows_compared,
                    "filling": len(state.filling) if state.reference_done else len(state.reference),
                }
            return {"window": self.window, "versions": versions}
