"""The quality stage: datatrove's filters' own verdicts and reasons, per-source overrides, exclusions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)

from orchestra.config import QualityConfig
from orchestra.data.errors import DataError
from orchestra.data.pipeline import quality

GOOD = (
    "The village library opened in 1902 with a single room and a few hundred books donated by the families of the valley.\n"
    "Over the next century it grew into a small but busy building that served farmers, students and travellers alike.\n"
    "Its reading room was rebuilt after the flood of 1956, and the new windows let in the morning light.\n"
    "Today the staff run a weekly story hour for children and lend out tools as well as books to anyone with a card.\n"
    "Volunteers have also recorded the memories of older residents, so that the history of the valley is kept for the future.\n"
)
SHORT = "Too few words to be a page of prose."
NOTE = (  # varied enough for the repetition filter, too short for Gopher's quality rules
    "The committee met on Tuesday evening and agreed to repair the roof of the old school before winter, "
    "while the treasurer warned that the money set aside for the new playground would not cover both projects."
)
REPETITIVE = "\n".join(["Buy cheap watches online today."] * 8 + [GOOD])
CURLY = GOOD + "The config reads {a: 1} before it starts.\n"
FEW_SENTENCES = (  # long enough for Gopher, three sentences for C4's five
    "The committee met on Tuesday evening and agreed to repair the roof of the old school before the first snow "
    "of winter arrives in the valley, while the treasurer warned that the money which had been set aside last "
    "spring for a new playground and a garden would not cover both of these projects unless the town found "
    "another donor. Most of the members who were present said they would rather wait for a grant than raise "
    "the local taxes again this year. The meeting closed at nine.\n"
)
HEADLINES = [
    "Weather warnings issued for the northern coast tonight",
    "Council approves new budget for road repairs in March",
    "Local bakery wins regional award for sourdough bread",
    "Students raise funds for a new science laboratory",
    "Museum reopens its doors after two years of renovation",
    "Farmers report record harvest despite the dry summer",
    "Train services resume between the city and the airport",
    "Volunteers plant three hundred trees along the river",
]
# eight headlines without a full stop and one line of prose: too few lines end in punctuation for FineWeb
NEWS = "\n".join(HEADLINES) + "\n" + GOOD.replace("\n", " ").strip() + "\n"


def _doc(text: str, n: int, source: str = "web") -> Document:
    return Document(text=text, id=f"{source}/{n}", metadata={"source": source})


def _run(steps: list[Any], docs: list[Document]) -> list[Document]:
    data: Any = iter(docs)
    for step in steps:
        data = step.run(data, rank=0, world_size=1)
    return list(data)


def _exclusions(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out[record["id"]] = record["metadata"]["filter_reason"]
    return out


def _reference(docs: list[str]) -> dict[int, str]:
    """What datatrove's filters, called directly in the same order, drop and why."""
    filters = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]
    dropped = {}
    for n, text in enumerate(docs):
        for f in filters:
            verdict = f.filter(Document(text=text, id=str(n)))
            if verdict is not True:
                dropped[n] = verdict[1]
                break
    return dropped


def test_every_filter_drops_what_datatrove_drops_with_its_reason(tmp_path: Path) -> None:
    texts = [GOOD, NOTE, REPETITIVE, CURLY, FEW_SENTENCES, NEWS]
    cfg = QualityConfig(gopher_repetition=True, gopher_quality=True, c4=True, fineweb=True)
    kept = _run(quality.build(cfg, tmp_path, source="web"), [_doc(t, n) for n, t in enumerate(texts)])
    reference = _reference(texts)
    # each filter has a document that only it drops
    assert reference == {
        1: "gopher_short_doc",
        2: "dup_line_frac",
        3: "curly_bracket",
        4: "too_few_sentences",
        5: "line_punct_ratio",
    }
    assert [d.id for d in kept] == ["web/0"]
    assert kept[0].text == GOOD  # the filters judge; they do not edit
    assert _exclusions(tmp_path) == {f"web/{n}": f"quality:{reason}" for n, reason in reference.items()}
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert files == [
        "web/c4/00000.jsonl",
        "web/fineweb/00000.jsonl",
        "web/gopher_quality/00000.jsonl",
        "web/gopher_repetition/00000.jsonl",
    ]


def test_c4_document_rules_alone(tmp_path: Path) -> None:
    texts = [GOOD, CURLY, FEW_SENTENCES]
    kept = _run(quality.build(QualityConfig(c4=True), tmp_path), [_doc(t, n) for n, t in enumerate(texts)])
    for n, text in enumerate(texts):  # the same verdict as datatrove's C4 filter called directly
        verdict = C4QualityFilter().filter(Document(text=text, id=str(n)))
        assert (f"web/{n}" in [d.id for d in kept]) == (verdict is True)
    assert _exclusions(tmp_path) == {"web/1": "quality:curly_bracket", "web/2": "quality:too_few_sentences"}
    citing = GOOD + "A line with a citation ends here[1].\n"
    (out,) = _run(quality.build(QualityConfig(c4=True), tmp_path / "b"), [_doc(citing, 9)])
    assert out.text == citing  # datatrove's filter alone would have removed "[1]"


def test_overrides_change_the_outcome_for_their_source_only(tmp_path: Path) -> None:
    cfg = QualityConfig(
        gopher_quality=True,
        overrides={"notes": {"gopher_quality": {"min_doc_words": 5, "min_stop_words": 0}}},
    )
    docs = [_doc(SHORT, 0, "notes"), _doc(SHORT, 1, "web")]
    assert [d.id for d in _run(quality.build(cfg, tmp_path / "notes", source="notes"), docs[:1])] == [
        "notes/0"
    ]
    assert _run(quality.build(cfg, tmp_path / "web", source="web"), docs[1:]) == []
    assert _exclusions(tmp_path / "web") == {"web/1": "quality:gopher_short_doc"}
    # the override is datatrove's own keyword: the filter built directly with it agrees
    assert GopherQualityFilter(min_doc_words=5, min_stop_words=0).filter(Document(text=SHORT, id="x")) is True


def test_yaml_lists_reach_datatrove_as_tuples(tmp_path: Path) -> None:
    text = "\n".join(
        ["One line that ends with a bang!"] * 1 + [f"line {i} ends with a dot here" for i in range(9)]
    )
    cfg = QualityConfig(
        fineweb=True, overrides={"web": {"fineweb": {"stop_chars": ["!"], "line_punct_thr": 0.5}}}
    )
    assert _run(quality.build(cfg, tmp_path, source="web"), [_doc(text, 0)]) == []
    assert _exclusions(tmp_path) == {"web/0": "quality:line_punct_ratio"}
    reference = FineWebQualityFilter(stop_chars=("!",), line_punct_thr=0.5).filter(
        Document(text=text, id="x")
    )
    assert reference == (False, "line_punct_ratio")


def test_unknown_keyword_is_one_error_naming_it_and_the_accepted_ones() -> None:
    cfg = QualityConfig(gopher_quality=False, overrides={"web": {"gopher_quality": {"min_words": 20}}})
    with pytest.raises(ValueError) as err:
        quality.build(cfg, Path("unused"), source="web")
    message = str(err.value)
    assert isinstance(err.value, DataError)
    assert message.startswith("data.pipeline.quality.overrides.web.gopher_quality.min_words: not a keyword")
    assert (
        "min_doc_words" in message
        and "max_symbol_word_ratio" in message
        and "exclusion_writer" not in message
    )
    cfg = QualityConfig(overrides={"web": {"gopher": {}, "c4": {"min_sentences": 2, "min_num_sentences": 2}}})
    with pytest.raises(DataError) as err:
        quality.build(cfg, Path("unused"), source="web")
    assert "overrides.web.gopher: no such filter" in str(err.value)
    assert "overrides.web.c4.min_sentences" in str(err.value) and "c4.min_num_sentences" not in str(err.value)


def test_accepted_keywords_follow_the_filters_signatures() -> None:
    repetition = ["dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac", "top_n_grams"]
    assert quality.accepted_keywords("gopher_repetition") == sorted([*repetition, "dup_n_grams", "language"])
    assert "min_num_sentences" in quality.accepted_keywords("c4")
    assert quality.build(QualityConfig(), Path("unused")) == []
