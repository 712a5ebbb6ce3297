"""orchestra.eval.stats: interval coverage by simulation, p-values against scipy, verdicts, weights and errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from orchestra.eval import stats
from orchestra.eval.stats import (
    Comparison,
    bootstrap_p_value,
    compare,
    paired_bootstrap,
    paired_permutation_test,
)


def _scipy_paired_p(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int) -> float:
    result = sps.permutation_test(
        (a, b),
        lambda x, y, axis: np.mean(y - x, axis=axis),
        permutation_type="samples",
        alternative="two-sided",
        n_resamples=n_resamples,
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_covers_the_true_difference_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(1234)
    true_difference, n, reps = 0.3, 40, 200
    covered = 0
    for rep in range(reps):
        a = rng.normal(0.0, 1.0, size=n)
        b = a + true_difference + rng.normal(0.0, 0.7, size=n)  # paired: b shares a's noise
        difference, low, high = paired_bootstrap(a, b, n_resamples=1000, confidence=0.95, seed=rep)
        assert low <= difference <= high
        covered += low <= true_difference <= high
    # Percentile intervals at n = 40 under-cover slightly; 200 repetitions have a s.e. of ~0.015.
    assert 0.90 <= covered / reps <= 0.99


def test_bootstrap_difference_and_interval_of_a_paired_sample() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    b = a + 0.1 + rng.normal(0.0, 0.2, size=500)
    difference, low, high = paired_bootstrap(a, b, n_resamples=4000)
    assert difference == pytest.approx(np.mean(b) - np.mean(a), abs=1e-12)
    # The interval width matches the normal-theory one for a mean of paired differences.
    se = np.std(b - a, ddof=1) / np.sqrt(a.size)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.1)
    # An unpaired interval would be ~5x wider (var(a) + var(b) instead of var(b - a)).
    assert high - low < 0.1


def test_bootstrap_is_reproducible_and_independent_of_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=37), rng.normal(size=37)
    first = paired_bootstrap(a, b, n_resamples=999, seed=3)
    assert paired_bootstrap(a, b, n_resamples=999, seed=3) == first
    assert paired_bootstrap(a, b, n_resamples=999, seed=4) != first
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 37 * 10)  # 100 chunks of 10 resamples
    assert paired_bootstrap(a, b, n_resamples=999, seed=3) == first


def test_weighted_bootstrap_is_the_difference_of_ratio_of_sums() -> None:
    rng = np.random.default_rng(7)
    tokens = rng.integers(5, 2000, size=60).astype(float)  # document lengths
    nll_a = rng.normal(3.0, 0.3, size=60)  # per-document NLL per token
    nll_b = nll_a - 0.05 + rng.normal(0.0, 0.05, size=60)
    difference, low, high = paired_bootstrap(nll_a, nll_b, weights=tokens, n_resamples=2000)
    expected = np.sum(tokens * nll_b) / np.sum(tokens) - np.sum(tokens * nll_a) / np.sum(tokens)
    assert difference == pytest.approx(expected, abs=1e-12)
    assert difference != pytest.approx(np.mean(nll_b) - np.mean(nll_a), abs=1e-6)
    assert low < difference < high
    comparison = compare("nll", nll_a, nll_b, weights=tokens, higher_is_better=False, n_resamples=2000)
    assert comparison.a == pytest.approx(np.sum(tokens * nll_a) / np.sum(tokens))
    assert comparison.difference == pytest.approx(expected, abs=1e-12)
    # Equal weights are the unweighted mean, resample for resample.
    ones = np.ones(60)
    unweighted = paired_bootstrap(nll_a, nll_b, n_resamples=500, seed=1)
    assert paired_bootstrap(nll_a, nll_b, weights=ones, n_resamples=500, seed=1) == pytest.approx(unweighted)


def test_bootstrap_with_a_custom_statistic() -> None:
    rng = np.random.default_rng(11)
    a = rng.exponential(size=80)
    b = a + 1.0
    difference, low, high = paired_bootstrap(a, b, statistic=lambda x: np.median(x, axis=-1), n_resamples=500)
    assert difference == pytest.approx(1.0)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)  # b - a is constant
    with pytest.raises(ValueError, match="weights"):
        paired_bootstrap(a, b, statistic=lambda x: np.median(x, axis=-1), weights=np.ones(80))
    with pytest.raises(ValueError, match=r"\[k\]"):
        paired_bootstrap(a, b, statistic=lambda x: x, n_resamples=10)


def test_bootstrap_p_value_is_1_for_identical_and_small_for_a_planted_difference() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=100)
    assert bootstrap_p_value(a, a.copy()) == 1.0
    p = bootstrap_p_value(a, a + 0.5 + rng.normal(size=100))
    assert p < 0.01
    assert p >= 1 / 10_001  # never 0


# --------------------------------------------------------------------------- permutation


def test_permutation_p_value_exact_hand_case() -> None:
    # d = (1, 1, 1): of the 8 sign patterns only +++ and --- reach |sum| >= 3.
    assert paired_permutation_test([0, 0, 0], [1, 1, 1]) == pytest.approx(2 / 8)
    # d = (1, 2): sums 3, 1, -1, -3 -> two of four reach |sum| >= 3.
    assert paired_permutation_test([0, 0], [1, 2]) == pytest.approx(0.5)


@pytest.mark.parametrize("binary", [False, True])
def test_exact_permutation_p_value_equals_scipy(binary: bool) -> None:
    rng = np.random.default_rng(3)
    if binary:  # 0/1 scores: many tied statistics
        a = (rng.random(14) < 0.4).astype(float)
        b = (rng.random(14) < 0.8).astype(float)
    else:
        a = rng.normal(size=12)
        b = a + 0.4 + rng.normal(size=12)
    # scipy enumerates all 2**n pairings when that is at most n_resamples.
    expected = _scipy_paired_p(a, b, n_resamples=100_000, seed=0)
    assert paired_permutation_test(a, b) == pytest.approx(expected, abs=1e-12)
    assert 0.001 < expected < 0.5  # a case where the p-value is informative


def test_monte_carlo_permutation_p_value_agrees_with_scipy() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=40)
    b = a + 0.3 + rng.normal(size=40)
    n_resamples = 20_000
    ours = paired_permutation_test(a, b, n_resamples=n_resamples, seed=1)
    theirs = _scipy_paired_p(a, b, n_resamples=n_resamples, seed=2)
    assert 0.01 < theirs < 0.3
    # Two independent Monte-Carlo estimates: 4 standard errors of their difference.
    se = np.sqrt(2 * theirs * (1 - theirs) / n_resamples)
    assert abs(ours - theirs) < 4 * se


def test_monte_carlo_p_value_has_the_plus_one_correction() -> None:
    rng = np.random.default_rng(6)
    a = rng.normal(size=50)
    b = a + 10.0  # no sign flip other than the identity reaches the observed sum
    assert paired_permutation_test(a, b, n_resamples=999) == pytest.approx(1 / 1000)
    assert bootstrap_p_value(a, b, n_resamples=999) == pytest.approx(1 / 1000)


def test_permutation_identical_inputs_give_p_1() -> None:
    a = np.random.default_rng(0).normal(size=50)
    assert paired_permutation_test(a, a.copy()) == 1.0
    assert paired_permutation_test(a[:10], a[:10].copy()) == 1.0  # exact path


# --------------------------------------------------------------------------- compare


def test_planted_difference_is_detected() -> None:
    rng = np.random.default_rng(8)
    a = rng.normal(size=200)
    b = a + 0.5 + rng.normal(size=200)
    result = compare("score", a, b, higher_is_better=True)
    assert isinstance(result, Comparison)
    assert result.test == "bootstrap"
    assert result.p_value < 0.01
    assert result.verdict == "b better"
    assert 0.0 < result.ci_low < result.difference < result.ci_high
    assert result.difference == pytest.approx(np.mean(b) - np.mean(a))
    assert result.n == 200
    swapped = compare("score", b, a, higher_is_better=True)
    assert swapped.verdict == "a better"
    assert swapped.difference == pytest.approx(-result.difference)


def test_binary_scores_use_the_permutation_test() -> None:
    rng = np.random.default_rng(9)
    correct_a = (rng.random(400) < 0.55).astype(float)
    correct_b = np.where(rng.random(400) < 0.3, 1.0, correct_a)  # b fixes some of a's errors
    result = compare("exact_match", correct_a, correct_b, higher_is_better=True)
    assert result.test == "permutation"
    assert result.p_value < 0.01
    assert result.verdict == "b better"
    assert result.a == pytest.approx(correct_a.mean()) and result.b == pytest.approx(correct_b.mean())
    assert (
        compare("exact_match", correct_a, correct_b, higher_is_better=True, test="bootstrap").test
        == "bootstrap"
    )


def test_identical_models_are_not_different() -> None:
    a = np.random.default_rng(10).normal(size=60)
    for values in (a, (a > 0).astype(float)):
        result = compare("m", values, values.copy(), higher_is_better=True)
        assert result.p_value == 1.0
        assert result.verdict == "no significant difference"
        assert result.difference == 0.0 and result.ci_low == 0.0 and result.ci_high == 0.0


def test_lower_is_better_for_perplexity() -> None:
    rng = np.random.default_rng(12)
    ppl_a = rng.uniform(10.0, 30.0, size=100)
    ppl_b = ppl_a * 0.9 + rng.normal(0.0, 0.5, size=100)  # b has lower perplexity
    result = compare("perplexity", ppl_a, ppl_b, higher_is_better=False)
    assert result.difference < 0
    assert result.verdict == "b better"
    assert result.higher_is_better is False
    assert compare("perplexity", ppl_b, ppl_a, higher_is_better=False).verdict == "a better"
    # Read the other way round, the same numbers favour a.
    assert compare("perplexity", ppl_a, ppl_b, higher_is_better=True).verdict == "a better"


def test_interval_confidence_follows_alpha() -> None:
    rng = np.random.default_rng(14)
    a = rng.normal(size=80)
    b = a + 0.2 + rng.normal(size=80)
    wide = compare("score", a, b, higher_is_better=True, alpha=0.01)
    narrow = compare("score", a, b, higher_is_better=True, alpha=0.2)
    assert (wide.ci_low, wide.ci_high) == pytest.approx(paired_bootstrap(a, b, confidence=0.99)[1:])
    assert narrow.ci_high - narrow.ci_low < wide.ci_high - wide.ci_low
    assert wide.p_value == narrow.p_value  # same resamples; only the threshold moves


def test_small_noisy_difference_is_not_significant() -> None:
    rng = np.random.default_rng(13)
    a = rng.normal(size=30)
    b = a + 0.01 + rng.normal(size=30)
    result = compare("score", a, b, higher_is_better=True, n_resamples=2000)
    assert result.p_value > 0.05
    assert result.verdict == "no significant difference"
    assert result.ci_low < 0.0 < result.ci_high


def test_errors_name_the_metric() -> None:
    with pytest.raises(ValueError, match="accuracy"):
        compare("accuracy", [1, 0, 1], [1, 0], higher_is_better=True)
    with pytest.raises(ValueError, match="rougeL"):
        compare("rougeL", [], [], higher_is_better=True)
    with pytest.raises(ValueError, match=r"nll.*weights"):
        compare("nll", [1.0, 2.0], [1.0, 2.0], weights=[1.0], higher_is_better=False)
    with pytest.raises(ValueError, match=r"nll.*> 0"):
        compare("nll", [1.0, 2.0], [1.0, 2.0], weights=[1.0, 0.0], higher_is_better=False)
    with pytest.raises(ValueError, match=r"bleu.*finite"):
        compare("bleu", [1.0, float("nan")], [1.0, 2.0], higher_is_better=True)
    with pytest.raises(ValueError, match="test"):
        compare("f1", [1.0], [1.0], higher_is_better=True, test="t-test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="same examples"):
        paired_permutation_test([1.0, 2.0], [1.0, 2.0, 3.0])
