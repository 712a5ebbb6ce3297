"""The PII stage on the planted set: per-type precision and recall, no value left behind, tokens
in both modes, counts in metadata and stats, and names and places through presidio.

pii_planted.jsonl (written by make_pii_planted.py) holds ~400 documents of prose with ~100
planted values of every type and hard negatives next to them. A detection counts as a hit when it
overlaps a planted span of the same type; anything else it finds is a false hit. ``-s`` prints
the table.

The names-and-places path is exercised with a real presidio analyzer over a small spaCy pipeline
built here (a blank English model plus an entity ruler that knows a few names and places), since
no trained spaCy model may be downloaded; what it checks is presidio's wiring, the overlap rule
and the tokens, not the quality of any NER model.
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from orchestra.config import PIIConfig, PIIMode, PipelineConfig
from orchestra.data.pii import PII_TYPES, find_pii
from orchestra.data.pipeline import anonymize
from orchestra.data.pipeline.anonymize import (
    NO_MODEL,
    PIIAnonymizer,
    build,
    installed_spacy_model,
    ner_backend,
)
from tests.data.pipeline import make_pii_planted

PLANTED = Path(__file__).with_name("pii_planted.jsonl")
RECALL_MIN = 0.98
PRECISION_MIN = 0.95
HASH_TOKEN = re.compile(r"<([A-Z_]+):([0-9a-f]{12})>")


def _load() -> list[dict[str, Any]]:
    return [json.loads(line) for line in PLANTED.read_text(encoding="utf-8").splitlines()]


def _overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return _load()


@pytest.fixture(scope="module")
def pipeline_run(records: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stage as the pipeline runs it: JsonlReader -> PII step -> JsonlWriter in a datatrove executor."""
    root = tmp_path_factory.mktemp("pii")
    steps = [
        JsonlReader(str(PLANTED.parent), glob_pattern=PLANTED.name),
        *build(PIIConfig(enabled=True)),
        JsonlWriter(str(root / "out"), output_filename="${rank}.jsonl.gz"),
    ]
    LocalPipelineExecutor(pipeline=steps, tasks=1, workers=1, logging_dir=str(root / "logs")).run()
    with gzip.open(root / "out" / "00000.jsonl.gz", "rt", encoding="utf-8") as fh:
        out = {r["id"]: r for r in map(json.loads, fh)}
    stats = json.loads((root / "logs" / "stats.json").read_text())
    return {"out": out, "stats": stats}


@pytest.fixture(scope="module")
def scores(records: list[dict[str, Any]], pipeline_run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per type: hits, false hits (with the negative they fell on), misses, exact spans, values left in the output."""
    step = PIIAnonymizer()
    table: dict[str, dict[str, Any]] = {
        t: {"planted": 0, "tp": 0, "exact": 0, "fn": [], "fp": [], "leaked": 0} for t in PII_TYPES
    }
    for record in records:
        text, spans = record["text"], record["spans"]
        found = step.detect(text)
        output = pipeline_run["out"][record["id"]]["text"]
        for span in spans:
            row = table[span["type"]]
            row["planted"] += 1
            hits = [
                m
                for m in found
                if m.type == span["type"] and _overlaps(m.start, m.end, span["start"], span["end"])
            ]
            value = text[span["start"] : span["end"]]
            if hits:
                row["tp"] += 1
                row["exact"] += any((m.start, m.end) == (span["start"], span["end"]) for m in hits)
            else:
                row["fn"].append((span["format"], value))
            row["leaked"] += value in output
        for m in found:
            if not any(
                s["type"] == m.type and _overlaps(m.start, m.end, s["start"], s["end"]) for s in spans
            ):
                kinds = [
                    n["kind"] for n in record["negatives"] if _overlaps(m.start, m.end, n["start"], n["end"])
                ]
                table[m.type]["fp"].append((m.text, kinds or ["prose"]))
    return table


# --------------------------------------------------------------------------------------------
# The planted set
# --------------------------------------------------------------------------------------------


def test_planted_set_is_the_generators_output_and_covers_every_type(records: list[dict[str, Any]]) -> None:
    """The committed file is what make_pii_planted.py writes, and every offset slices its value."""
    assert PLANTED.read_text(encoding="utf-8") == make_pii_planted.dumps(make_pii_planted.build_records())
    per_type = Counter(s["type"] for r in records for s in r["spans"])
    assert set(per_type) == set(PII_TYPES) and min(per_type.values()) >= 90
    assert len(records) == make_pii_planted.DOCUMENTS
    assert sum(len(r["negatives"]) for r in records) >= 500
    formats = {s["format"] for r in records for s in r["spans"]}
    for prefix in ["ipv4/public", "ipv6/compressed", "phone/uk/", "phone/us/", "card/amex/", "iban/GB/"]:
        assert any(f.startswith(prefix) for f in formats), prefix
    for r in records:
        for s in r["spans"]:
            value = r["text"][s["start"] : s["end"]]
            assert value == value.strip() and value


def test_precision_and_recall_per_type(scores: dict[str, dict[str, Any]]) -> None:
    header = f"{'type':16s} {'planted':>7s} {'hits':>5s} {'false':>5s} {'missed':>6s} {'exact':>5s} {'leaked':>6s} {'precision':>9s} {'recall':>6s}"
    lines = [header]
    failures = []
    for kind in PII_TYPES:
        row = scores[kind]
        tp, fp, fn = row["tp"], len(row["fp"]), len(row["fn"])
        precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        lines.append(
            f"{kind:16s} {row['planted']:7d} {tp:5d} {fp:5d} {fn:6d} {row['exact']:5d} {row['leaked']:6d} "
            f"{precision:9.3f} {recall:6.3f}"
        )
        if recall < RECALL_MIN:
            failures.append(f"{kind}: recall {recall:.3f}, missed e.g. {row['fn'][:5]}")
        if precision < PRECISION_MIN:
            failures.append(f"{kind}: precision {precision:.3f}, false hits e.g. {row['fp'][:5]}")
        # A value the detector found must be gone from the output, all of it (no partial match).
        if row["leaked"] > fn:
            failures.append(f"{kind}: {row['leaked']} planted values still in the output, {fn} missed")
    print("\n" + "\n".join(lines))
    assert not failures, "\n".join(failures)


# Cases the planted set measured as misses or false hits before orchestra.data.pii handled them.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Call 0049 89 12345678 today.", [("phone", "0049 89 12345678")]),
        ("Call (+44) 20 7946 0958 today.", [("phone", "(+44) 20 7946 0958")]),
        ("Write to mary.o'brien@example.ie now.", [("email", "mary.o'brien@example.ie")]),
        ("Upgrade to version 6.16.13.84 first.", []),
        ("Firmware 1.9.0.8 fixes it; see section 4.2.1.3 and Version: 2.0.1.3.", []),
        ("It listens on 127.0.0.1 and 0.0.0.0 only.", []),
        ("The server at 10.0.0.5 runs build 7 only.", [("ip_address", "10.0.0.5")]),
        ("Mail it to Boston, MA 02108-1234.", []),
        ("Ring 07386-2135 after six.", [("phone", "07386-2135")]),
        ("Scan the barcode 9789380019116 on the back.", []),
        ("EAN 4009021525024 is printed under the barcode.", []),
        ("Old Visa 4222222222222 still on file.", [("credit_card", "4222222222222")]),
    ],
)
def test_cases_found_by_the_planted_set(text: str, expected: list[tuple[str, str]]) -> None:
    assert [(m.type, m.text) for m in find_pii(text)] == expected


# --------------------------------------------------------------------------------------------
# The step: output, counts, stats, modes
# --------------------------------------------------------------------------------------------


def test_output_has_placeholders_and_counts_in_metadata(
    records: list[dict[str, Any]], pipeline_run: dict[str, Any]
) -> None:
    step = PIIAnonymizer()
    for record in records:
        out = pipeline_run["out"][record["id"]]
        found = Counter(m.type for m in step.detect(record["text"]))
        assert out["metadata"]["pii"] == {t: found[t] for t in PII_TYPES}
        placeholders = Counter(t.lower() for t in re.findall(r"<([A-Z_]+)>", out["text"]))
        assert placeholders == found
        assert find_pii(out["text"]) == []


def _total(stat: int | dict[str, Any]) -> int:
    """datatrove writes a plain counter as its number and a valued metric as {total, n, mean, ...}."""
    return stat if isinstance(stat, int) else int(stat["total"])


def test_stats_hold_the_totals(records: list[dict[str, Any]], pipeline_run: dict[str, Any]) -> None:
    [step_stats] = [s["stats"] for s in pipeline_run["stats"] if s["name"].endswith(PIIAnonymizer.name)]
    totals: Counter[str] = Counter()
    for out in pipeline_run["out"].values():
        totals.update(out["metadata"]["pii"])
    for kind in PII_TYPES:
        assert _total(step_stats[f"pii_{kind}"]) == totals[kind] > 0
        assert step_stats[f"pii_{kind}"]["n"] == len(records)  # one update per document, zeros too
    with_pii = sum(any(o["metadata"]["pii"].values()) for o in pipeline_run["out"].values())
    assert _total(step_stats["pii_documents"]) == with_pii < len(records)
    assert _total(step_stats["total"]) == len(records)


def _run(step: PIIAnonymizer, texts: list[str]) -> list[Document]:
    return list(step.run(Document(text=t, id=str(i)) for i, t in enumerate(texts)))


def test_hash_tokens_join_across_documents_under_one_salt_only() -> None:
    texts = ["Write to anna.weber@example.com today.", "cc anna.weber@example.com and tom@example.org"]
    a1, a2 = _run(build(PIIConfig(enabled=True, mode=PIIMode.hash, salt="s1"))[0], texts)
    b1, _ = _run(build(PIIConfig(enabled=True, mode=PIIMode.hash, salt="s2"))[0], texts)
    tok_a1, tok_a2, tok_b1 = (HASH_TOKEN.findall(d.text) for d in (a1, a2, b1))
    assert tok_a1 == [("EMAIL", tok_a1[0][1])] and tok_a2[0] == tok_a1[0]
    assert tok_a2[1][0] == "EMAIL" and tok_a2[1] != tok_a1[0]  # another address, another token
    assert tok_b1[0] != tok_a1[0]  # another salt, another token
    assert a1.metadata["pii"]["email"] == 1 and a2.metadata["pii"]["email"] == 2
    placeholder = _run(build(PIIConfig(enabled=True))[0], texts)
    assert placeholder[1].text == "cc <EMAIL> and <EMAIL>"


def test_hash_mode_without_salt_is_refused() -> None:
    with pytest.raises(ValueError, match="salt"):
        build(PIIConfig(enabled=True, mode=PIIMode.hash, salt=""))
    with pytest.raises(ValueError, match="'redact'"):
        PIIAnonymizer(mode="redact")


def test_off_builds_nothing() -> None:
    assert build(PIIConfig(enabled=False, names_addresses=True)) == []
    assert build(PipelineConfig().pii) == []
    assert ner_backend(PIIConfig(enabled=True)) == "off"
    assert ner_backend(PIIConfig(enabled=False, names_addresses=True)) == "off"


# --------------------------------------------------------------------------------------------
# Names and addresses
# --------------------------------------------------------------------------------------------


def test_names_addresses_reports_its_backend_and_runs_with_what_is_installed(
    records: list[dict[str, Any]],
) -> None:
    cfg = PIIConfig(enabled=True, names_addresses=True)
    [step] = build(cfg)
    model = installed_spacy_model()
    if model is None:  # this machine: no spaCy model, so the pattern types only
        assert ner_backend(cfg) == NO_MODEL and step.spacy_model is None
        assert step.types == PII_TYPES
    else:
        assert ner_backend(cfg) == f"presidio + spaCy {model}" and step.spacy_model == model
    docs = _run(step, [r["text"] for r in records[:40]])
    assert all(set(d.metadata["pii"]) == set(step.types) for d in docs)


@pytest.fixture(scope="module")
def ruler_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A spaCy pipeline on disk that tags a few names (PERSON) and places (GPE, LOC) by rule."""
    spacy = pytest.importorskip("spacy")
    pytest.importorskip("presidio_analyzer")
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(
        [
            {"label": "PERSON", "pattern": "Maria Becker"},
            {"label": "PERSON", "pattern": "Tom Ng"},
            {"label": "GPE", "pattern": "Berlin"},
            {"label": "LOC", "pattern": "Lake Constance"},
            {"label": "GPE", "pattern": "10.0.0.7"},  # also an IP: the pattern type must win
        ]
    )
    path = tmp_path_factory.mktemp("ruler") / "model"
    nlp.to_disk(path)
    return str(path)


def test_names_and_places_through_presidio(ruler_model: str) -> None:
    text = "Maria Becker moved from Berlin to Lake Constance; Tom Ng kept 10.0.0.7. Ask Maria Becker."
    [doc] = _run(PIIAnonymizer(spacy_model=ruler_model), [text])
    assert (
        doc.text == "<PERSON> moved from <LOCATION> to <LOCATION>; <PERSON> kept <IP_ADDRESS>. Ask <PERSON>."
    )
    assert doc.metadata["pii"] == {**dict.fromkeys(PII_TYPES, 0), "ip_address": 1, "person": 3, "location": 2}
    [hashed] = _run(PIIAnonymizer(mode="hash", salt="k", spacy_model=ruler_model), [text])
    tokens = HASH_TOKEN.findall(hashed.text)
    people = [h for t, h in tokens if t == "PERSON"]
    assert people[0] == people[2] != people[1]  # the same name, the same token; another name, another


def test_long_documents_go_to_the_model_in_pieces(ruler_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anonymize, "NER_CHUNK_CHARS", 40)
    text = "\n".join(f"Line {i}: Maria Becker wrote from Berlin." for i in range(30))
    step = PIIAnonymizer(spacy_model=ruler_model)
    found = [m for m in step.detect(text) if m.type in ("person", "location")]
    assert len(found) == 60 and all(text[m.start : m.end] == m.text for m in found)
    assert {m.text for m in found} == {"Maria Becker", "Berlin"}
    pieces = list(anonymize._chunks(text, 40))
    assert "".join(p for _, p in pieces) == text and all(len(p) <= 40 for _, p in pieces)
    assert all(text[o : o + len(p)] == p for o, p in pieces)


def test_step_pickles_without_its_model(ruler_model: str) -> None:
    """datatrove ships steps to worker processes: a loaded analyzer must not travel with them."""
    step = PIIAnonymizer(spacy_model=ruler_model)
    _run(step, ["Maria Becker"])
    assert step._analyzer is not None
    clone = pickle.loads(pickle.dumps(step))
    assert clone._analyzer is None
    assert _run(clone, ["Maria Becker in Berlin"])[0].text == "<PERSON> in <LOCATION>"
