"""The cleaning stage: repair the text, then remove what is not the author's before any filter judges it.

    ftfy                 mojibake and bad Unicode repaired (datatrove's FTFYFormatter)
    unicode_form         NFC or NFKC normalisation
    boilerplate          Project Gutenberg headers, footers and licence; licence comment blocks atop files
    c4_lines             C4's line rules (datatrove's C4QualityFilter used as a line cleaner)
    min_chars/max_chars  documents too short or too long after cleaning are dropped

Every dropped document goes to ``<exclusions>/<source>/<step>/<rank>.jsonl`` with its
``metadata["filter_reason"]`` as ``<stage>:<reason>`` (``clean:too_short``); the quality and
language stages write their exclusions the same way, through :class:`ExclusionWriter`.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import C4QualityFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import FTFYFormatter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.writers import JsonlWriter

from orchestra.config import CleanConfig

STAGE = "clean"


class ExclusionWriter(JsonlWriter):
    """Writes the documents one step dropped, with ``filter_reason`` as ``<stage>:<reason>``.

    The files are named by source and step: every source runs its own stage with the same ranks,
    and several filters of a stage write at once, so ``<rank>.jsonl`` alone would be overwritten.
    """

    name = "🗑 Exclusions"

    def __init__(self, folder: Path, stage: str, step: str) -> None:
        super().__init__(
            output_folder=str(folder),
            output_filename=f"${{source}}/{step}/${{rank}}.jsonl",
            compression=None,
        )
        self.stage = stage
        self.step = step

    def write(self, document: Document, rank: int = 0, **kwargs: Any) -> None:
        reason = document.metadata.get("filter_reason") or self.step  # a filter may drop without a reason
        if not str(reason).startswith(f"{self.stage}:"):
            document.metadata["filter_reason"] = f"{self.stage}:{reason}"
        super().write(document, rank, **kwargs)

    def _get_output_filename(self, document: Document, rank: int | str = 0, **kwargs: Any) -> str:
        kwargs.setdefault("source", document.metadata.get("source") or "unknown")
        name: str = super()._get_output_filename(document, rank, **kwargs)
        return name


class UnicodeNormalizer(BaseFormatter):
    """NFC or NFKC normalisation.

    Written here rather than through FTFYFormatter's ``normalization`` because it must also run
    when ftfy is off.
    """

    name = "🔤 Unicode normalisation"

    def __init__(self, form: str) -> None:
        super().__init__()
        if form not in ("NFC", "NFKC"):
            raise ValueError(f"data.pipeline.clean.unicode_form: must be NFC, NFKC or none, got {form!r}")
        self.form: Literal["NFC", "NFKC"] = "NFC" if form == "NFC" else "NFKC"

    def format(self, text: str) -> str:
        return unicodedata.normalize(self.form, text)


# --------------------------------------------------------------------------- Project Gutenberg

# The marker lines of the eBooks since about 2000 ("*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***",
# "***START OF THIS PROJECT GUTENBERG EBOOK", "E-BOOK", "ETEXT") and of the 1990s texts, whose header
# ends with the small print ("*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*").
_PG_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG\b.*$"
    r"|^[ \t]*\*END\*?[ \t]*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
# The footer starts at its marker line ("*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***") or at the
# older closing lines ("End of the Project Gutenberg EBook of Hamlet", "End of Project Gutenberg's
# Hamlet", "End of this Project Gutenberg Etext"); the licence follows it.
_PG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*)?END OF (?:THE |THIS )?PROJECT GUTENBERG\b.*$",
    re.IGNORECASE | re.MULTILINE,
)
# Transcriber credits right after the start marker ("Produced by David Widger").
_PG_CREDITS = re.compile(
    r"^(?:Produced by|E-?text prepared by|This e-?text was (?:prepared|produced) by|Transcribed (?:from|by))\b",
    re.IGNORECASE,
)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: header, transcriber credits, footer and licence removed.

    A text without the markers comes back unchanged.
    """
    body_start = 0
    for match in _PG_START.finditer(text):
        body_start = match.end()  # the last header marker: the 1990s texts may carry two
    end = _PG_END.search(text, body_start)
    if body_start == 0 and end is None:
        return text
    body = text[body_start : end.start() if end else len(text)].strip("\n")
    paragraphs = re.split(r"\n[ \t]*\n", body.lstrip(), maxsplit=1)
    if _PG_CREDITS.match(paragraphs[0]):
        body = paragraphs[1] if len(paragraphs) > 1 else ""
    return body.strip() + "\n" if body.strip() else ""


# --------------------------------------------------------------------------- licence headers of files

_LICENCE_WORDS = re.compile(
    r"copyright|\blicen[cs]|spdx-license-identifier|permission is hereby granted|all rights reserved",
    re.IGNORECASE,
)
# "#" not followed by a letter: C's "#include" and "#define" are code, not comments.
_LINE_COMMENT = re.compile(r"^[ \t]*(#(?![A-Za-z])|//|--|;)")
_CODING = re.compile(r"^[ \t\f]*#.*?coding[:=]")  # PEP 263: it must stay in the first two lines


def strip_licence_header(text: str) -> str:
    """The file without the comment blocks at its top that carry a copyright or licence notice.

    Only the leading comment blocks are looked at (``#``, ``//``, ``--``, ``;`` lines, or one ``/* */``
    block), each separated from the next by blank lines; a block naming a copyright, licence,
    ``SPDX-License-Identifier`` or "all rights reserved" is removed, any other (a ``# -*- mode -*-``
    line, an author line) kept. A shebang and a PEP 263 encoding line stay.
    """
    lines = text.split("\n")
    kept: list[str] = []
    i = 0
    if lines and lines[0].startswith("#!"):
        kept.append(lines[0])
        i = 1
    removed = False
    while i < len(lines):
        if not lines[i].strip():
            kept.append(lines[i])
            i += 1
            continue
        start = i
        if lines[i].lstrip().startswith("/*"):
            while i < len(lines) and "*/" not in lines[i]:
                i += 1
            i = min(i + 1, len(lines))
        elif (prefix := _LINE_COMMENT.match(lines[i])) is not None:
            while (
                i < len(lines)
                and (more := _LINE_COMMENT.match(lines[i]))
                and more.group(1) == prefix.group(1)
            ):
                i += 1
        else:
            break
        block = lines[start:i]
        if _LICENCE_WORDS.search("\n".join(block)):
            kept += [line for n, line in enumerate(block, start) if n < 2 and _CODING.match(line)]
            removed = True
        else:
            kept += block
    if not removed:
        return text
    head = "\n".join(kept).strip("\n")
    rest = "\n".join(lines[i:]).lstrip("\n")
    out = "\n\n".join(part for part in (head, rest) if part)
    return out + "\n" if text.endswith("\n") and not out.endswith("\n") else out


class BoilerplateRemover(BaseFormatter):
    """Project Gutenberg headers, footers and licence, and licence comment blocks atop files."""

    name = "🧹 Boilerplate"

    def format(self, text: str) -> str:
        out = strip_gutenberg(text)
        if out != text:
            self.stat_update("gutenberg_removed")
        stripped = strip_licence_header(out)
        if stripped != out:
            self.stat_update("licence_header_removed")
        return stripped


class C4LineCleaner(C4QualityFilter):
    """C4's line rules as a cleaner: the lines without terminal punctuation, with fewer than three
    words, mentioning javascript, or cookie and terms-of-use notices go; a page with "lorem ipsum"
    is dropped, as C4 does. C4's document rules (curly braces, fewer than five sentences) are the
    quality stage's."""

    name = "⛰ C4 lines"

    def __init__(self, exclusion_writer: ExclusionWriter) -> None:
        super().__init__(
            exclusion_writer=exclusion_writer,
            min_num_sentences=-1,
            filter_curly_bracket=False,
        )


class LengthFilter(BaseFilter):
    """Documents shorter than ``min_chars`` or longer than ``max_chars`` (surrounding whitespace not
    counted); an empty one always goes. datatrove has no length filter with reasons: its
    LambdaFilter drops without one."""

    name = "📏 Length"

    def __init__(self, min_chars: int, max_chars: int | None, exclusion_writer: ExclusionWriter) -> None:
        super().__init__(exclusion_writer)
        self.min_chars = max(min_chars, 1)
        self.max_chars = max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text.strip())
        if n < self.min_chars:
            return False, "too_short"
        if self.max_chars is not None and n > self.max_chars:
            return False, "too_long"
        return True


def build(cfg: CleanConfig, exclusions: Path) -> list[PipelineStep]:
    """The cleaning steps ``cfg`` enables, in order; dropped documents go under ``exclusions``."""
    steps: list[PipelineStep] = []
    if cfg.ftfy:
        steps.append(FTFYFormatter())
    if cfg.unicode_form != "none":
        steps.append(UnicodeNormalizer(cfg.unicode_form))
    if cfg.boilerplate:
        steps.append(BoilerplateRemover())
    if cfg.c4_lines:
        steps.append(C4LineCleaner(ExclusionWriter(exclusions, STAGE, "c4_lines")))
    steps.append(LengthFilter(cfg.min_chars, cfg.max_chars, ExclusionWriter(exclusions, STAGE, "length")))
    return steps
