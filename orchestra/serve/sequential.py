"""Online A/B statistics whose error rate holds however often they are looked at.

A dashboard that refreshes every few seconds is a test repeated after every observation: a
fixed-horizon t-test read that way declares a difference between two identical versions far
more often than its nominal alpha. The mixture sequential probability ratio test (mSPRT;
Johari, Pekelis & Walsh, "Always valid inference: continuous monitoring of A/B tests", 2022)
gives instead a p-value and confidence intervals that are valid at every sample size at once.

For the difference ``theta = mean_treatment - mean_control`` with estimate ``d`` of variance
``V = var_t / n_t + var_c / n_c`` and a normal mixing distribution ``theta ~ N(0, tau2)``, the
mixture likelihood ratio against ``theta = 0`` has the closed form

    Lambda = sqrt(V / (V + tau2)) * exp(tau2 * d**2 / (2 * V * (V + tau2)))

The always-valid p-value is the running minimum of ``1 / Lambda`` (capped at 1) and the
confidence sequence is the running intersection of ``{theta0 : Lambda(d - theta0) < 1 / alpha}``,
the intervals ``d +- sqrt(V * (V + tau2) / tau2 * (log((V + tau2) / V) + 2 * log(1 / alpha)))``.

The variances are plug-in estimates (Welford's running sample variance per arm), the
large-sample version of the test also used in practice (e.g. Optimizely's stats engine). Binary
outcomes (thumbs up = 1, down = 0) use the same normal approximation with the plug-in variance
``p(1 - p)`` of a smoothed rate ``p = (successes + 1/2) / (n + 1)``, so an arm whose answers
were all up (or all down) still has a non-zero variance. No evidence is counted before both
arms hold ``min_samples`` observations, where the plug-in variances are too rough to trust.

``tau2`` sets which effects the test is quickest to find. Given as None, it is taken as
``(0.1 sd)**2`` of the pooled standard deviation of the metric, i.e. the test is tuned to
effects of about a tenth of a standard deviation, and the statistic is scale-free.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_EFFECT_SCALE",
    "ArmStats",
    "ComparisonResult",
    "Decision",
    "SequentialComparison",
    "half_width",
    "log_mixture_ratio",
    "mean_confidence_sequence",
]

DEFAULT_EFFECT_SCALE = 0.1
"""tau2 = (DEFAULT_EFFECT_SCALE * pooled sd)**2 when none is given."""

Decision = Literal["treatment better", "control better", "no difference yet", "too few samples"]
Arm = Literal["control", "treatment"]
Value = TypeVar("Value", float, npt.NDArray[np.float64])


def log_mixture_ratio(diff: Value, var: Value, tau2: Value) -> Value:
    """log Lambda for an observed difference ``diff`` of variance ``var`` under the N(0, tau2) mixture.

    Works elementwise on numpy arrays too, so a simulation can evaluate many sequences at once
    with the very formula the comparison uses.
    """
    total = var + tau2
    return 0.5 * np.log(var / total) + tau2 * diff * diff / (2.0 * var * total)


def half_width(var: Value, tau2: Value, alpha: float) -> Value:
    """Half-width of the confidence-sequence interval around the estimate (the set where Lambda < 1/alpha)."""
    total = var + tau2
    return np.sqrt(var * total / tau2 * (np.log(total / var) + 2.0 * math.log(1.0 / alpha)))


@dataclass
class ArmStats:
    """Count, mean and sum of squared deviations of one arm, updated in O(1) (Welford's algorithm)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        if not math.isfinite(x):
            raise ValueError(f"observation must be a finite number, got {x!r}")
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 in the denominator); 0 below two observations."""
        return self.m2 / (self.n - 1) if self.n >= 2 else 0.0

    def binary_variance(self) -> float:
        """Plug-in Bernoulli variance p(1 - p) of the smoothed rate (successes + 1/2) / (n + 1)."""
        rate = (self.mean * self.n + 0.5) / (self.n + 1)
        return rate * (1.0 - rate)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_dict(cls, data: Any, where: str = "arm") -> ArmStats:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object with n, mean, m2, got {data!r}")
        n, mean, m2 = data.get("n"), data.get("mean"), data.get("m2")
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise ValueError(f"{where}.n: expected an integer >= 0, got {n!r}")
        for key, value in (("mean", mean), ("m2", m2)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise ValueError(f"{where}.{key}: expected a finite number, got {value!r}")
        assert isinstance(mean, (int, float)) and isinstance(m2, (int, float))
        if m2 < 0:
            raise ValueError(f"{where}.m2: expected a number >= 0, got {m2!r}")
        return cls(n=n, mean=float(mean), m2=float(m2))


def _bounds(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"bounds: expected [low, high] or null, got {value!r}")
    return float(value[0]), float(value[1])


def _variance(stats: ArmStats, binary: bool) -> float:
    return stats.binary_variance() if binary else stats.variance


def _tau2(given: float | None, pooled_variance: float) -> float:
    return given if given is not None else DEFAULT_EFFECT_SCALE**2 * pooled_variance


def _clip(interval: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    return min(max(interval[0], low), high), max(min(interval[1], high), low)


def mean_confidence_sequence(
    stats: ArmStats,
    alpha: float,
    tau2: float | None = None,
    binary: bool = False,
    min_samples: int = 2,
    bounds: tuple[float, float] | None = None,
) -> tuple[float, float] | None:
    """Always-valid interval for one arm's mean (the same mixture, one sample); None while undefined.

    It is the confidence sequence at the current n (not intersected over time), which is valid
    at every n at once on its own. With ``bounds`` (the range of one observation; (0, 1) when
    binary) the interval is clipped to it, which keeps it valid.
    """
    if stats.n < max(min_samples, 2):
        return None
    variance = _variance(stats, binary)
    if variance <= 0:
        return None
    var = variance / stats.n
    width = half_width(var, _tau2(tau2, variance), alpha)
    interval = (stats.mean - width, stats.mean + width)
    bounds = (0.0, 1.0) if binary else bounds
    return interval if bounds is None else _clip(interval, *bounds)


@dataclass(frozen=True)
class ComparisonResult:
    """What the dashboard shows for one metric of one treatment against the control."""

    n_control: int
    n_treatment: int
    mean_control: float
    mean_treatment: float
    difference: float
    """mean_treatment - mean_control."""
    ci_low: float | None
    """Always-valid confidence interval of the difference; None before min_samples per arm."""
    ci_high: float | None
    p_value: float
    """Always-valid p-value of "no difference"."""
    decision: Decision
    alpha: float
    higher_is_better: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SequentialComparison:
    """mSPRT of one metric, control vs one treatment; every update is O(1) and may be read any time.

    The p-value and the interval are updated at every observation (not when read), so how often
    :meth:`result` is called changes nothing.
    """

    def __init__(
        self,
        alpha: float = 0.05,
        tau2: float | None = None,
        min_samples: int = 20,
        higher_is_better: bool = True,
        binary: bool = False,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if tau2 is not None and not (math.isfinite(tau2) and tau2 > 0):
            raise ValueError(f"tau2 must be a finite number > 0 or None, got {tau2!r}")
        if min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {min_samples!r}")
        self.alpha = alpha
        self.tau2 = tau2
        self.min_samples = min_samples
        self.higher_is_better = higher_is_better
        self.binary = binary
        self.bounds = (0.0, 1.0) if binary else bounds
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")
        self.control = ArmStats()
        self.treatment = ArmStats()
        self.p_value = 1.0
        self.ci_low: float | None = None
        self.ci_high: float | None = None
        self._last: tuple[float, float] | None = (
            None  # the latest interval, shown should the intersection be empty
        )

    def add(self, arm: Arm, x: float) -> None:
        if self.binary and x not in (0, 1):
            raise ValueError(f"a binary outcome must be 0 or 1, got {x!r}")
        if self.bounds is not None and not self.bounds[0] <= x <= self.bounds[1]:
            raise ValueError(f"observation {x!r} lies outside the bounds {self.bounds}")
        if arm == "control":
            self.control.add(x)
        elif arm == "treatment":
            self.treatment.add(x)
        else:
            raise ValueError(f"arm must be 'control' or 'treatment', got {arm!r}")
        self._update()

    def _update(self) -> None:
        c, t = self.control, self.treatment
        if min(c.n, t.n) < self.min_samples:
            return
        var_c, var_t = _variance(c, self.binary), _variance(t, self.binary)
        var = var_t / t.n + var_c / c.n
        if var <= 0:  # neither arm varies yet: no noise estimate, so no evidence either way
            return
        pooled = ((c.n - 1) * var_c + (t.n - 1) * var_t) / (c.n + t.n - 2)
        tau2 = _tau2(self.tau2, pooled)
        diff = t.mean - c.mean
        self.p_value = min(self.p_value, math.exp(-log_mixture_ratio(diff, var, tau2)))
        width = half_width(var, tau2, self.alpha)
        low, high = diff - width, diff + width
        self._last = (low, high)
        self.ci_low = low if self.ci_low is None else max(self.ci_low, low)
        self.ci_high = high if self.ci_high is None else min(self.ci_high, high)

    def interval(self) -> tuple[float, float] | None:
        """The running intersection of the confidence sequence (the latest interval, should it be empty).

        With bounds on the observations, clipped to the differences they allow.
        """
        if self.ci_low is None or self.ci_high is None:
            return None
        interval = (self.ci_low, self.ci_high)
        if self.ci_low > self.ci_high and self._last is not None:
            interval = self._last
        if self.bounds is None:
            return interval
        span = self.bounds[1] - self.bounds[0]
        return _clip(interval, -span, span)

    def result(self) -> ComparisonResult:
        c, t = self.control, self.treatment
        interval = self.interval()
        decision: Decision
        if min(c.n, t.n) < self.min_samples:
            decision = "too few samples"
        elif self.p_value > self.alpha or interval is None:
            decision = "no difference yet"
        else:
            treatment_higher = (interval[0] + interval[1]) / 2 > 0
            decision = "treatment better" if treatment_higher == self.higher_is_better else "control better"
        return ComparisonResult(
            n_control=c.n,
            n_treatment=t.n,
            mean_control=c.mean,
            mean_treatment=t.mean,
            difference=t.mean - c.mean,
            ci_low=None if interval is None else interval[0],
            ci_high=None if interval is None else interval[1],
            p_value=self.p_value,
            decision=decision,
            alpha=self.alpha,
            higher_is_better=self.higher_is_better,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "tau2": self.tau2,
            "min_samples": self.min_samples,
            "higher_is_better": self.higher_is_better,
            "binary": self.binary,
            "bounds": None if self.bounds is None else list(self.bounds),
            "control": self.control.to_dict(),
            "treatment": self.treatment.to_dict(),
            "p_value": self.p_value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "last": None if self._last is None else list(self._last),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "comparison") -> SequentialComparison:
        """Rebuild a saved comparison; raises ValueError naming the first bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {data!r}")
        try:
            comparison = cls(
                alpha=data["alpha"],
                tau2=data["tau2"],
                min_samples=data["min_samples"],
                higher_is_better=bool(data["higher_is_better"]),
                binary=bool(data["binary"]),
                bounds=_bounds(data.get("bounds")),
            )
        except KeyError as err:
            raise ValueError(f"{where}: missing field {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        comparison.control = ArmStats.from_dict(data.get("control"), f"{where}.control")
        comparison.treatment = ArmStats.from_dict(data.get("treatment"), f"{where}.treatment")
        p_value = data.get("p_value")
        if not (isinstance(p_value, (int, float)) and 0 <= p_value <= 1):
            raise ValueError(f"{where}.p_value: expected a number in [0, 1], got {p_value!r}")
        comparison.p_value = float(p_value)
        for key in ("ci_low", "ci_high"):
            value = data.get(key)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{where}.{key}: expected a finite number or null, got {value!r}")
            setattr(comparison, key, None if value is None else float(value))
        last = data.get("last")
        if last is not None:
            if not (
                isinstance(last, list) and len(last) == 2 and all(isinstance(v, (int, float)) for v in last)
            ):
                raise ValueError(f"{where}.last: expected [low, high] or null, got {last!r}")
            comparison._last = (float(last[0]), float(last[1]))
        return comparison
