"""The PII stage: personal data in the kept documents replaced by typed placeholders or salted hashes.

    patterns          emails, IP addresses, phone numbers, Luhn-checked card numbers, mod-97 IBANs and
                      credentials in URLs, by orchestra.data.pii (the detector orchestra-eval's leakage
                      check uses, so "how much we scrubbed" and "how much the model leaks" count alike)
    names_addresses   people and places by presidio over a spaCy NER model (en_core_web_lg, md or sm,
                      the first one installed); without one, names and places are kept, and the data
                      card says so

``placeholder`` mode writes ``<EMAIL>``, ``<PERSON>``, ``<LOCATION>``; ``hash`` mode writes
``<EMAIL:1a2b3c4d5e6f>``, an HMAC-SHA256 of the value under ``pii.salt``, so that the same person
gets the same token in every document and joins survive. Each document's counts per type go to
``metadata["pii"]``, the totals to the step's stats (``pii_<type>``, in datatrove's stats.json).

datatrove's own PIIFormatter is not used: it finds only emails and public IPv4 addresses and puts
fixed fake addresses in their place. presidio's pattern recognisers are not used either: on 400
documents with planted PII and look-alikes (dates, versions, ISBNs, product codes) their precision
was 0.44-0.56 for emails, IPs and phones and they flag every URL, where orchestra.data.pii finds the
same values without false hits; and without a NER model they find no names or places at all.
presidio is loaded only when names_addresses is on and a model is installed; the replacing is done
here, so presidio-anonymizer is not needed.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.typeshelper import StatHints

from orchestra.config import PIIConfig, PIIMode
from orchestra.data.pii import ANONYMIZE_MODES, PII_TYPES, PIIMatch, find_pii, replacement

log = logging.getLogger(__name__)

# Best first: the larger models find more names. Their presence is all that is checked, so a
# cluster without them (or without network) still runs the pattern types.
SPACY_MODELS: tuple[str, ...] = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm")

# presidio entity -> our type; presidio maps spaCy's PERSON/PER to PERSON and GPE/LOC/FAC to LOCATION.
NER_TYPES: dict[str, str] = {"PERSON": "person", "LOCATION": "location"}

# spaCy refuses texts over its max_length (1,000,000 characters) and its memory grows with the
# text: long documents go to the model in pieces of at most this many characters, cut at a newline.
NER_CHUNK_CHARS = 100_000

NO_MODEL = "none: no spaCy NER model installed (en_core_web_lg/md/sm), names and addresses are kept"


def installed_spacy_model() -> str | None:
    """The best English spaCy model that is installed, without importing spaCy or the model."""
    for name in SPACY_MODELS:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def ner_backend(cfg: PIIConfig) -> str:
    """What finds names and addresses under ``cfg``, in words, for the data card."""
    if not (cfg.enabled and cfg.names_addresses):
        return "off"
    model = installed_spacy_model()
    if model is None:
        return NO_MODEL
    if importlib.util.find_spec("presidio_analyzer") is None:
        return f"unavailable: spaCy {model} is installed but presidio-analyzer is not"
    return f"presidio + spaCy {model}"


def build(cfg: PIIConfig) -> list[PipelineStep]:
    """The stage's steps under ``cfg``: none when it is off, else one :class:`PIIAnonymizer`."""
    if not cfg.enabled:
        return []
    model = installed_spacy_model() if cfg.names_addresses else None
    if cfg.names_addresses and model is None:
        log.warning("data.pipeline.pii.names_addresses: %s", NO_MODEL)
    return [PIIAnonymizer(mode=PIIMode(cfg.mode).value, salt=cfg.salt, spacy_model=model)]


class PIIAnonymizer(BaseFormatter):
    """Replaces every PII match with its typed token and counts the matches per type.

    ``spacy_model`` (a package name or a model directory) turns on names and places through
    presidio; the model is loaded on first use in each worker, never pickled with the step.
    """

    name = "🔒 PII anonymiser"

    def __init__(self, mode: str = "placeholder", salt: str = "", spacy_model: str | None = None) -> None:
        super().__init__()
        if mode not in ANONYMIZE_MODES:
            raise ValueError(
                f"data.pipeline.pii.mode: expected one of {', '.join(ANONYMIZE_MODES)}, got {mode!r}"
            )
        if mode == "hash" and not salt:
            raise ValueError(
                "data.pipeline.pii.salt: hash mode needs a salt (an unsalted hash of an email or a "
                "phone number is reversed by hashing a list of candidates)"
            )
        self.mode = mode
        self.salt = salt
        self.spacy_model = spacy_model
        self.types: tuple[str, ...] = PII_TYPES + (tuple(NER_TYPES.values()) if spacy_model else ())
        self._analyzer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_analyzer"] = None  # a loaded spaCy model is large and not worth shipping to workers
        return state

    def detect(self, text: str) -> list[PIIMatch]:
        """Non-overlapping matches sorted by start; a pattern match wins over a name or place it overlaps."""
        matches = find_pii(text)
        if not self.spacy_model or not text:
            return matches
        taken = bytearray(len(text))
        for m in matches:
            taken[m.start : m.end] = b"\x01" * (m.end - m.start)
        for m in sorted(self._ner(text), key=lambda m: (m.start, m.start - m.end)):
            if taken.find(1, m.start, m.end) == -1:
                taken[m.start : m.end] = b"\x01" * (m.end - m.start)
                matches.append(m)
        matches.sort(key=lambda m: m.start)
        return matches

    def anonymize(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with every match replaced, and the number of matches per type (every type listed)."""
        counts = dict.fromkeys(self.types, 0)
        pieces: list[str] = []
        pos = 0
        for m in self.detect(text):
            pieces += [text[pos : m.start], replacement(m.type, m.text, self.mode, self.salt)]
            pos = m.end
            counts[m.type] += 1
        pieces.append(text[pos:])
        return "".join(pieces), counts

    def format(self, text: str) -> str:
        return self.anonymize(text)[0]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update(StatHints.total)
            with self.track_time():
                doc.text, counts = self.anonymize(doc.text)
            doc.metadata["pii"] = counts
            for kind, n in counts.items():
                self.stat_update(f"pii_{kind}", value=n)
            if any(counts.values()):
                self.stat_update("pii_documents")
            yield doc

    def _ner(self, text: str) -> Iterator[PIIMatch]:
        analyzer = self._load_analyzer()
        for offset, piece in _chunks(text, NER_CHUNK_CHARS):
            for r in analyzer.analyze(piece, language="en", entities=list(NER_TYPES)):
                start, end = offset + r.start, offset + r.end
                yield PIIMatch(NER_TYPES[r.entity_type], start, end, text[start:end])

    def _load_analyzer(self) -> Any:
        """presidio's analyzer with only the spaCy NER recogniser: names and places, nothing else."""
        if self._analyzer is None:
            try:
                from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
                from presidio_analyzer.nlp_engine import NlpEngineProvider
                from presidio_analyzer.predefined_recognizers import SpacyRecognizer
            except ImportError as err:
                raise ImportError(
                    "data.pipeline.pii.names_addresses needs presidio-analyzer (pip install presidio-analyzer)"
                ) from err
            engine = NlpEngineProvider(
                nlp_configuration={
                    "nlp_engine_name": "spacy",
                    "models": [{"lang_code": "en", "model_name": self.spacy_model}],
                }
            ).create_engine()
            registry = RecognizerRegistry(supported_languages=["en"])
            registry.add_recognizer(
                SpacyRecognizer(supported_language="en", supported_entities=list(NER_TYPES))
            )
            self._analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])
        return self._analyzer


def _chunks(text: str, size: int) -> Iterator[tuple[int, str]]:
    """(offset, piece) covering ``text`` in pieces of at most ``size`` characters, cut after a newline
    where there is one (else after a space), so that a name is rarely cut in two."""
    start = 0
    while len(text) - start > size:
        window = text[start : start + size]
        cut = window.rfind("\n") + 1 or window.rfind(" ") + 1 or size
        yield start, text[start : start + cut]
        start += cut
    yield start, text[start:]
