"""The search space: Hydra's sweep syntax read into Optuna distributions.

    optim.lr=tag(log, interval(1e-4, 1e-2))     FloatDistribution(1e-4, 1e-2, log=True)
    optim.weight_decay=interval(0, 0.2)         FloatDistribution(0, 0.2)
    model.n_layers=tag(int, interval(2, 8))     IntDistribution(2, 8)
    model.n_layers=range(2, 9, 2)               IntDistribution(2, 8, step=2)  (Hydra's range excludes the stop)
    scheduler.name=choice(cosine, step)         CategoricalDistribution([cosine, step])
    trainer.global_batch_size=8,16,32           CategoricalDistribution([8, 16, 32])
    model=choice(llama-125m, debug)             a preset of a config group, as a category

Parsing is Hydra's own (OverridesParser), so the syntax is exactly the one ``-m`` takes. Every
key is checked against the training schema before a trial starts: a key the schema lacks is one
error naming it and what was probably meant. ``arch.ffn_ratio`` is the one key outside the schema
(see :mod:`orchestra.sweep.derive`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from orchestra.config import ConfigError, TrainConfig

# Search dimensions that are not schema keys: the sweeper turns them into schema values.
DERIVED_KEYS = ("arch.ffn_ratio",)


@dataclass(frozen=True)
class Dimension:
    """One searched key and its distribution."""

    key: str
    distribution: Any  # optuna.distributions.BaseDistribution

    @property
    def grid(self) -> list[Any] | None:
        """Every value, for the grid sampler; None for a continuous interval."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        if isinstance(d, IntDistribution) and not d.log:
            return list(range(d.low, d.high + 1, d.step))
        if isinstance(d, FloatDistribution) and d.step is not None:
            count = round((d.high - d.low) / d.step)
            return [round(d.low + i * d.step, 12) for i in range(count + 1)]
        return None


def schema_key_problem(key: str, conf_dir: Path | None, root: type = TrainConfig) -> str | None:
    """Why ``key`` is not a key of the schema (or a config group of ``conf_dir``), or None."""
    if key in DERIVED_KEYS:
        return None
    if "." not in key:
        if conf_dir is not None and (conf_dir / key).is_dir():
            return None  # a config group: its presets are the choices
        names = {f.name for f in fields(root)}
        if key in names:
            return None
        close = difflib.get_close_matches(key, names, n=1)
        return f"{key}: not a key of the training config{f' (did you mean {close[0]}?)' if close else ''}"
    node: Any = root
    path: list[str] = []
    for part in key.split("."):
        if isinstance(node, dict):
            return None  # below a dict-valued key (e.g. quality overrides): free-form
        if not is_dataclass(node):
            return f"{key}: {'.'.join(path)} is a value, it has no key {part!r}"
        known = {f.name: f for f in fields(node)}
        if part not in known:
            where = ".".join(path) or "the top level"
            close = difflib.get_close_matches(part, known, n=1)
            hint = f" (did you mean {'.'.join([*path, close[0]])}?)" if close else ""
            return f"{key}: no key {part!r} in {where}{hint}; allowed: {', '.join(sorted(known))}"
        path.append(part)
        f = known[part]
        node = f.default_factory() if callable(f.default_factory) else f.default
    return None


def parse_dimension(key: str, value: str) -> Dimension:
    """The distribution of ``key=value`` (value in Hydra's sweep syntax); ConfigError if it is not one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    text = f"{key}={value}"
    try:
        override = OverridesParser.create().parse_override(text)
    except HydraException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"sweep: `{text}` does not parse: {first}") from None
    sweep = override.value()
    if isinstance(sweep, IntervalSweep):
        tags = set(sweep.tags or ())
        low, high = float(sweep.start), float(sweep.end)  # type: ignore[arg-type]
        if not low < high:
            raise ConfigError(f"sweep: `{text}`: the interval needs start < end")
        if "log" in tags and low <= 0:
            raise ConfigError(f"sweep: `{text}`: a log interval needs start > 0")
        if "int" in tags:
            if math.ceil(low) > math.floor(high):
                raise ConfigError(f"sweep: `{text}`: no integer lies in the interval")
            return Dimension(key, IntDistribution(math.ceil(low), math.floor(high), log="log" in tags))
        return Dimension(key, FloatDistribution(low, high, log="log" in tags))
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        assert start is not None and stop is not None
        values = list(_range(start, stop, step))
        if not values or step == 0:
            raise ConfigError(f"sweep: `{text}`: the range is empty (Hydra's range excludes its stop)")
        low, high, size = min(values), max(values), abs(step)  # a negative step runs the same values down
        if all(float(v).is_integer() for v in (start, step)):
            return Dimension(key, IntDistribution(int(low), int(high), step=int(size)))
        return Dimension(key, FloatDistribution(float(low), float(high), step=float(size)))
    if isinstance(sweep, ChoiceSweep):
        choices = [_plain(v) for v in sweep.list]
        if not choices:
            raise ConfigError(f"sweep: `{text}`: choice() needs at least one value")
        return Dimension(key, CategoricalDistribution(choices))
    raise ConfigError(
        f"sweep: `{text}` is not a search dimension: use interval(), tag(log, interval()), "
        "tag(int, interval()), range() or choice() (or a comma list)"
    )


def _range(start: float, stop: float, step: float) -> list[float]:
    out, v, i = [], start, 0
    while (step > 0 and v < stop - 1e-12) or (step < 0 and v > stop + 1e-12):
        out.append(round(v, 12))
        i += 1
        v = start + i * step
    return out


def _plain(value: Any) -> Any:
    """A category Optuna can store (None, bool, int, float, str)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def parse_space(params: dict[str, Any], conf_dir: Path | None) -> list[Dimension]:
    """Every dimension of ``params`` ({key: sweep expression}), with every problem in one error."""
    problems, dims = [], []
    for key, value in params.items():
        key = str(key)
        problem = schema_key_problem(key, conf_dir)
        if problem:
            problems.append(problem)
            continue
        if isinstance(value, list | tuple):  # a YAML list: its values are the choices, as written
            if not value:
                problems.append(f"{key}: an empty list of choices")
                continue
            from optuna.distributions import CategoricalDistribution

            dims.append(Dimension(key, CategoricalDistribution([_plain(v) for v in value])))
            continue
        try:
            dims.append(parse_dimension(key, str(value)))
        except (ConfigError, ValueError) as err:
            problems.append(str(err).removeprefix("sweep: "))
    if problems:
        raise ConfigError("sweep: " + "; ".join(problems))
    if not dims:
        raise ConfigError(
            "sweep: the search space is empty (set hydra.sweeper.params or pass key=interval(...))"
        )
    return dims


def as_override(key: str, value: Any) -> str:
    """``key=value`` as a Hydra override that reads back as exactly ``value``.

    Strings are written bare when Hydra reads them back unchanged, else quoted; which quoting
    works is checked by parsing the candidate with Hydra's own parser, so nothing here restates
    its grammar.
    """
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if value is None:
        return f"{key}=null"
    if isinstance(value, float):
        return f"{key}={value!r}"
    if not isinstance(value, str):
        return f"{key}={value}"
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for candidate in (value, "'" + value.replace("'", "\\'") + "'", '"' + value.replace('"', '\\"') + '"'):
        text = f"{key}={candidate}"
        try:
            back = parser.parse_override(text).value()
        except HydraException:
            continue
        if isinstance(back, str) and back == value:
            return text
    raise ConfigError(f"sweep: {key}: the value {value!r} cannot be written as a Hydra override")


def split_arguments(arguments: list[str]) -> tuple[list[str], dict[str, str]]:
    """Command-line overrides as (the base every trial takes, {key: sweep expression})."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    base: list[str] = []
    space: dict[str, str] = {}
    for arg in arguments:
        try:
            override = parser.parse_override(arg)
        except HydraException as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"sweep: override `{arg}` does not parse: {first}") from None
        if override.is_sweep_override():
            space[override.key_or_group] = arg.split("=", 1)[1]
        else:
            base.append(arg)
    return base, space
