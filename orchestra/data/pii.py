"""Pattern detection and anonymisation of personally identifiable information (PII) in free text.

One detector shared by the evaluation's PII-leakage check on generated samples and the data
pipeline's anonymiser, so that "how much PII did the model leak" and "how much PII did we scrub"
count the same things. Standard library only (``re``, ``hashlib``, ``hmac``, ``ipaddress``): it
runs in tokenizer worker processes and on eval hosts that should not pay for torch, a tokenizer
or a NER model, and it must never import the training or model stacks.

Every type is a regular expression for the candidate plus a validator where one exists (Luhn
for card numbers, ISO 13616 mod-97 and the national length for IBANs, :mod:`ipaddress` for IPv6,
octet ranges for IPv4). The patterns are tuned for precision on ordinary prose: dates, years,
times, prices, version strings, ISBNs and order numbers are not PII, and a detector that flags
them makes a leakage metric meaningless. What it deliberately does not match: local phone
numbers without an area code (``555-0143``), loopback and unspecified addresses (``127.0.0.1``,
``0.0.0.0``, ``::1``, ``::``), four-part numbers right after a version or section word
(``firmware 2.10.4.1``, ``section 4.2.1.3``), card-shaped numbers outside the issuers' ranges
(first digit 2-6 or 8; 13 digits only for Visa's 4), so that ISBN-13s (978/979) are no card,
numbers labelled as barcodes (``EAN 4006381333931``), US ZIP+4 codes after a state
(``Boston, MA 02108-1234``), and lower-case IBANs in running text.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "ANONYMIZE_MODES",
    "IBAN_LENGTHS",
    "PII_TYPES",
    "PIIMatch",
    "anonymize",
    "find_pii",
    "iban_valid",
    "luhn_valid",
    "pii_counts",
    "replacement",
]

PII_TYPES: tuple[str, ...] = ("email", "ip_address", "phone", "credit_card", "iban", "url_credentials")

ANONYMIZE_MODES: tuple[str, ...] = ("placeholder", "hash")

# Overlap tie-break (lower wins) when two candidates are equally long: the more specific reading
# of the same characters. The longer candidate always wins first (see _resolve_overlaps).
_PRIORITY: dict[str, int] = {
    "url_credentials": 0,
    "iban": 1,
    "credit_card": 2,
    "email": 3,
    "ip_address": 4,
    "phone": 5,
}

# ISO 13616 IBAN length per country (SWIFT IBAN registry). A country not listed is checked by
# the generic 15..34 length and mod-97 only, so a newly added country is not silently missed.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


@dataclass(frozen=True)
class PIIMatch:
    """One detected span: ``text == source[start:end]``, so callers can cut or replace it."""

    type: str
    start: int
    end: int
    text: str


# --------------------------------------------------------------------------------------------
# Patterns. Every one refuses to start or end inside a longer token (lookarounds), because a
# "match" cut out of the middle of a longer number or word is almost always something else.
# --------------------------------------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"(?<![\w.%+\-/])"  # not inside a word; '/' so that ssh://git@host is no email
    r"[A-Za-z0-9_%+\-]+(?:[.'][A-Za-z0-9_%+\-]+)*"  # mary.o'brien@ is one local part
    r"@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,63}"
    r"(?![\w\-]|\.[A-Za-z0-9])"
)

_URL_CREDENTIALS_RE = re.compile(
    r"(?<![A-Za-z0-9+.\-])"
    r"[A-Za-z][A-Za-z0-9+.\-]{1,31}://"  # http, postgres, mongodb+srv, ...
    r"[^\s:/?#@\[\]]*"  # user (redis://:password@host has none)
    r":[^\s/?#@]+"  # password, at least one character
    r"@(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?)"  # host
    r"(?::\d{1,5})?"
    r"(?:,[A-Za-z0-9_.\-]+(?::\d{1,5})?)*"  # mongodb://u:p@h1:27017,h2:27017
    r"(?P<rest>[/?#][^\s<>\"'`]*)?"
)
_URL_TRAILING = ".,;:!?)]}'\""

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not preceded by a word character or '.', not followed by one or by '.digit': 'v1.2.3.4' and
# '1.2.3.4.5' are versions, '999.1.1.1' has no valid start.
_IPV4_RE = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.\d)")
# A four-part number right after one of these words is a version or a section, not an address.
_VERSION_WORD_RE = re.compile(
    r"(?:\b(?:version|ver|release|build|firmware|fw|driver|kernel|patch|revision|rev|section|sec|"
    r"clause|chapter|paragraph|para|article|art|item|step|table|figure|fig|appendix|rule)\.?|§)"
    r"\s*:?\s*$",
    re.IGNORECASE,
)

# Candidate only (at least two colons); ipaddress decides. An embedded IPv4 tail is tried first.
_IPV6_RE = re.compile(
    r"(?<![\w:.])"
    r"(?=[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:)"
    r"(?:[0-9A-Fa-f:]{2,29}:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f:]{2,39})"
)

_CARD_RE = re.compile(
    r"(?<![\w+\-./])(?<!\d[ \-])"
    r"(?:\d{13,19}"
    r"|\d{4}(?P<s1>[ \-])\d{4}(?P=s1)\d{4}(?P=s1)\d{1,4}(?:(?P=s1)\d{1,3})?"  # 4-4-4-4(-3), 4-4-4-1
    r"|\d{4}(?P<s2>[ \-])\d{6}(?P=s2)\d{4,5})"  # Amex 4-6-5, Diners 4-6-4
    r"(?!\w)(?![ \-./]?\d)"
)

_PHONE_RE = re.compile(
    r"(?<![\w+\-.])(?<!\d[ .\-/])"
    r"(?:"
    # International: +CC or 00CC, an optional (0) or (area), then separated groups; +CC compact;
    # (+CC) in parentheses.
    r"(?P<intl>\+(?:\d{7,15}|\d{1,3}(?:[ .\-]?\(\d{1,4}\))?[ .\-]?\d{1,8}(?:[ .\-]\d{2,8}){0,5})"
    r"|00[1-9]\d{0,2}(?:[ .\-]?\(\d{1,4}\))?[ .\-]\d{1,8}(?:[ .\-]\d{2,8}){0,5}"
    r"|\(\+\d{1,3}\)[ .\-]?\d{1,8}(?:[ .\-]\d{2,8}){0,5})"
    # North American: (NPA) NXX-XXXX, NPA-NXX-XXXX, 1-NPA-NXX-XXXX with separators.
    r"|(?P<nanp>(?:1[ .\-])?(?:\([2-9]\d{2}\)[ .\-]?|[2-9]\d{2}[ .\-])[2-9]\d{2}[ .\-]\d{4})"
    # European national with trunk 0: 030 1234567, 020 7946 0958, 06 12 34 56 78, (030) 123456.
    r"|(?P<trunk>(?:\(0\d{1,4}\) ?\d{2,8}|0\d{1,4}[ .\-/]\d{2,8})(?:[ .\-/]\d{2,8}){0,3})"
    r")"
    r"(?!\w)(?![.\-/]\d)"
)
_DATE_RE = re.compile(r"\d{1,4}[./\-]\d{1,2}[./\-]\d{1,4}")
# "Boston, MA 02108-1234": a ZIP+4 code after a state abbreviation, shaped like a trunk number.
_ZIP4_RE = re.compile(r"\d{5}-\d{4}")
_STATE_BEFORE_RE = re.compile(r"(?<![A-Za-z])[A-Z]{2} $")
# "EAN 4006381333931": a labelled barcode or book number that happens to pass Luhn.
_BARCODE_WORD_RE = re.compile(r"\b(?:EAN(?:-13)?|GTIN|UPC|ISBN(?:-1[03])?|barcode)\s*:?\s*$", re.IGNORECASE)
# Digit groups that continue right after a phone candidate: a phone inside a longer grouped
# number ("0000 0000 0000 0000", an account number) is part of that number.
_RUN_TAIL_RE = re.compile(r"(?:[ .\-/]\d+)+")

# What an IBAN looks like before validation; also used to keep digit runs inside an IBAN-shaped
# string (with wrong check digits, say) from being read as a phone or a card number.
_IBAN_SHAPED_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}"
    r"(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)"
    r"(?![A-Za-z0-9])"
)
_IBAN_COMPACT_RE = re.compile(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}")


# --------------------------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """Luhn (mod-10) check of a card number, spaces and dashes allowed: a non-Luhn number is no card."""
    s = digits.replace(" ", "").replace("-", "")
    if len(s) < 2 or not (s.isascii() and s.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(s)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """ISO 13616 check of an IBAN (spaces allowed): shape, national length, check digits 02..98, mod 97 == 1."""
    s = text.replace(" ", "").upper()
    if not s.isascii() or _IBAN_COMPACT_RE.fullmatch(s) is None:
        return False
    expected = IBAN_LENGTHS.get(s[:2])
    if expected is not None and len(s) != expected:
        return False
    if not 2 <= int(s[2:4]) <= 98:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


# --------------------------------------------------------------------------------------------
# Finders: each yields validated candidates of one type; overlaps are settled in find_pii.
# --------------------------------------------------------------------------------------------


def _find_email(text: str) -> Iterator[PIIMatch]:
    for m in _EMAIL_RE.finditer(text):
        yield PIIMatch("email", m.start(), m.end(), m.group())


def _find_url_credentials(text: str) -> Iterator[PIIMatch]:
    for m in _URL_CREDENTIALS_RE.finditer(text):
        end = m.end()
        if m.group("rest"):
            # Sentence punctuation after a URL is not part of it.
            end = m.start("rest") + len(m.group("rest").rstrip(_URL_TRAILING))
        yield PIIMatch("url_credentials", m.start(), end, text[m.start() : end])


def _find_ip_address(text: str) -> Iterator[PIIMatch]:
    for m in _IPV4_RE.finditer(text):
        # Loopback and unspecified addresses are every machine's; the words say version or section.
        if m.group().startswith("127.") or m.group() == "0.0.0.0":
            continue
        if _VERSION_WORD_RE.search(text, max(0, m.start() - 24), m.start()):
            continue
        yield PIIMatch("ip_address", m.start(), m.end(), m.group())
    for m in _IPV6_RE.finditer(text):
        candidate = m.group()
        after = text[m.end() : m.end() + 2]
        if after[:1] and (after[0].isalnum() or after[0] in "_:"):
            continue
        if after[:1] == "." and after[1:2].isdigit():
            continue
        if candidate.endswith(":") and not candidate.endswith("::"):
            candidate = candidate[:-1]  # "fe80::1: link down"
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        groups = [g for g in candidate.split(":") if g]
        n_groups = len(groups) + (1 if groups and "." in groups[-1] else 0)
        # '::1', '::' and slice-like '1::2' are no one's address; real ones carry more digits.
        if n_groups < 3 and not any(len(g) >= 3 for g in groups):
            continue
        yield PIIMatch("ip_address", m.start(), m.start() + len(candidate), candidate)


def _find_phone(text: str) -> Iterator[PIIMatch]:
    for m in _PHONE_RE.finditer(text):
        candidate = m.group()
        n_digits = sum(ch.isdigit() for ch in candidate) - (2 if candidate.startswith("00") else 0)
        low, high = (9, 12) if m.group("trunk") else (7, 15)
        if not low <= n_digits <= high or _DATE_RE.fullmatch(candidate):
            continue
        if _ZIP4_RE.fullmatch(candidate) and _STATE_BEFORE_RE.search(text, max(0, m.start() - 3), m.start()):
            continue
        tail = _RUN_TAIL_RE.match(text, m.end())
        if tail and n_digits + sum(ch.isdigit() for ch in tail.group()) > 15:
            continue
        yield PIIMatch("phone", m.start(), m.end(), candidate)


def _find_credit_card(text: str) -> Iterator[PIIMatch]:
    for m in _CARD_RE.finditer(text):
        digits = m.group().replace(" ", "").replace("-", "")
        # 0000 0000 0000 0000 passes Luhn; a run of one digit is a placeholder, not a card.
        if not 13 <= len(digits) <= 19 or len(set(digits)) == 1 or not luhn_valid(digits):
            continue
        if not _issuer_range(digits) or _BARCODE_WORD_RE.search(text, max(0, m.start() - 16), m.start()):
            continue
        yield PIIMatch("credit_card", m.start(), m.end(), m.group())


def _issuer_range(digits: str) -> bool:
    """Card networks issue from first digits 2-6 and 8 (Visa 4, Mastercard 2/5, Amex/Diners/JCB 3,
    Discover/UnionPay/Maestro 6, RuPay/UnionPay 8); only Visa ever issued 13 digits. ISBN-13 and
    most EAN-13 barcodes start elsewhere."""
    if len(digits) == 13:
        return digits[0] == "4"
    return digits[0] in "234568"


def _find_iban(text: str) -> Iterator[PIIMatch]:
    for m in _IBAN_SHAPED_RE.finditer(text):
        parts = m.group().split(" ")
        # A trailing upper-case word ("... 7034 ABCD") looks like one more group: drop groups
        # from the end until the rest validates or is too short to be an IBAN.
        while parts and sum(map(len, parts)) >= 15:
            candidate = " ".join(parts)
            if iban_valid(candidate):
                yield PIIMatch("iban", m.start(), m.start() + len(candidate), candidate)
                break
            parts.pop()


_FINDERS: dict[str, Callable[[str], Iterator[PIIMatch]]] = {
    "email": _find_email,
    "ip_address": _find_ip_address,
    "phone": _find_phone,
    "credit_card": _find_credit_card,
    "iban": _find_iban,
    "url_credentials": _find_url_credentials,
}

# Types whose digits can sit inside an IBAN-shaped string without being what they look like.
_NUMERIC_TYPES = frozenset({"phone", "credit_card", "ip_address"})


def _resolve_types(types: Iterable[str] | None) -> tuple[str, ...]:
    """The requested types in PII_TYPES order; an unknown name fails loudly instead of matching nothing."""
    if types is None:
        return PII_TYPES
    requested = [types] if isinstance(types, str) else list(types)
    unknown = [t for t in requested if t not in PII_TYPES]
    if unknown:
        names = ", ".join(repr(t) for t in unknown)
        raise ValueError(f"unknown PII type {names}; known types: {', '.join(PII_TYPES)}")
    return tuple(t for t in PII_TYPES if t in requested)


def _resolve_overlaps(text: str, candidates: list[PIIMatch]) -> list[PIIMatch]:
    """Keep a non-overlapping subset: longest first, then the more specific type, then leftmost."""
    taken = bytearray(len(text))
    kept: list[PIIMatch] = []
    for c in sorted(set(candidates), key=lambda c: (c.start - c.end, _PRIORITY[c.type], c.start)):
        if c.end <= c.start or taken.find(1, c.start, c.end) != -1:
            continue
        taken[c.start : c.end] = b"\x01" * (c.end - c.start)
        kept.append(c)
    kept.sort(key=lambda c: c.start)
    return kept


def find_pii(text: str, types: Iterable[str] | None = None) -> list[PIIMatch]:
    """Non-overlapping PII matches in ``text``, sorted by start.

    Overlaps are settled over all types before ``types`` filters the result, so the digits of an
    IBAN are never reported as a phone number and an email inside a credentials URL is never
    reported as an email, whichever types were asked for. Raises ValueError on an unknown type.
    """
    wanted = _resolve_types(types)
    if not wanted or not text:
        return []
    # Positions strictly inside an IBAN-shaped string: a number starting there is part of it.
    inside_iban = bytearray(len(text))
    for m in _IBAN_SHAPED_RE.finditer(text):
        inside_iban[m.start() + 1 : m.end()] = b"\x01" * (m.end() - m.start() - 1)
    candidates: list[PIIMatch] = []
    for kind, finder in _FINDERS.items():
        for c in finder(text):
            if kind in _NUMERIC_TYPES and inside_iban[c.start]:
                continue
            candidates.append(c)
    return [m for m in _resolve_overlaps(text, candidates) if m.type in wanted]


def replacement(kind: str, value: str, mode: str = "placeholder", salt: str = "") -> str:
    """The token that replaces ``value`` of type ``kind``: ``<KIND>``, or ``<KIND:hex12>`` in hash mode.

    Public so that detectors of other types (names and places found by a NER model) write the
    same tokens under the same salt. Does not check mode or salt: :func:`anonymize` does.
    """
    label = kind.upper()
    if mode == "placeholder":
        return f"<{label}>"
    digest = hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"<{label}:{digest[:12]}>"


def anonymize(
    text: str, mode: str = "placeholder", salt: str = "", types: Iterable[str] | None = None
) -> tuple[str, dict[str, int]]:
    """Replace every match by a typed token; return the new text and the count per requested type.

    ``mode="placeholder"`` writes ``<EMAIL>``; ``mode="hash"`` writes ``<EMAIL:1a2b3c4d5e6f>``, the
    first 12 hex digits of HMAC-SHA256(salt, match text), so the same value under the same salt
    gets the same token and joins across documents survive. Hash mode refuses an empty salt: an
    unsalted hash of an email or phone number is reversed by hashing a dictionary of candidates.
    """
    if mode not in ANONYMIZE_MODES:
        raise ValueError(f"unknown anonymize mode {mode!r}; expected one of: {', '.join(ANONYMIZE_MODES)}")
    if mode == "hash" and not salt:
        raise ValueError(
            "anonymize mode='hash' needs a non-empty salt: an unsalted hash of an email or phone "
            "number can be reversed by hashing a dictionary of candidates"
        )
    wanted = _resolve_types(types)
    counts = dict.fromkeys(wanted, 0)
    pieces: list[str] = []
    pos = 0
    for m in find_pii(text, wanted):
        pieces.append(text[pos : m.start])
        pieces.append(replacement(m.type, m.text, mode, salt))
        pos = m.end
        counts[m.type] += 1
    pieces.append(text[pos:])
    return "".join(pieces), counts


def pii_counts(texts: Iterable[str]) -> dict[str, int]:
    """Matches per type over many texts, every type present (0 when none): the leakage metric's input."""
    counts = dict.fromkeys(PII_TYPES, 0)
    for text in texts:
        for m in find_pii(text):
            counts[m.type] += 1
    return counts
