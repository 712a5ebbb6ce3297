"""Paired comparison of two models evaluated on the same examples: bootstrap intervals and p-values.

Two models scored on the same examples give *paired* per-example scores, and pairing is what
makes small differences detectable: the example-to-example variation (hard vs easy questions)
is shared by both models and cancels in the per-example difference. Every procedure here
therefore resamples or permutes *pairs* (Koehn 2004; Berg-Kirkpatrick et al. 2012; Dror et
al. 2018, "The Hitchhiker's Guide to Testing Statistical Significance in NLP"):

* :func:`paired_bootstrap`: percentile confidence interval of ``stat(b) - stat(a)``, resampling
  example indices jointly for a and b;
* :func:`bootstrap_p_value`: a two-sided p-value from the same bootstrap distribution, shifted to
  the null hypothesis;
* :func:`paired_permutation_test`: a two-sided sign-flip (paired permutation) test of the mean
  difference, exact for up to 16 pairs;
* :func:`compare`: the above in one call, with a direction-aware verdict.

All resampling is vectorised numpy with a fixed seed (results are reproducible) and done in
chunks, so memory stays bounded (about ``_CHUNK_ELEMENTS`` indices at a time) whatever the
number of examples or resamples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "Comparison",
    "bootstrap_p_value",
    "compare",
    "paired_bootstrap",
    "paired_permutation_test",
]

FloatArray = npt.NDArray[np.float64]
Scores = Sequence[float] | npt.NDArray[Any]
"""Per-example scores (or weights): a list or a 1-D numpy array, one value per example."""
Statistic = Literal["mean"] | Callable[[FloatArray], FloatArray]
"""``"mean"``, or a function from a ``[k, n]`` array of k resamples to their ``[k]`` statistics
(applied along the last axis, e.g. ``lambda x: np.median(x, axis=-1)``)."""

Verdict = Literal["b better", "a better", "no significant difference"]

_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once: 4M int64 = 32 MiB
_EXACT_MAX_N = 16  # sign-flip test enumerates all 2**n flips up to here (65,536 x 16)


@dataclass(frozen=True)
class Comparison:
    """Result of comparing model b against model a on one metric over the same n examples.

    ``a`` and ``b`` are the metric's (weighted) means, ``difference = b - a`` with the paired
    bootstrap interval ``[ci_low, ci_high]`` at confidence ``1 - alpha``; ``p_value`` comes from
    ``test`` ("permutation" or "bootstrap"). ``verdict`` reads the sign of the difference through
    ``higher_is_better``: for perplexity or NLL a negative difference means b is better.
    """

    metric: str
    a: float
    b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    test: str
    higher_is_better: bool
    verdict: str


# --------------------------------------------------------------------------- input checks


def _paired(
    a: Scores, b: Scores, weights: Scores | None, name: str
) -> tuple[FloatArray, FloatArray, FloatArray | None]:
    """a, b (and weights) as 1-D float64 arrays of one common, non-zero length, or a ValueError naming ``name``."""
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.ndim != 1 or xb.ndim != 1:
        raise ValueError(f"{name}: scores must be 1-D, got shapes {xa.shape} and {xb.shape}")
    if xa.shape != xb.shape:
        raise ValueError(
            f"{name}: a has {xa.size} scores but b has {xb.size}; a paired comparison needs the same examples"
        )
    if xa.size == 0:
        raise ValueError(f"{name}: no scores to compare")
    if not (np.isfinite(xa).all() and np.isfinite(xb).all()):
        raise ValueError(f"{name}: scores must be finite (found NaN or inf)")
    if weights is None:
        return xa, xb, None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != xa.shape:
        raise ValueError(f"{name}: {w.size} weights for {xa.size} paired scores")
    if not np.isfinite(w).all() or (w <= 0).any():
        # A zero weight (e.g. a document of no tokens) has no per-token score, and a resample made
        # only of such examples would divide by zero.
        raise ValueError(f"{name}: weights must be finite and > 0")
    return xa, xb, w


def _check_resampling(name: str, n_resamples: int, confidence: float | None = None) -> None:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"{name}: n_resamples must be a positive integer, got {n_resamples}")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"{name}: confidence must be in (0, 1), got {confidence}")


# --------------------------------------------------------------------------- bootstrap


def _mean(x: FloatArray, w: FloatArray | None) -> float:
    return float(np.mean(x)) if w is None else float(np.sum(w * x) / np.sum(w))


def _bootstrap_distribution(
    a: FloatArray,
    b: FloatArray,
    statistic: Statistic,
    weights: FloatArray | None,
    n_resamples: int,
    seed: int,
) -> tuple[float, FloatArray]:
    """The observed ``stat(b) - stat(a)`` and its ``[n_resamples]`` paired bootstrap replicates.

    Each replicate draws n example indices with replacement and evaluates both models on the same
    draw. For the (weighted) mean, ``stat(b[i]) - stat(a[i])`` is the (weighted) mean of the
    per-example difference, so only that is resampled.
    """
    n = a.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty(n_resamples, dtype=np.float64)
    if isinstance(statistic, str):
        if statistic != "mean":
            raise ValueError(f"statistic must be 'mean' or a callable, got {statistic!r}")
        d = b - a
        observed = _mean(d, weights)
        wd = d if weights is None else weights * d
        for start in range(0, n_resamples, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
            if weights is None:
                out[start : start + idx.shape[0]] = wd[idx].mean(axis=1)
            else:
                # Ratio of sums over the resample: sum(w*(b-a)) / sum(w), i.e. the difference of the
                # two token-weighted means (both have the same denominator).
                out[start : start + idx.shape[0]] = wd[idx].sum(axis=1) / weights[idx].sum(axis=1)
        return observed, out
    if weights is not None:
        raise ValueError("weights are only supported with statistic='mean'")
    observed = float(
        np.asarray(statistic(b[None, :]) - statistic(a[None, :]), dtype=np.float64).reshape(-1)[0]
    )
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        values = np.asarray(statistic(b[idx]) - statistic(a[idx]), dtype=np.float64)
        if values.shape != (idx.shape[0],):
            raise ValueError(
                f"statistic must map a [k, n] array to shape [k] (along the last axis), got {values.shape}"
            )
        out[start : start + idx.shape[0]] = values
    return observed, out


def _percentile_interval(replicates: FloatArray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def _shifted_p_value(observed: float, replicates: FloatArray) -> float:
    # Centre the bootstrap distribution on 0 (the null) and count replicates at least as far from 0
    # as the observed difference; +1 in numerator and denominator counts the observed sample itself.
    extreme = np.abs(replicates - observed) >= abs(observed) * (1.0 - 1e-12)
    return float((np.count_nonzero(extreme) + 1) / (replicates.size + 1))


def paired_bootstrap(
    a: Scores,
    b: Scores,
    *,
    statistic: Statistic = "mean",
    weights: Scores | None = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(difference, ci_low, ci_high)`` of ``stat(b) - stat(a)``, percentile interval from a paired bootstrap.

    Example indices are resampled jointly for a and b, so the interval reflects the variance of
    the *difference* (much smaller than either model's own when the two are correlated). With
    ``weights`` the statistic is the weighted mean ``sum(w * x) / sum(w)``, recomputed as a ratio
    of sums in every resample: for corpus NLL per token pass per-document NLL per token as the
    scores and token counts as the weights (a mean of per-document means would give a short
    document the weight of a long one).
    """
    xa, xb, w = _paired(a, b, weights, "paired_bootstrap")
    _check_resampling("paired_bootstrap", n_resamples, confidence)
    observed, replicates = _bootstrap_distribution(xa, xb, statistic, w, int(n_resamples), seed)
    low, high = _percentile_interval(replicates, confidence)
    return observed, low, high


def bootstrap_p_value(
    a: Scores,
    b: Scores,
    *,
    statistic: Statistic = "mean",
    weights: Scores | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> float:
    """Two-sided p-value for ``stat(b) == stat(a)`` from the paired bootstrap distribution shifted to the null.

    Method (Efron & Tibshirani 1993, sec. 16.4; the two-sided form of Berg-Kirkpatrick et al.
    2012): the bootstrap replicates ``d*`` of the difference approximate its sampling distribution
    around the observed ``d``; shifting them by ``-d`` gives an approximation of the distribution
    under the null (same shape, centred on 0). The p-value is the fraction of shifted replicates
    at least as extreme as ``d``: ``(#{|d* - d| >= |d|} + 1) / (n_resamples + 1)``. Identical
    inputs give 1.0. Uses the same resamples as :func:`paired_bootstrap` for the same seed.
    """
    xa, xb, w = _paired(a, b, weights, "bootstrap_p_value")
    _check_resampling("bootstrap_p_value", n_resamples)
    observed, replicates = _bootstrap_distribution(xa, xb, statistic, w, int(n_resamples), seed)
    return _shifted_p_value(observed, replicates)


# --------------------------------------------------------------------------- permutation


def _sign_flip_p_value(d: FloatArray, n_resamples: int, seed: int) -> float:
    """Two-sided p of ``|sum(d)|`` under random sign flips of the paired differences ``d``."""
    n = d.size
    observed = abs(float(np.sum(d)))
    # A flipped sum equal to the observed one may differ from it in the last bits (another
    # summation order); a tolerance relative to the scale of d keeps such ties counted as ties.
    threshold = observed - 1e-9 * float(np.sum(np.abs(d)))
    if n <= _EXACT_MAX_N:
        # Every one of the 2**n sign patterns once: the exact permutation distribution, which
        # contains the observed pattern, so no +1 correction.
        patterns = ((np.arange(1 << n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.float64)
        sums = np.abs((1.0 - 2.0 * patterns) @ d)
        return float(np.count_nonzero(sums >= threshold) / sums.size)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    count = 0
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        signs = rng.integers(0, 2, size=(k, n), dtype=np.int8) * 2 - 1
        count += int(np.count_nonzero(np.abs(signs @ d) >= threshold))
    # +1 in numerator and denominator: the observed assignment is one of the possible ones, and it
    # keeps a Monte-Carlo p-value from being 0 (Phipson & Smyth 2010).
    return float((count + 1) / (n_resamples + 1))


def paired_permutation_test(
    a: Scores,
    b: Scores,
    *,
    weights: Scores | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> float:
    """Two-sided p-value of the mean paired difference ``mean(b - a)`` by random sign flips.

    Under the null the two models are exchangeable on every example, so swapping a_i and b_i
    (flipping the sign of ``b_i - a_i``) leaves the distribution unchanged. With n <= 16 all
    2**n flips are enumerated (exact p); otherwise ``n_resamples`` random flips give
    ``(count + 1) / (n_resamples + 1)``. Identical inputs give 1.0. With ``weights`` the
    statistic is the weighted mean difference (weights stay with their example).
    """
    xa, xb, w = _paired(a, b, weights, "paired_permutation_test")
    _check_resampling("paired_permutation_test", n_resamples)
    d = xb - xa if w is None else w * (xb - xa)
    return _sign_flip_p_value(d, int(n_resamples), seed)


# --------------------------------------------------------------------------- compare


def _is_binary(x: FloatArray) -> bool:
    return bool(np.isin(x, (0.0, 1.0)).all())


def compare(
    metric: str,
    a: Scores,
    b: Scores,
    *,
    higher_is_better: bool,
    weights: Scores | None = None,
    test: Literal["auto", "permutation", "bootstrap"] = "auto",
    alpha: float = 0.05,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> Comparison:
    """Compare model b against model a on per-example scores of ``metric`` over the same examples.

    ``test="auto"`` uses the sign-flip permutation test for 0/1 scores (accuracy, exact match),
    where it is exact or nearly so, and the shifted bootstrap p-value otherwise. The interval
    is always the paired bootstrap percentile interval at confidence ``1 - alpha``. The verdict
    is "b better" / "a better" when ``p_value < alpha``, read through ``higher_is_better``
    (False for perplexity, NLL, error rates), else "no significant difference".
    """
    xa, xb, w = _paired(a, b, weights, metric)
    if test not in ("auto", "permutation", "bootstrap"):
        raise ValueError(f"{metric}: test must be 'auto', 'permutation' or 'bootstrap', got {test!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{metric}: alpha must be in (0, 1), got {alpha}")
    _check_resampling(metric, n_resamples)
    n_resamples = int(n_resamples)
    chosen = test
    if chosen == "auto":
        chosen = "permutation" if _is_binary(xa) and _is_binary(xb) else "bootstrap"

    observed, replicates = _bootstrap_distribution(xa, xb, "mean", w, n_resamples, seed)
    ci_low, ci_high = _percentile_interval(replicates, 1.0 - alpha)
    if chosen == "permutation":
        d = xb - xa if w is None else w * (xb - xa)
        p_value = _sign_flip_p_value(d, n_resamples, seed)
    else:
        p_value = _shifted_p_value(observed, replicates)

    verdict: Verdict = "no significant difference"
    if p_value < alpha and observed != 0.0:
        b_higher = observed > 0.0
        verdict = "b better" if b_higher == higher_is_better else "a better"
    return Comparison(
        metric=metric,
        a=_mean(xa, w),
        b=_mean(xb, w),
        difference=observed,
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=p_value,
        n=int(xa.size),
        test=chosen,
        higher_is_better=higher_is_better,
        verdict=verdict,
    )
