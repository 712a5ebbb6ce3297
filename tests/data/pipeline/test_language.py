"""The language stage against the known language of spaCy's example sentences (written by native
speakers for each language) and against langdetect, an independent identifier."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from datatrove.data import Document

from orchestra.config import LanguageConfig
from orchestra.data.pipeline import language

# spaCy module -> the ISO code fastText reports (Norwegian Bokmål is "no" there).
LANGUAGES = {"en": "en", "fr": "fr", "de": "de", "es": "es", "it": "it", "pt": "pt", "nl": "nl",
             "ru": "ru", "pl": "pl", "sv": "sv", "fi": "fi", "tr": "tr", "ja": "ja", "zh": "zh",
             "ko": "ko", "ar": "ar", "el": "el", "hu": "hu", "ro": "ro", "uk": "uk", "nb": "no"}  # fmt: skip


def _sentences() -> dict[str, list[str]]:
    return {
        code: importlib.import_module(f"spacy.lang.{mod}.examples").sentences
        for mod, code in LANGUAGES.items()
    }


def _docs() -> list[Document]:
    return [
        Document(text=" ".join(sentences), id=code, metadata={"source": "spacy"})
        for code, sentences in _sentences().items()
    ]


def test_documents_are_labelled_with_their_language() -> None:
    step = language.LanguageIdentifier(keep=[], min_score=0.5)
    out = list(step.run(iter(_docs())))
    assert len(out) == len(LANGUAGES)  # keep empty: nothing dropped
    assert {d.id: d.metadata["language"] for d in out} == {code: code for code in LANGUAGES.values()}
    assert all(0.5 < d.metadata["language_score"] <= 1.0 for d in out)


def test_sentence_labels_agree_with_langdetect() -> None:
    langdetect = pytest.importorskip("langdetect")
    langdetect.DetectorFactory.seed = 0
    step = language.LanguageIdentifier(keep=[], min_score=0.0)
    # langdetect has no Norwegian Bokmål/Danish split worth testing; the rest it names alike.
    pairs = [(s, code) for code, sents in _sentences().items() if code != "no" for s in sents]
    ours = [step._detect(s)[0] for s, _ in pairs]
    theirs = [langdetect.detect(s).split("-")[0] for s, _ in pairs]  # zh-cn -> zh
    truth = [code for _, code in pairs]
    ours_right = sum(a == t for a, t in zip(ours, truth, strict=True)) / len(pairs)
    theirs_right = sum(b == t for b, t in zip(theirs, truth, strict=True)) / len(pairs)
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(pairs)
    assert ours_right >= 0.95 and ours_right >= theirs_right - 0.02, (ours_right, theirs_right)
    assert agree >= 0.9, agree


def test_keep_list_drops_others_into_exclusions(tmp_path: Path) -> None:
    cfg = LanguageConfig(keep=["FR", "de"], min_score=0.5)
    (step,) = language.build(cfg, tmp_path / "excl")
    docs = [*_docs(), Document(text="ok 12 ok 12 :) ...", id="noise", metadata={"source": "spacy"})]
    kept = list(step.run(iter(docs)))
    assert sorted(d.id for d in kept) == ["de", "fr"]
    step.exclusion_writer.close()
    records = [json.loads(line) for p in sorted((tmp_path / "excl").rglob("*.jsonl")) for line in p.open()]
    reasons = {r["id"]: r["metadata"]["filter_reason"] for r in records}
    assert len(reasons) == len(docs) - 2
    assert reasons["en"] == "language:not_in_keep_list"
    assert reasons["noise"] in ("language:not_in_keep_list", "language:language_uncertain")
    # Every excluded record still carries the identified language, for the data card.
    assert all("language" in r["metadata"] for r in records)


def test_low_score_is_uncertain_not_kept() -> None:
    text = "Hello. 1 2 3 ok."
    guess, score = language.LanguageIdentifier(keep=[], min_score=0.0)._detect(text)
    strict = language.LanguageIdentifier(keep=[guess], min_score=min(1.0, score + 0.01))
    assert strict.filter(Document(text=text, id="x")) == (False, "language_uncertain")
    lenient = language.LanguageIdentifier(keep=["en"], min_score=0.5)
    assert lenient.filter(Document(text=" ".join(_sentences()["en"]), id="y")) is True


def test_long_documents_are_read_from_their_start() -> None:
    step = language.LanguageIdentifier(keep=[], min_score=0.0)
    french = " ".join(_sentences()["fr"])
    german = " ".join(_sentences()["de"])
    text = (french + " ") * (language.MAX_CHARS // len(french) + 1) + german * 50
    assert step._detect(text)[0] == "fr"
