"""The cleaning stage: ftfy, normalisation, Gutenberg and licence boilerplate, C4 lines, length limits."""

from __future__ import annotations

import json
import sysconfig
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ftfy
import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter
from datatrove.pipeline.formatters import FTFYFormatter

from orchestra.config import CleanConfig
from orchestra.data.pipeline import clean
from orchestra.data.pipeline.clean import (
    BoilerplateRemover,
    C4LineCleaner,
    LengthFilter,
    UnicodeNormalizer,
    strip_gutenberg,
    strip_licence_header,
)

HAMLET = """ACT I

SCENE I. Elsinore. A platform before the Castle.

Enter Francisco and Barnardo, two sentinels.

BARNARDO.
Who's there?

FRANCISCO.
Nay, answer me. Stand and unfold yourself.

BARNARDO.
Long live the King!

FRANCISCO.
You come most carefully upon your hour.
"""

# The layout of a Project Gutenberg eBook since 2023 (header, start marker, body, end marker, licence).
MODERN_HEADER = """\ufeffThe Project Gutenberg eBook of Hamlet, Prince of Denmark

This ebook is for the use of anyone anywhere in the United States and
most other parts of the world at no cost and with almost no restrictions
whatsoever. You may copy it, give it away or re-use it under the terms
of the Project Gutenberg License included with this ebook or online
at www.gutenberg.org. If you are not located in the United States,
you will have to check the laws of the country where you are located
before using this eBook.

Title: Hamlet, Prince of Denmark

Author: William Shakespeare

Release date: November 1, 1998 [eBook #1524]
                Most recently updated: October 29, 2024

Language: English

Credits: Dianne Bean and David Widger


*** START OF THE PROJECT GUTENBERG EBOOK HAMLET, PRINCE OF DENMARK ***




"""
MODERN_FOOTER = """



*** END OF THE PROJECT GUTENBERG EBOOK HAMLET, PRINCE OF DENMARK ***



Updated editions will replace the previous one\u2014the old editions will
be renamed.

Creating the works from print editions not protected by U.S. copyright
law means that no one owns a United States copyright in these works,
so the Foundation (and you!) can copy and distribute it in the United
States without permission and without paying copyright
royalties.

START: FULL LICENSE

THE FULL PROJECT GUTENBERG LICENSE

PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK
"""

# The 1990s layout: the small print closes the header, a plain "End of ..." line opens the footer.
OLD_HEADER = """**The Project Gutenberg Etext of Hamlet, by Shakespeare**
#2 in our series by William Shakespeare

Copyright laws are changing all over the world, be sure to check
the copyright laws for your country before posting these files!!

**Welcome To The World of Free Plain Vanilla Electronic Texts**

*These Etexts Prepared By Hundreds of Volunteers and Donations*

Hamlet, Prince of Denmark

November, 1998  [Etext #1524]

**The Legal Small Print**

(Three Pages)

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***
Why is this "Small Print!" statement here?  You know: lawyers.

*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

Produced by Dianne Bean

"""
OLD_FOOTER = """
End of Project Gutenberg Etext of Hamlet, by Shakespeare
"""


def _run(steps: Iterable[Any], docs: list[Document]) -> list[Document]:
    """The documents that come out of the steps, run as datatrove runs them (one task)."""
    data: Any = iter(docs)
    for step in steps:
        data = step.run(data, rank=0, world_size=1)
    return list(data)


def _doc(text: str, n: int = 0, source: str = "books") -> Document:
    return Document(text=text, id=f"{source}/{n}", metadata={"source": source})


def _exclusions(folder: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(folder.rglob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


# --------------------------------------------------------------------------- Gutenberg


def test_modern_gutenberg_header_footer_and_licence_go() -> None:
    assert strip_gutenberg(MODERN_HEADER + HAMLET + MODERN_FOOTER) == HAMLET


def test_old_gutenberg_small_print_and_credits_go() -> None:
    assert strip_gutenberg(OLD_HEADER + HAMLET + OLD_FOOTER) == HAMLET


def test_text_without_markers_is_unchanged() -> None:
    text = HAMLET + "\nThe end of the project, and of the play.\n"
    assert strip_gutenberg(text) == text


# --------------------------------------------------------------------------- licence headers


def _stdlib(name: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")


def test_licence_block_of_a_real_stdlib_file_goes() -> None:
    text = _stdlib("abc.py")  # "# Copyright 2007 Google, Inc. ..." then the docstring
    assert text.startswith("# Copyright")
    out = strip_licence_header(text)
    assert out == text[text.index('"""Abstract Base Classes') :]


def test_shebang_stays_and_the_mit_style_block_goes() -> None:
    text = _stdlib("tarfile.py")  # shebang, a "#---" banner with the copyright and permission text
    out = strip_licence_header(text)
    assert out.startswith("#!/usr/bin/env python3\n\n")
    assert "Permission" not in out.split('"""', 1)[0] and "Copyright" not in out.split('"""', 1)[0]
    assert text.endswith(out.split("\n\n", 1)[1])


def test_other_leading_comments_and_encoding_lines_stay() -> None:
    text = (
        "# -*- coding: latin-1 -*-\n# SPDX-License-Identifier: MIT\n\n"
        "# Helpers for the parser.\n\nimport os\n"
    )
    assert (
        strip_licence_header(text) == "# -*- coding: latin-1 -*-\n\n# Helpers for the parser.\n\nimport os\n"
    )
    c_file = (
        "/*\n * Copyright (c) 2020 Example Ltd.\n * Licensed under the Apache License, Version 2.0\n */\n"
    )
    assert strip_licence_header(c_file + "#include <stdio.h>\n") == "#include <stdio.h>\n"
    js = "// Licensed under the MIT License.\n// See LICENSE.\nexport const x = 1;\n"
    assert strip_licence_header(js) == "export const x = 1;\n"
    docstring_first = '"""Module."""\n# Copyright 2001\nimport os\n'
    assert strip_licence_header(docstring_first) == docstring_first  # only the top of a file is looked at
    plain = "# Notes\n\nNothing about rights here.\n"
    assert strip_licence_header(plain) == plain


# --------------------------------------------------------------------------- ftfy and normalisation


def test_ftfy_fixes_real_mojibake_as_ftfy_does() -> None:
    broken = ["cafÃ©", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "Ã¼ber naÃ¯ve"]
    out = _run([FTFYFormatter()], [_doc(t, i) for i, t in enumerate(broken)])
    assert [d.text for d in out] == [ftfy.fix_encoding(t) for t in broken]
    assert out[0].text == "café" and out[2].text == "über naïve"
    assert out[1].text == "The Mona Lisa doesn\u2019t have eyebrows."  # curly quote kept (datatrove's choice)


def test_unicode_normalisation_forms() -> None:
    decomposed = "cafe\u0301 \ufb01le"  # e + combining acute, the "fi" ligature
    (nfc,) = _run([UnicodeNormalizer("NFC")], [_doc(decomposed)])
    assert nfc.text == "caf\u00e9 \ufb01le"
    (nfkc,) = _run([UnicodeNormalizer("NFKC")], [_doc(decomposed)])
    assert nfkc.text == "caf\u00e9 file"
    assert unicodedata.is_normalized("NFC", nfc.text)
    with pytest.raises(ValueError, match="unicode_form"):
        UnicodeNormalizer("NFD")
    assert not any(
        isinstance(s, UnicodeNormalizer) for s in clean.build(CleanConfig(unicode_form="none"), Path())
    )


# --------------------------------------------------------------------------- C4 lines


def test_c4_line_rules_clean_lines_and_drop_lorem_ipsum(tmp_path: Path) -> None:
    page = "\n".join(
        [
            "Home | About | Contact",
            "The committee met on Tuesday to discuss the new budget.",
            "Please enable JavaScript to view the comments.",
            "This site uses cookies to improve your experience.",
            "Members agreed that the library needs a new roof[1].",
            "Read more",
            "function f() { return 1; }",
            "Too short.",
        ]
    )
    lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\nA second line is here."
    step = C4LineCleaner(clean.ExclusionWriter(tmp_path, "clean", "c4_lines"))
    out = _run([step], [_doc(page, 0, "web"), _doc(lorem, 1, "web")])
    assert [d.text for d in out] == [
        "The committee met on Tuesday to discuss the new budget.\n"
        "Members agreed that the library needs a new roof."
    ]
    # the same lines as datatrove's own C4 filter keeps (its document rules aside)
    reference = C4QualityFilter(min_num_sentences=-1, filter_curly_bracket=False)
    ref_doc = _doc(page)
    assert reference.filter(ref_doc) is True and ref_doc.text == out[0].text
    (dropped,) = _exclusions(tmp_path)
    assert dropped["id"] == "web/1" and dropped["metadata"]["filter_reason"] == "clean:lorem_ipsum"
    assert (tmp_path / "web" / "c4_lines" / "00000.jsonl").is_file()


# --------------------------------------------------------------------------- length and exclusions


def test_length_filter_reasons_reach_the_exclusions(tmp_path: Path) -> None:
    step = LengthFilter(10, 40, clean.ExclusionWriter(tmp_path, "clean", "length"))
    docs = [_doc("short", 0), _doc("just long enough text", 1), _doc("x" * 41, 2), _doc("  \n\t ", 3)]
    out = _run([step], docs)
    assert [d.id for d in out] == ["books/1"]
    reasons = {r["id"]: r["metadata"]["filter_reason"] for r in _exclusions(tmp_path)}
    assert reasons == {
        "books/0": "clean:too_short",
        "books/2": "clean:too_long",
        "books/3": "clean:too_short",
    }


def test_empty_document_goes_even_with_min_chars_zero(tmp_path: Path) -> None:
    step = LengthFilter(0, None, clean.ExclusionWriter(tmp_path, "clean", "length"))
    assert [d.id for d in _run([step], [_doc("", 0), _doc("a", 1)])] == ["books/1"]


def test_build_runs_every_step_in_order_and_keeps_sources_apart(tmp_path: Path) -> None:
    cfg = CleanConfig(ftfy=True, unicode_form="NFC", boilerplate=True, c4_lines=False, min_chars=20)
    steps = clean.build(cfg, tmp_path)
    assert [type(s) for s in steps] == [FTFYFormatter, UnicodeNormalizer, BoilerplateRemover, LengthFilter]
    book = MODERN_HEADER + HAMLET.replace("Who's", "WhoÃ¢â‚¬â„¢s") + MODERN_FOOTER
    licence_only = MODERN_HEADER + MODERN_FOOTER  # nothing left once the boilerplate is gone
    out = _run(steps, [_doc(book, 0, "books"), _doc(licence_only, 1, "books")])
    assert [d.text for d in out] == [HAMLET.replace("Who's", "Who\u2019s")]
    # a second source's stage with the same rank does not overwrite the first one's exclusions
    _run(clean.build(cfg, tmp_path), [_doc("tiny", 0, "web")])
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert files == ["books/length/00000.jsonl", "web/length/00000.jsonl"]
    reasons = sorted((r["id"], r["metadata"]["filter_reason"]) for r in _exclusions(tmp_path))
    assert reasons == [("books/1", "clean:too_short"), ("web/0", "clean:too_short")]
    with_c4 = clean.build(CleanConfig(c4_lines=True, ftfy=False), tmp_path)
    assert [type(s) for s in with_c4] == [UnicodeNormalizer, BoilerplateRemover, C4LineCleaner, LengthFilter]


def test_build_under_datatrove_executor(tmp_path: Path) -> None:
    """The steps pickle and run in datatrove's own executor, reading and writing jsonl."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    source = tmp_path / "in"
    source.mkdir()
    rows = [
        {"id": "books/0", "text": MODERN_HEADER + HAMLET + MODERN_FOOTER, "metadata": {"source": "books"}},
        {"id": "books/1", "text": "cafÃ©", "metadata": {"source": "books"}},
    ]
    (source / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = [JsonlReader(str(source)), *clean.build(CleanConfig(min_chars=10), tmp_path / "excl")]
    steps.append(JsonlWriter(str(tmp_path / "out"), compression=None))
    LocalPipelineExecutor(steps, tasks=1, workers=1, logging_dir=str(tmp_path / "logs")).run()
    kept = [json.loads(line) for line in (tmp_path / "out" / "00000.jsonl").read_text().splitlines()]
    assert [(r["id"], r["text"]) for r in kept] == [("books/0", HAMLET)]
    (dropped,) = _exclusions(tmp_path / "excl")
    assert dropped["text"] == "café" and dropped["metadata"]["filter_reason"] == "clean:too_short"
