"""One source of truth for config: every key documented once in the schema, presets hold only deltas."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from orchestra.config import ExportConfig, GenerateConfig, PrepareConfig, TrainConfig
from orchestra.config_doc import field_docs, render

ROOT = Path(__file__).resolve().parents[1]


def _sections() -> list[type]:
    out: list[type] = [TrainConfig, PrepareConfig, GenerateConfig, ExportConfig]
    out += [
        type(f.default_factory())
        for f in dataclasses.fields(TrainConfig)
        if f.default_factory is not dataclasses.MISSING
    ]  # type: ignore[misc]
    return out


def test_configs_page_is_up_to_date() -> None:
    page = (ROOT / "docs" / "configs.md").read_text()
    assert page == render(), (
        "docs/configs.md is stale: run `make configs-doc` (python -m orchestra.config_doc)"
    )


@pytest.mark.parametrize("cls", _sections(), ids=lambda c: c.__name__)
def test_every_key_has_an_attribute_docstring(cls: type) -> None:
    docs = field_docs(cls)
    undocumented = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in docs
        and not dataclasses.is_dataclass(f.default_factory() if callable(f.default_factory) else None)  # type: ignore[misc]
    ]
    assert undocumented == []


def _defaults(cls: type) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = (
            value.value if hasattr(value, "value") and not dataclasses.is_dataclass(value) else value
        )
    return out


SECTIONS = {
    f.name: type(f.default_factory())  # type: ignore[misc]
    for f in dataclasses.fields(TrainConfig)
    if f.default_factory is not dataclasses.MISSING
}


@pytest.mark.parametrize(
    "preset",
    sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").glob("*/*.yaml")),
)
def test_presets_hold_only_what_differs_from_the_defaults(preset: str) -> None:
    group = preset.split("/")[0]
    if group not in SECTIONS:
        pytest.skip(f"{group}/ is a global package (experiments), not one section")
    values = yaml.safe_load((ROOT / "conf" / preset).read_text()) or {}
    defaults = _defaults(SECTIONS[group])
    # A preset is named by its choice (name / method): that line is what selects it.
    restated = sorted(
        k for k, v in values.items() if k in defaults and v == defaults[k] and k not in ("name", "method")
    )
    assert restated == [], f"conf/{preset} restates defaults {restated}: remove them"
