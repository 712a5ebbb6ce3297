"""The always-valid comparison: error rate under peeking after every observation, power, coverage.

The simulations evaluate thousands of sequences at once with numpy, through the same
``log_mixture_ratio`` / ``half_width`` the comparison uses; a few sequences are also run
through :class:`SequentialComparison` one observation at a time to show both paths agree.
The closed form is checked against numerical integration of the mixture, the fixed-sample
statistic against scipy.stats.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from orchestra.serve.sequential import (
    DEFAULT_EFFECT_SCALE,
    ArmStats,
    SequentialComparison,
    half_width,
    log_mixture_ratio,
    mean_confidence_sequence,
)

ALPHA = 0.05
MIN_SAMPLES = 20


def binomial_margin(n: int, p: float = ALPHA) -> float:
    """Three binomial standard errors of a rate p estimated from n experiments."""
    return 3 * math.sqrt(p * (1 - p) / n)


def cumulative(x: np.ndarray, mask: np.ndarray, binary: bool = False) -> tuple[np.ndarray, ...]:
    """Running n, mean and plug-in variance of the observations where mask holds, along axis 1."""
    n = np.cumsum(mask, axis=1)
    total = np.cumsum(np.where(mask, x, 0.0), axis=1)
    squares = np.cumsum(np.where(mask, x * x, 0.0), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / n
        if binary:
            rate = (total + 0.5) / (n + 1)
            var = rate * (1 - rate)
        else:
            var = (squares - n * mean * mean) / (n - 1)
    return n, mean, var


def simulate(x: np.ndarray, treated: np.ndarray, theta0: float = 0.0, binary: bool = False) -> dict:
    """Always-valid p-values of "difference = theta0" after every observation, for every sequence."""
    n_t, mean_t, var_t = cumulative(x, treated, binary)
    n_c, mean_c, var_c = cumulative(x, ~treated, binary)
    ready = (n_t >= MIN_SAMPLES) & (n_c >= MIN_SAMPLES)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = var_t / n_t + var_c / n_c
        pooled = ((n_t - 1) * var_t + (n_c - 1) * var_c) / (n_t + n_c - 2)
        tau2 = DEFAULT_EFFECT_SCALE**2 * pooled
        diff = mean_t - mean_c
        log_lr = np.where(ready, log_mixture_ratio(diff - theta0, var, tau2), -np.inf)
        width = np.where(ready, half_width(var, tau2, ALPHA), np.inf)
    p = np.minimum(1.0, np.minimum.accumulate(np.exp(-log_lr), axis=1))
    return {
        "p": p,
        "ready": ready,
        "diff": diff,
        "var": var,
        "n_t": n_t,
        "n_c": n_c,
        "mean_t": mean_t,
        "mean_c": mean_c,
        "var_t": var_t,
        "var_c": var_c,
        "low": np.maximum.accumulate(np.where(ready, diff - width, -np.inf), axis=1),
        "high": np.minimum.accumulate(np.where(ready, diff + width, np.inf), axis=1),
    }


def normal_experiments(rng: np.random.Generator, runs: int, steps: int, effect: float = 0.0) -> tuple:
    treated = rng.random((runs, steps)) < 0.5
    x = rng.normal(0.0, 1.0, (runs, steps)) + effect * treated
    return x, treated


# --- the closed form and its fixed-sample limit ---------------------------------------------------------


@pytest.mark.parametrize(
    ("diff", "var", "tau2"), [(0.0, 0.01, 0.01), (0.05, 0.002, 0.0004), (-0.3, 0.05, 0.2)]
)
def test_closed_form_equals_the_integrated_mixture(diff: float, var: float, tau2: float) -> None:
    """Lambda = integral of N(d; theta, V) / N(d; 0, V) over theta ~ N(0, tau2), integrated numerically."""

    def integrand(theta: float) -> float:
        ratio = stats.norm.pdf(diff, theta, math.sqrt(var)) / stats.norm.pdf(diff, 0.0, math.sqrt(var))
        return float(ratio * stats.norm.pdf(theta, 0.0, math.sqrt(tau2)))

    spread = 12 * math.sqrt(tau2)
    value, _ = integrate.quad(integrand, -spread, spread, points=[0.0, diff], limit=200)
    assert log_mixture_ratio(diff, var, tau2) == pytest.approx(math.log(value), rel=1e-7, abs=1e-9)


def test_interval_ends_are_where_the_ratio_reaches_one_over_alpha() -> None:
    var, tau2 = 0.004, 0.001
    width = half_width(var, tau2, ALPHA)
    assert log_mixture_ratio(width, var, tau2) == pytest.approx(math.log(1 / ALPHA), rel=1e-12)
    assert log_mixture_ratio(0.999 * width, var, tau2) < math.log(1 / ALPHA)


def test_fixed_sample_statistic_matches_scipy_and_is_more_cautious() -> None:
    """At any one n: d / sqrt(V) is Welch's t of scipy; the always-valid p and interval are wider than fixed-n ones."""
    rng = np.random.default_rng(3)
    control, treatment = rng.normal(0.0, 1.0, 400), rng.normal(0.25, 1.5, 300)
    comparison = SequentialComparison(alpha=ALPHA, min_samples=MIN_SAMPLES)
    for x in control:
        comparison.add("control", float(x))
    for x in treatment:
        comparison.add("treatment", float(x))
    result = comparison.result()
    welch = stats.ttest_ind(treatment, control, equal_var=False)
    var = treatment.var(ddof=1) / treatment.size + control.var(ddof=1) / control.size
    assert result.difference / math.sqrt(var) == pytest.approx(welch.statistic, rel=1e-9)
    assert result.mean_treatment == pytest.approx(treatment.mean()) and result.n_control == 400

    # Every fixed n seen along the way: 1/Lambda_n >= the two-sided z-test's p, interval contains the z-interval.
    tau2 = DEFAULT_EFFECT_SCALE**2 * ((control.size - 1) * control.var(ddof=1) + (treatment.size - 1) * treatment.var(ddof=1)) / (control.size + treatment.size - 2)  # fmt: skip
    d = treatment.mean() - control.mean()
    p_fixed = 2 * stats.norm.sf(abs(d) / math.sqrt(var))
    assert math.exp(-log_mixture_ratio(d, var, tau2)) >= p_fixed
    assert result.p_value >= 0 and result.p_value <= math.exp(-log_mixture_ratio(d, var, tau2)) + 1e-12
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert half_width(var, tau2, ALPHA) > z * math.sqrt(var)
    grid = np.linspace(0.01, 100.0, 2000)  # any z statistic at many V / tau2 ratios
    for ratio in (0.01, 0.1, 1.0, 10.0):
        p_always = np.minimum(
            1.0, np.exp(-log_mixture_ratio(grid, np.full_like(grid, ratio), np.ones_like(grid)))
        )
        assert np.all(p_always >= 2 * stats.norm.sf(grid / math.sqrt(ratio)))


# --- Welford and the saved state ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=2, max_size=200))
def test_welford_matches_numpy(values: list[float]) -> None:
    arm = ArmStats()
    for x in values:
        arm.add(x)
    data = np.array(values)
    assert arm.n == len(values)
    assert arm.mean == pytest.approx(data.mean(), rel=1e-9, abs=1e-6)
    assert arm.variance == pytest.approx(data.var(ddof=1), rel=1e-7, abs=1e-6)
    assert ArmStats.from_dict(json.loads(json.dumps(arm.to_dict()))) == arm


def test_arm_rejects_non_finite_and_bad_saved_fields() -> None:
    with pytest.raises(ValueError, match="finite"):
        ArmStats().add(float("nan"))
    with pytest.raises(ValueError, match=r"score\.m2"):
        ArmStats.from_dict({"n": 3, "mean": 0.5, "m2": -1.0}, "score")
    with pytest.raises(ValueError, match=r"arm\.n"):
        ArmStats.from_dict({"n": "3", "mean": 0.5, "m2": 1.0})


def test_saved_and_restored_comparison_continues_as_if_uninterrupted() -> None:
    rng = np.random.default_rng(5)
    values = rng.normal(0.0, 1.0, 600)
    arms = rng.random(600) < 0.5
    straight, resumed = SequentialComparison(), SequentialComparison()
    for i, (x, t) in enumerate(zip(values, arms, strict=True)):
        arm = "treatment" if t else "control"
        straight.add(arm, float(x) + (0.4 if t else 0.0))
        resumed.add(arm, float(x) + (0.4 if t else 0.0))
        if i % 97 == 0:
            resumed = SequentialComparison.from_dict(json.loads(json.dumps(resumed.to_dict())))
    assert resumed.result() == straight.result()
    with pytest.raises(ValueError, match=r"latency: missing field 'alpha'"):
        SequentialComparison.from_dict({"tau2": None}, "latency")
    with pytest.raises(ValueError, match=r"comparison\.p_value"):
        SequentialComparison.from_dict({**straight.to_dict(), "p_value": 2.0})


def test_decisions_follow_the_direction_of_better() -> None:
    rng = np.random.default_rng(11)
    latency = SequentialComparison(higher_is_better=False)
    score = SequentialComparison()
    assert latency.result().decision == "too few samples"
    for _ in range(400):
        latency.add("control", float(rng.normal(1.0, 0.1)))
        latency.add("treatment", float(rng.normal(0.8, 0.1)))  # faster
        score.add("control", float(rng.normal(0.6, 0.2)))
        score.add("treatment", float(rng.normal(0.4, 0.2)))  # worse
    assert latency.result().decision == "treatment better"
    assert latency.result().ci_high is not None and latency.result().ci_high < 0
    assert score.result().decision == "control better"
    with pytest.raises(ValueError, match="arm must be"):
        score.add("other", 1.0)  # type: ignore[arg-type]


# --- error rate, power and coverage under continuous monitoring -----------------------------------------


def test_aa_error_rate_holds_when_peeking_after_every_observation_and_naive_ttest_does_not() -> None:
    runs, steps = 300, 2000
    x, treated = normal_experiments(np.random.default_rng(0), runs, steps)
    sim = simulate(x, treated)
    ever_msprt = (sim["p"] <= ALPHA).any(axis=1).mean()
    assert ever_msprt <= ALPHA + binomial_margin(runs), ever_msprt

    # The same data read with a fixed-horizon Welch t-test after every observation.
    with np.errstate(divide="ignore", invalid="ignore"):
        naive = stats.ttest_ind_from_stats(
            sim["mean_t"], np.sqrt(sim["var_t"]), sim["n_t"], sim["mean_c"], np.sqrt(sim["var_c"]), sim["n_c"],
            equal_var=False,
        ).pvalue  # fmt: skip
    ever_naive = ((naive <= ALPHA) & sim["ready"]).any(axis=1).mean()
    assert ever_naive > 3 * ALPHA, ever_naive  # typically ~0.3: peeking inflates its error rate six-fold
    assert ever_naive > ever_msprt + 0.1


def test_comparison_object_reproduces_the_vectorised_sequences() -> None:
    x, treated = normal_experiments(np.random.default_rng(1), 4, 1500, effect=0.15)
    sim = simulate(x, treated)
    for run in range(4):
        comparison = SequentialComparison(alpha=ALPHA, min_samples=MIN_SAMPLES)
        for step in range(x.shape[1]):
            comparison.add("treatment" if treated[run, step] else "control", float(x[run, step]))
            if step % 50 == 49:
                assert comparison.p_value == pytest.approx(sim["p"][run, step], rel=1e-6, abs=1e-12)
        result = comparison.result()
        assert result.n_treatment == sim["n_t"][run, -1] and result.n_control == sim["n_c"][run, -1]
        if sim["low"][run, -1] <= sim["high"][run, -1]:
            assert result.ci_low == pytest.approx(sim["low"][run, -1], rel=1e-6)
            assert result.ci_high == pytest.approx(sim["high"][run, -1], rel=1e-6)
        decided = sim["p"][run, -1] <= ALPHA
        assert (result.decision == "treatment better") == decided


def test_planted_effect_is_detected_within_a_bounded_number_of_samples() -> None:
    """+0.1 in mean score (sd 1): found in 95% of experiments within 12,000 observations (6,000 per arm)."""
    runs, steps = 200, 12_000
    x, treated = normal_experiments(np.random.default_rng(2), runs, steps, effect=0.1)
    sim = simulate(x, treated)
    detected = sim["p"][:, -1] <= ALPHA
    assert detected.mean() >= 0.95, detected.mean()
    first = np.argmax(sim["p"] <= ALPHA, axis=1)[detected]
    assert np.median(first) < 6000, np.median(first)
    # Every detection says the treatment is better: the interval lies above zero.
    assert np.all(sim["low"][detected, -1] > 0)


def test_confidence_sequence_covers_the_true_difference_at_every_n() -> None:
    """The running intersection never excludes the true difference in at least 1 - alpha of experiments."""
    runs, steps, effect = 300, 2000, 0.3
    x, treated = normal_experiments(np.random.default_rng(4), runs, steps, effect=effect)
    sim = simulate(x, treated)
    covered = (sim["low"][:, -1] <= effect) & (effect <= sim["high"][:, -1])
    assert covered.mean() >= 1 - ALPHA - binomial_margin(runs), covered.mean()
    never_rejected = (simulate(x, treated, theta0=effect)["p"][:, -1] > ALPHA).mean()
    assert never_rejected == pytest.approx(covered.mean(), abs=1 / runs)  # the interval is the inverted test


def test_binary_outcomes_hold_the_error_rate_and_find_a_better_win_rate() -> None:
    rng = np.random.default_rng(6)
    runs, steps = 300, 2000
    treated = rng.random((runs, steps)) < 0.5
    aa = (rng.random((runs, steps)) < 0.7).astype(float)
    ever = (simulate(aa, treated, binary=True)["p"] <= ALPHA).any(axis=1).mean()
    assert ever <= ALPHA + binomial_margin(runs), ever

    runs = 100
    treated = rng.random((runs, 6000)) < 0.5
    ab = (rng.random((runs, 6000)) < np.where(treated, 0.6, 0.5)).astype(float)
    detected = (simulate(ab, treated, binary=True)["p"][:, -1] <= ALPHA).mean()
    assert detected >= 0.9, detected

    thumbs = SequentialComparison(binary=True)
    for _ in range(50):  # all up on both sides: a defined interval around 0, no verdict
        thumbs.add("control", 1)
        thumbs.add("treatment", 1)
    result = thumbs.result()
    assert (
        result.decision == "no difference yet"
        and result.ci_low is not None
        and result.ci_low < 0 < result.ci_high
    )
    with pytest.raises(ValueError, match="0 or 1"):
        thumbs.add("control", 0.5)


def test_one_arm_confidence_sequence_is_wider_than_the_fixed_n_interval() -> None:
    rng = np.random.default_rng(8)
    values = rng.normal(0.7, 0.2, 500)
    arm = ArmStats()
    for x in values:
        arm.add(float(x))
    interval = mean_confidence_sequence(arm, ALPHA)
    assert interval is not None
    t_low, t_high = stats.t.interval(1 - ALPHA, values.size - 1, values.mean(), stats.sem(values))
    assert interval[0] < t_low < values.mean() < t_high < interval[1]
    assert mean_confidence_sequence(ArmStats(), ALPHA) is None
