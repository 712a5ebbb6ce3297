"""Model families: one file each, the Hugging Face side of an architecture (see spec.py).

Adding a family is one file here (read/write of its config.json keys, its tensor names) and
its registration below; the model itself changes only if the family needs a new ModelConfig
switch.
"""

from __future__ import annotations

from orchestra.model.families import gemma, gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3
from orchestra.model.families.spec import Family, HFImportError

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        llama.FAMILY,
        mistral.FAMILY,
        qwen2.FAMILY,
        qwen3.FAMILY,
        gemma.FAMILY,
        gemma2.FAMILY,
        gemma3.FAMILY,
        phi3.FAMILY,
    )
}
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def family(name: str) -> Family:
    """The family a ModelConfig.family names; ValueError listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"model.family: {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["BY_ARCHITECTURE", "BY_MODEL_TYPE", "FAMILIES", "Family", "HFImportError", "family"]
