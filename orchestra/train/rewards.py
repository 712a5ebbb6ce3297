"""Verifiable rewards for reinforcement learning on sampled completions (GRPO).

A reward function takes a completion (the generated text, without the prompt) and the example's
reference answer and returns a float; the shipped ones score 1.0 or 0.0. Users name a shipped one
(``exact_match``, ``regex``, ``arithmetic``) or their own as ``package.module:function``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from functools import partial

from orchestra.config import ConfigError

RewardFn = Callable[[str, str], float]

_INTEGER = re.compile(r"[-+]?\d[\d,]*")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion is the answer, whitespace runs collapsed and ends stripped."""
    return float(_normalise(completion) == _normalise(answer))


def regex_match(completion: str, answer: str, pattern: str) -> float:
    """1.0 when ``pattern`` is found in the completion and, if it has a group, the first group is the answer."""
    found = re.search(pattern, completion)
    if found is None:
        return 0.0
    if found.groups():
        return float(_normalise(found.group(1) or "") == _normalise(answer))
    return 1.0


def arithmetic(completion: str, answer: str) -> float:
    """1.0 when the completion's first integer (thousands commas allowed) equals the integer answer."""
    found = _INTEGER.search(completion)
    if found is None:
        return 0.0
    try:
        return float(int(found.group(0).replace(",", "")) == int(answer))
    except ValueError:
        return 0.0


def _no_reward(completion: str, answer: str) -> float:
    return 0.0


SHIPPED: dict[str, RewardFn] = {"exact_match": exact_match, "arithmetic": arithmetic}


def reward_function(name: str, pattern: str | None = None, key: str = "task.reward") -> RewardFn:
    """The reward named by ``name``: a shipped one, ``regex`` (with ``pattern``), ``module:function``,
    or ``none`` (0 for every completion: a reward model alone scores them)."""
    if name == "none":
        return _no_reward
    if name == "regex":
        if not pattern:
            raise ConfigError(f"{key}: regex needs a pattern (task.reward_pattern)")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"task.reward_pattern: {pattern!r} is not a regular expression: {err}"
            ) from None
        return partial(regex_match, pattern=pattern)
    if name in SHIPPED:
        return SHIPPED[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{key}: {name!r} is not one of {', '.join([*SHIPPED, 'regex', 'none'])} nor a 'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}: cannot import {name!r}: {err}") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {name!r} is not callable")
    return fn  # type: ignore[no-any-return]
