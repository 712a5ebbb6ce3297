"""The quality stage: datatrove's heuristic filters, with per-source thresholds.

    gopher_repetition   duplicated lines and paragraphs, top and duplicated n-gram shares
    gopher_quality      word counts and lengths, symbol ratios, bullets and ellipses, stop words
    c4                  C4's document rules: curly braces, lorem ipsum, fewer than five sentences
    fineweb             lines ending in punctuation, short lines, duplicated-line characters, list-like pages

``data.pipeline.quality.overrides.<source>.<filter>`` holds keyword arguments of that datatrove
filter (``{"web": {"gopher_quality": {"min_doc_words": 20}}}``); a keyword the filter does not take
is an error naming it. A dropped document's ``filter_reason`` is ``quality:<datatrove's reason>``
(``quality:gopher_short_doc``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)

from orchestra.config import QualityConfig
from orchestra.data.errors import DataError
from orchestra.data.pipeline.clean import ExclusionWriter

STAGE = "quality"


class C4DocumentFilter(C4QualityFilter):
    """datatrove's C4 filter as a judge only: its verdict is kept, its line edits are not.

    Line cleaning is ``clean.c4_lines``' job; a source that turns it off (books, code) keeps its
    lines whole even when the C4 document rules are on.
    """

    name = "⛰ C4 document"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        verdict: bool | tuple[bool, str] = super().filter(doc)
        doc.text = text
        return verdict


FILTERS: dict[str, type[PipelineStep]] = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4": C4DocumentFilter,
    "fineweb": FineWebQualityFilter,
}


def accepted_keywords(name: str) -> list[str]:
    """The keyword arguments datatrove's filter ``name`` takes (read from its ``__init__``)."""
    params = inspect.signature(FILTERS[name].__init__).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return sorted(
        p for p, spec in params.items() if spec.kind in kinds and p not in ("self", "exclusion_writer")
    )


def _as_tuples(value: Any) -> Any:
    """YAML lists as the tuples datatrove's filters expect (``str.endswith(stop_chars)`` needs one)."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


def source_overrides(cfg: QualityConfig, source: str | None) -> dict[str, dict[str, Any]]:
    """The source's keyword arguments per filter, checked against the filters' signatures."""
    given = cfg.overrides.get(source, {}) if source is not None else {}
    where = f"data.pipeline.quality.overrides.{source}"
    problems = [
        f"{where}.{name}: no such filter (known: {', '.join(FILTERS)})"
        for name in given
        if name not in FILTERS
    ]
    out: dict[str, dict[str, Any]] = {}
    for name, kwargs in given.items():
        if name not in FILTERS:
            continue
        if not isinstance(kwargs, dict):
            problems.append(f"{where}.{name}: must map keyword arguments to values, got {kwargs!r}")
            continue
        accepted = accepted_keywords(name)
        problems += [
            f"{where}.{name}.{key}: not a keyword of datatrove's {FILTERS[name].__name__} "
            f"(accepted: {', '.join(accepted)})"
            for key in kwargs
            if key not in accepted
        ]
        out[name] = {key: _as_tuples(value) for key, value in kwargs.items()}
    if problems:
        raise DataError("; ".join(problems))
    return out


def build(cfg: QualityConfig, exclusions: Path, source: str | None = None) -> list[PipelineStep]:
    """The enabled filters with ``source``'s thresholds; dropped documents go under ``exclusions``.

    Overrides are checked even for a filter that is off, so a misspelt keyword is never silently unused.
    """
    overrides = source_overrides(cfg, source)
    steps: list[PipelineStep] = []
    for name, cls in FILTERS.items():
        if getattr(cfg, name):
            writer = ExclusionWriter(exclusions, STAGE, name)
            steps.append(cls(exclusion_writer=writer, **overrides.get(name, {})))
    return steps
