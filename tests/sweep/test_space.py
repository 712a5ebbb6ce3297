"""The search space (orchestra.sweep.space) against hand-computed distributions and against Hydra's
own reading of the same sweep syntax: the values Hydra's BasicSweeper would run in a plain
multirun, and Hydra's OverridesParser reading back every override a trial is given."""

from __future__ import annotations

import math
import random
import string
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from orchestra.config import ConfigError
from orchestra.sweep.space import (
    DERIVED_KEYS,
    Dimension,
    as_override,
    parse_dimension,
    parse_space,
    schema_key_problem,
    split_arguments,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
PARSER = OverridesParser.create()


def hydra_values(key: str, expression: str) -> list:
    """What Hydra's BasicSweeper runs for ``key=expression`` in a plain ``-m`` multirun."""
    batches = BasicSweeper.split_arguments([PARSER.parse_override(f"{key}={expression}")], None)
    jobs = [job for batch in batches for job in batch]
    assert all(len(job) == 1 for job in jobs)
    return [PARSER.parse_override(job[0]).value() for job in jobs]


def stepped_values(d: FloatDistribution | IntDistribution) -> list:
    """Every value of a stepped distribution, from its own low/high/step."""
    assert d.step is not None
    n = round((d.high - d.low) / d.step) + 1
    return [d.low + i * d.step for i in range(n)]


# --------------------------------------------------------------------------- hand-computed


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("interval(0, 0.2)", FloatDistribution(0.0, 0.2)),
        ("interval(-3, 5)", FloatDistribution(-3.0, 5.0)),
        ("tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
        ("tag(int, interval(2, 8))", IntDistribution(2, 8)),
        ("tag(int, interval(1.5, 7.5))", IntDistribution(2, 7)),  # the integers inside the interval
        ("tag(log, int, interval(1, 1024))", IntDistribution(1, 1024, log=True)),
        ("tag(int, log, interval(16, 64))", IntDistribution(16, 64, log=True)),
        ("range(2, 9, 2)", IntDistribution(2, 8, step=2)),
        ("range(0, 101, 25)", IntDistribution(0, 100, step=25)),
        ("range(5)", IntDistribution(0, 4)),
        ("range(1, 4)", IntDistribution(1, 3)),
        ("range(-4, 4, 3)", IntDistribution(-4, 2, step=3)),
        ("range(1, 2, 0.25)", FloatDistribution(1.0, 1.75, step=0.25)),
        ("choice(cosine, step)", CategoricalDistribution(["cosine", "step"])),
        ("choice(8, 16, 32)", CategoricalDistribution([8, 16, 32])),
        ("choice(0.5, 1e-3)", CategoricalDistribution([0.5, 1e-3])),
        ("choice(true, false)", CategoricalDistribution([True, False])),
        ("choice(x, 1, 2.5, true)", CategoricalDistribution(["x", 1, 2.5, True])),
        ("choice('a b', 'c,d')", CategoricalDistribution(["a b", "c,d"])),
        ("8,16,32", CategoricalDistribution([8, 16, 32])),
        ("cosine,wsd", CategoricalDistribution(["cosine", "wsd"])),
        ("1,x,2.5", CategoricalDistribution([1, "x", 2.5])),
    ],
)
def test_parse_dimension_hand_computed(expression: str, expected: object) -> None:
    dim = parse_dimension("optim.lr", expression)
    assert dim.key == "optim.lr"
    assert dim.distribution == expected
    for got, want in zip(
        getattr(dim.distribution, "choices", ()), getattr(expected, "choices", ()), strict=True
    ):
        assert type(got) is type(want)  # 1 stays an int, 2.5 a float, true a bool


def test_int_grid_and_float_grid() -> None:
    assert parse_dimension("k", "range(2, 9, 2)").grid == [2, 4, 6, 8]
    assert parse_dimension("k", "tag(int, interval(3, 6))").grid == [3, 4, 5, 6]
    assert parse_dimension("k", "choice(a, b, 3)").grid == ["a", "b", 3]
    assert parse_dimension("k", "interval(0, 1)").grid is None  # continuous
    assert parse_dimension("k", "tag(log, int, interval(1, 100))").grid is None  # log ints: not a grid


# --------------------------------------------------------------------------- against Hydra's sweeper


@pytest.mark.parametrize(
    "expression",
    [
        "range(2, 9, 2)",
        "range(0, 101, 25)",
        "range(5)",
        "range(1, 10)",
        "range(-7, 8, 5)",
        "range(3, 4)",
        "range(0, 100, 33)",
        "choice(1, 2, 3)",
        "choice(cosine, step, wsd)",
        "choice(llama-125m, debug)",
        "4,8,15,16,23,42",
    ],
)
def test_grid_is_what_hydra_basic_sweeper_runs(expression: str) -> None:
    dim = parse_dimension("model.n_layers", expression)
    assert dim.grid == hydra_values("model.n_layers", expression)


def test_random_integer_ranges_match_hydra() -> None:
    rng = random.Random(1234)
    for _ in range(60):
        start = rng.randint(-50, 50)
        step = rng.randint(1, 12)
        stop = start + rng.randint(1, 80)
        expression = f"range({start}, {stop}, {step})"
        dim = parse_dimension("k", expression)
        want = hydra_values("k", expression)
        assert want == list(range(start, stop, step))  # the reference is Python's range, as Hydra says
        assert dim.grid == want, expression
        assert isinstance(dim.distribution, IntDistribution)
        assert (dim.distribution.low, dim.distribution.high) == (want[0], want[-1])


@pytest.mark.parametrize(
    "expression", ["range(0.1, 0.5, 0.1)", "range(1, 2, 0.25)", "range(0, 1, 0.3)", "range(0.5, 3, 1)"]
)
def test_float_ranges_hold_the_values_hydra_runs(expression: str) -> None:
    dim = parse_dimension("k", expression)
    assert isinstance(dim.distribution, FloatDistribution)
    assert not dim.distribution.log
    assert stepped_values(dim.distribution) == pytest.approx(hydra_values("k", expression))


def test_sampled_values_lie_on_hydras_grid() -> None:
    """Optuna's own sampling of a range dimension only gives values Hydra's range would run."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dim = parse_dimension("k", "range(3, 40, 4)")
    allowed = set(hydra_values("k", "range(3, 40, 4)"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask({"k": dim.distribution})
        assert trial.params["k"] in allowed
        study.tell(trial, 0.0)


# --------------------------------------------------------------------------- bad expressions


@pytest.mark.parametrize(
    ("expression", "needle"),
    [
        ("range(3, 3)", "empty"),
        ("range(5, 2)", "empty"),
        ("range(0, 10, 0)", "empty"),
        ("interval(1, 0)", "start < end"),
        ("interval(2, 2)", "start < end"),
        ("tag(log, interval(0, 1))", "start > 0"),
        ("tag(log, interval(-1, 1))", "start > 0"),
        ("tag(log, int, interval(0, 8))", "start > 0"),
        ("0.001", "not a search dimension"),
        ("cosine", "not a search dimension"),
        ("glob(*)", "not a search dimension"),
        ("interval(0,", "does not parse"),
        ("choice(a, b", "does not parse"),
    ],
)
def test_bad_expressions_are_config_errors(expression: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"^sweep: ") as err:
        parse_dimension("optim.lr", expression)
    assert needle in str(err.value)
    assert "optim.lr" in str(err.value)


# --------------------------------------------------------------------------- schema keys


def test_misspelt_keys_name_the_key_and_the_suggestion() -> None:
    problem = schema_key_problem("optim.lrr", CONF)
    assert problem is not None
    assert problem.startswith("optim.lrr:")
    assert "did you mean optim.lr?" in problem
    assert "allowed:" in problem and "weight_decay" in problem

    problem = schema_key_problem("optm.lr", CONF)
    assert problem is not None and "did you mean optim?" in problem

    problem = schema_key_problem("model.n_layer", CONF)
    assert problem is not None and "did you mean model.n_layers?" in problem

    problem = schema_key_problem("modle", CONF)
    assert problem is not None and "did you mean model?" in problem

    problem = schema_key_problem("model.rope.factr", CONF)
    assert problem is not None and "did you mean model.rope.factor?" in problem


@pytest.mark.parametrize(
    "key",
    [
        "optim.lr",
        "optim.weight_decay",
        "model.n_layers",
        "model.rope.factor",  # nested dataclass
        "trainer.global_batch_size",
        "scheduler.warmup_steps",
        "seed",
        "arch.ffn_ratio",
        "model",  # a config group of conf/
        "scheduler",
    ],
)
def test_schema_keys_are_accepted(key: str) -> None:
    assert schema_key_problem(key, CONF) is None


def test_config_group_needs_the_conf_dir(tmp_path: Path) -> None:
    assert schema_key_problem("optim", CONF) is None
    (tmp_path / "experiment").mkdir()
    assert schema_key_problem("experiment", tmp_path) is None  # a group, not a schema field
    assert schema_key_problem("experiment", None) is not None
    assert schema_key_problem("experiment", tmp_path / "nothing") is not None


def test_derived_keys_are_only_arch_ffn_ratio() -> None:
    assert DERIVED_KEYS == ("arch.ffn_ratio",)
    assert schema_key_problem("arch.other", CONF) is not None


def test_parse_space_reports_every_problem_in_one_error() -> None:
    params = {
        "optim.lrr": "interval(0, 1)",  # misspelt
        "model.n_layer": "1,2",  # misspelt
        "optim.weight_decay": "interval(1, 0)",  # reversed
        "optim.lr": "tag(log, interval(0, 1))",  # log from 0
        "scheduler.warmup_steps": "range(10, 10)",  # empty
        "model": "choice(debug, llama-125m)",  # fine
        "arch.ffn_ratio": "choice(2, 4)",  # fine
    }
    with pytest.raises(ConfigError) as err:
        parse_space(params, CONF)
    text = str(err.value)
    assert text.startswith("sweep: ") and text.count("sweep:") == 1
    for needle in (
        "did you mean optim.lr?",
        "did you mean model.n_layers?",
        "`optim.weight_decay=interval(1, 0)`",
        "`optim.lr=tag(log, interval(0, 1))`",
        "`scheduler.warmup_steps=range(10, 10)`",
    ):
        assert needle in text
    assert "model=choice" not in text and "arch.ffn_ratio" not in text


def test_parse_space_good() -> None:
    dims = parse_space(
        {
            "model": "choice(llama-125m, debug)",
            "arch.ffn_ratio": "choice(2.0, 2.6667, 4.0)",
            "model.n_layers": "range(2, 9, 2)",
            "model.dim": [128, 256],  # a YAML list is a comma list
            "scheduler.name": ("cosine", "step"),
            "optim.lr": "tag(log, interval(3e-4, 1e-2))",
        },
        CONF,
    )
    by_key = {d.key: d.distribution for d in dims}
    assert list(by_key) == [
        "model",
        "arch.ffn_ratio",
        "model.n_layers",
        "model.dim",
        "scheduler.name",
        "optim.lr",
    ]
    assert by_key["model"] == CategoricalDistribution(["llama-125m", "debug"])
    assert by_key["arch.ffn_ratio"] == CategoricalDistribution([2.0, 2.6667, 4.0])
    assert by_key["model.n_layers"] == IntDistribution(2, 8, step=2)
    assert by_key["model.dim"] == CategoricalDistribution([128, 256])
    assert by_key["scheduler.name"] == CategoricalDistribution(["cosine", "step"])
    assert by_key["optim.lr"] == FloatDistribution(3e-4, 1e-2, log=True)
    assert all(isinstance(d, Dimension) for d in dims)


def test_parse_space_empty() -> None:
    with pytest.raises(ConfigError, match="search space is empty"):
        parse_space({}, CONF)


def test_every_shipped_study_parses() -> None:
    """conf/sweep/*.yaml: each study's params are a valid space against the schema and conf/."""
    import yaml

    files = sorted((CONF / "sweep").glob("*.yaml"))
    assert files
    for path in files:
        params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
        dims = parse_space(params, CONF)
        assert [d.key for d in dims] == list(params), path.name


# --------------------------------------------------------------------------- as_override


def _reparse(key: str, value: object) -> object:
    override = PARSER.parse_override(as_override(key, value))
    assert override.key_or_group == key
    assert not override.is_sweep_override()
    return override.value()


def test_as_override_round_trips_numbers_bools_none() -> None:
    rng = random.Random(7)
    values: list[object] = [True, False, None, 0, -1, 10**20, -(10**18), 0.0, -0.0, 1e-300, 5e-324, 1e300]
    values += [math.inf, -math.inf]
    values += [rng.uniform(-1e6, 1e6) for _ in range(100)]
    values += [10 ** rng.uniform(-12, 12) for _ in range(100)]
    values += [rng.randint(-(10**9), 10**9) for _ in range(100)]
    for value in values:
        got = _reparse("optim.lr", value)
        assert got == value and type(got) is type(value), (value, as_override("optim.lr", value))
    assert math.isnan(_reparse("optim.lr", math.nan))  # type: ignore[arg-type]


AWKWARD = " ,'\":()[]{}="


def _awkward_string(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "-_./@%+*?" + AWKWARD * 3
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
    return text + rng.choice(AWKWARD)  # at least one awkward character


def test_as_override_round_trips_awkward_strings() -> None:
    rng = random.Random(11)
    fixed = ["a b", "a,b", "it's", 'say "hi"', "key: val", "(x)", "[1, 2]", "{a: 1}", "a=b", " ", "  lead",
             "trail  ", "'", '"', "''", "a, 'b', \"c\"", "http://host:8080/x", "é ü", "x'y\"z"]  # fmt: skip
    for value in fixed + [_awkward_string(rng) for _ in range(300)]:
        got = _reparse("scheduler.name", value)
        assert got == value and isinstance(got, str), (value, as_override("scheduler.name", value))


@pytest.mark.parametrize(
    "value", ["cosine", "llama-125m", "a/b.c", "x_y", "-dash", "*glob?", "v1.2.3", "", "@x"]
)
def test_as_override_plain_strings(value: str) -> None:
    assert _reparse("model", value) == value


def test_as_override_sampled_values_round_trip() -> None:
    """Every value Optuna samples from a parsed space comes back from its override unchanged."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dims = parse_space(
        {
            "optim.lr": "tag(log, interval(1e-6, 1))",
            "optim.weight_decay": "interval(-1, 1)",
            "model.n_layers": "range(1, 64, 3)",
            "model.dim": "tag(log, int, interval(8, 4096))",
            "scheduler.name": "choice(cosine, 'a b', 'c,d', \"it's\", 3, 2.5, true)",
        },
        CONF,
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(50):
        trial = study.ask({d.key: d.distribution for d in dims})
        for key, value in trial.params.items():
            got = _reparse(key, value)
            assert got == value and type(got) is type(value), (key, value)
        study.tell(trial, 0.0)


# --------------------------------------------------------------------------- split_arguments


def test_split_arguments_sweep_vs_plain() -> None:
    arguments = [
        "optim.lr=0.1",
        "optim.weight_decay=interval(0, 0.2)",
        "model=llama-125m",
        "trainer.global_batch_size=8,16",
        "model.n_layers=range(2, 9, 2)",
        "scheduler.name=choice(cosine, step)",
        "optim.betas=[0.9,0.95]",
        "data.name='a,b'",
        "hydra.sweeper.n_trials=4",
        "~trainer.peak_flops",
        "+extra.key=1",
        "optim.eps=tag(log, interval(1e-9, 1e-6))",
    ]
    base, space = split_arguments(arguments)
    assert base == [
        "optim.lr=0.1",
        "model=llama-125m",
        "optim.betas=[0.9,0.95]",
        "data.name='a,b'",
        "hydra.sweeper.n_trials=4",
        "~trainer.peak_flops",
        "+extra.key=1",
    ]
    assert space == {
        "optim.weight_decay": "interval(0, 0.2)",
        "trainer.global_batch_size": "8,16",
        "model.n_layers": "range(2, 9, 2)",
        "scheduler.name": "choice(cosine, step)",
        "optim.eps": "tag(log, interval(1e-9, 1e-6))",
    }
    # The space parses into the same distributions as the expressions themselves.
    dims = parse_space(space, CONF)
    assert [d.distribution for d in dims] == [parse_dimension(k, v).distribution for k, v in space.items()]


def test_split_arguments_agrees_with_hydra() -> None:
    """An argument is a sweep exactly when Hydra's parser says it is one."""
    arguments = ["a=1", "a=1,2", "b=x", "b=interval(0,1)", "c=[1,2]", "c=range(3)", "d='q,r'", "d=choice(q)"]
    base, space = split_arguments(arguments)
    for arg in arguments:
        o = PARSER.parse_override(arg)
        assert (
            o.key_or_group in space and space[o.key_or_group] == arg.split("=", 1)[1]
        ) == o.is_sweep_override()
        assert (arg in base) == (not o.is_sweep_override())


def test_split_arguments_bad_override() -> None:
    with pytest.raises(ConfigError, match=r"sweep: override `oops=\(` does not parse"):
        split_arguments(["optim.lr=0.1", "oops=("])


# --------------------------------------------------------------------------- regressions
# Each test below pins a bug the tests found (and the fix made go away).


def test_bug_reversed_range_is_a_config_error_or_the_same_values() -> None:
    """Hydra runs range(9, 2, -2) as 9, 7, 5, 3; parse_dimension raises ValueError from
    IntDistribution(9, 3, step=-2) (`low <= high` must hold)."""
    try:
        dim = parse_dimension("model.n_layers", "range(9, 2, -2)")
    except ConfigError:
        return
    assert sorted(dim.grid or []) == sorted(hydra_values("model.n_layers", "range(9, 2, -2)"))


def test_bug_int_interval_without_an_integer_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_dimension("model.n_layers", "tag(int, interval(1.2, 1.8))")


def test_bug_parse_space_collects_problems_of_every_kind() -> None:
    with pytest.raises(ConfigError) as err:
        parse_space({"optim.lrr": "interval(0, 1)", "model.n_layers": "range(9, 2, -2)"}, CONF)
    assert "did you mean optim.lr?" in str(err.value)


def test_bug_list_params_with_commas_and_quotes() -> None:
    dims = parse_space({"scheduler.name": ["a,b", "c d", "it's"]}, CONF)
    assert dims[0].distribution == CategoricalDistribution(["a,b", "c d", "it's"])


def test_bug_as_override_backslashes() -> None:
    for value in ["c:\\dir\\x", "a\\b", "\\n", "a\\,b"]:
        assert _reparse("data.name", value) == value


def test_bug_as_override_strings_that_look_like_other_types() -> None:
    for value in ["true", "False", "null", "1", "1.50", "inf", "nan", "1e3"]:
        got = _reparse("data.name", value)
        assert got == value and isinstance(got, str), value


def test_bug_as_override_characters_hydra_rejects() -> None:
    for value in ["a#b", "a!b", "a&b", "a;b", "a<b", "a>b", "a^b", "a`b", "~x", "a\nb", "ab\t"]:
        assert _reparse("data.name", value) == value


def test_bug_grid_of_a_float_range() -> None:
    dim = parse_dimension("optim.lr", "range(0.1, 0.5, 0.1)")
    assert dim.grid == pytest.approx(hydra_values("optim.lr", "range(0.1, 0.5, 0.1)"))


def test_bug_key_below_a_scalar_field() -> None:
    assert schema_key_problem("model.n_layers.x", CONF) is not None
