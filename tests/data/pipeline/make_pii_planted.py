"""Writes pii_planted.jsonl: ordinary prose with PII planted at recorded offsets, next to hard negatives.

Run once (``python tests/data/pipeline/make_pii_planted.py``) and commit the output; the test
regenerates the records in memory and checks that the committed file still matches.

Every record is ``{"id", "text", "spans", "negatives"}``. ``spans`` lists each planted value as
``{"type", "start", "end", "format"}`` (Python string offsets, so code points, not bytes), with
the six types of :mod:`orchestra.data.pii`. ``negatives`` lists the hard negatives as
``{"kind", "start", "end"}``: strings that look like PII and must not be flagged. They are
recorded only so that a false hit can be traced to the kind of negative that caused it.

Valid card numbers and IBANs get their check digits from this file's own Luhn and mod-97 code,
never from the detector under test. The values and sentence templates are written independently
of ``tests/data/test_pii.py`` (other formats, other contexts), so the detector is not graded on
the corpus it was tuned on.

What counts as a hard negative, and why:

* dates, times, years, prices, ISBN-10/13 (hyphenated and bare), EAN-13 barcodes, order,
  invoice and tracking numbers, ZIP+4 codes, page ranges, scores, coordinates, population
  figures: numbers of things, not of people;
* product codes shaped like phone numbers (``part no. 31-0042-7788``): no country code, no
  trunk ``0``, no North American shape;
* version, build, firmware and section numbers shaped like IPv4 (``firmware 2.10.4.1``,
  ``section 4.2.1.3``); the loopback and unspecified addresses ``127.0.0.1`` and ``0.0.0.0``,
  which identify no machine;
* card-shaped numbers failing Luhn, IBAN-shaped strings with wrong check digits;
* ``user@localhost`` style mailboxes in code and configs: no domain, reachable by no one
  outside the machine, so no personal address; URLs with a user but no password.
"""

from __future__ import annotations

import ipaddress
import json
import random
import string
from collections.abc import Callable
from pathlib import Path

SEED = 20240611
DOCUMENTS = 400
OUTPUT = Path(__file__).with_name("pii_planted.jsonl")

# How many planted values a document carries (weights); the types are dealt round-robin.
PLANTED_PER_DOC = {0: 12, 1: 38, 2: 35, 3: 15}
TYPES = ("email", "ip_address", "phone", "credit_card", "iban", "url_credentials")

Planted = tuple[str, str]  # (value, format label)

# --------------------------------------------------------------------------------------------
# Check digits, computed here so the detector is never graded by its own validators.
# --------------------------------------------------------------------------------------------


def luhn_check_digit(payload: str) -> str:
    """The digit that makes ``payload + digit`` pass the Luhn check."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:  # these positions are doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def iban_mod97(text: str) -> int:
    s = text.replace(" ", "")
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97


def iban_check_digits(country: str, bban: str) -> str:
    remainder = int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
    return f"{98 - remainder:02d}"


def ean13_check_digit(payload: str) -> str:
    total = sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(payload))
    return str((10 - total % 10) % 10)


def isbn13_check_digit(payload: str) -> str:
    return ean13_check_digit(payload)


def isbn10_check_digit(payload: str) -> str:
    total = sum(int(c) * (10 - i) for i, c in enumerate(payload))
    check = (11 - total % 11) % 11
    return "X" if check == 10 else str(check)


# --------------------------------------------------------------------------------------------
# Planted values: each generator returns (exact text that must be found, format label).
# --------------------------------------------------------------------------------------------

FIRST = ["maria", "tom", "aiko", "oluwaseun", "pierre", "sofia", "lars", "priya", "mateo", "hannah", "yusuf"]
LAST = ["becker", "moreau", "tanaka", "adeyemi", "lindqvist", "fernandez", "oconnor", "patel", "weber", "ng"]
EMAIL_DOMAINS = [
    "example.com",
    "mail.example.org",
    "eu.mail.example.net",
    "cs.example.edu",
    "example.co.uk",
    "example.com.au",
    "acme-corp.example",
    "startup.io",
    "example.travel",
    "xn--bcher-kva.example",
    "lists.example.technology",
]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def gen_email(rng: random.Random) -> Planted:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    tag = rng.choice(["newsletter", "billing", "2024", "x", "shop-eu"])
    locals_ = {
        "first.last": f"{first}.{last}",
        "first_last": f"{first}_{last}",
        "initial-last-digits": f"{first[0]}{last}{rng.randint(1, 99)}",
        "plus-tag": f"{first}+{tag}",
        "first.last+tag": f"{first}.{last}+{tag}",
        "hyphen": f"{first}-{last}",
        "capitalised": f"{first.capitalize()}.{last.capitalize()}",
        "upper": f"{first.upper()}",
        "initials-dots": f"{first[0]}.{rng.choice(string.ascii_lowercase)}.{last}",
        "role": rng.choice(["support", "hr-team", "no-reply", "info"]) + f"+{last}",
        "apostrophe": f"{first}.o'{last}",
        "digits-only-local": _digits(rng, 8),
    }
    label = rng.choice(sorted(locals_))
    domain = rng.choice(EMAIL_DOMAINS)
    if label == "upper":
        domain = domain.upper()
    return f"{locals_[label]}@{domain}", f"email/{label}"


def gen_ipv4(rng: random.Random) -> Planted:
    label = rng.choice(["public", "private-10", "private-192", "private-172", "doc-range", "edge-octets"])
    if label == "public":
        octets = [rng.choice([23, 45, 81, 104, 151, 185, 212]), *(rng.randint(0, 255) for _ in range(3))]
    elif label == "private-10":
        octets = [10, rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)]
    elif label == "private-192":
        octets = [192, 168, rng.randint(0, 255), rng.randint(1, 254)]
    elif label == "private-172":
        octets = [172, rng.randint(16, 31), rng.randint(0, 255), rng.randint(1, 254)]
    elif label == "doc-range":
        octets = [*rng.choice([[192, 0, 2], [198, 51, 100], [203, 0, 113]]), rng.randint(1, 254)]
    else:
        octets = [rng.choice([1, 9, 99, 200, 250]), rng.choice([0, 255]), rng.choice([0, 255]), 255]
    return ".".join(map(str, octets)), f"ipv4/{label}"


def gen_ipv6(rng: random.Random) -> Planted:
    groups = [rng.randrange(0x10000) for _ in range(8)]
    groups[0] = rng.choice([0x2001, 0x2A02, 0x2600, 0x2C0F])
    label = rng.choice(["full", "compressed", "exploded", "upper", "link-local", "embedded-v4"])
    if label == "embedded-v4":
        v4 = ".".join(str(rng.randint(1, 254)) for _ in range(4))
        return rng.choice([f"::ffff:{v4}", f"64:ff9b::{v4}"]), f"ipv6/{label}"
    if label == "link-local":
        tail = ":".join(f"{g:x}" for g in groups[4:])
        return f"fe80::{tail}", f"ipv6/{label}"
    if label in ("compressed", "upper"):
        start = rng.randint(2, 5)
        groups[start : start + 2] = [0, 0]
    address = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
    text = {
        "full": ":".join(f"{g:x}" for g in groups),
        "compressed": address.compressed,
        "exploded": address.exploded,
        "upper": address.compressed.upper(),
    }[label]
    return text, f"ipv6/{label}"


def gen_ip(rng: random.Random) -> Planted:
    return gen_ipv4(rng) if rng.random() < 0.55 else gen_ipv6(rng)


def gen_phone(rng: random.Random) -> Planted:
    def d(n: int) -> str:
        return _digits(rng, n)

    npa, nxx = f"{rng.randint(2, 9)}{d(2)}", f"{rng.randint(2, 9)}{d(2)}"
    formats = {
        "us/parens": f"({npa}) {nxx}-{d(4)}",
        "us/dashes": f"{npa}-{nxx}-{d(4)}",
        "us/dots": f"{npa}.{nxx}.{d(4)}",
        "us/e164": f"+1{npa}{nxx}{d(4)}",
        "us/intl-spaces": f"+1 {npa} {nxx} {d(4)}",
        "us/1-dashes": f"1-{npa}-{nxx}-{d(4)}",
        "us/1-parens": f"1 ({npa}) {nxx}-{d(4)}",
        "uk/intl-london": f"+44 20 {rng.randint(3, 8)}{d(3)} {d(4)}",
        "uk/intl-manchester": f"+44 161 {d(3)} {d(4)}",
        "uk/national-mobile": f"07{d(3)} {d(6)}",
        "uk/national-parens": f"(0161) {d(3)} {d(4)}",
        "uk/intl-trunk": f"+44 (0)161 {d(3)} {d(4)}",
        "de/intl-munich": f"+49 89 {d(8)}",
        "de/national-slash": f"089/{d(7)}",
        "de/national-mobile": f"0{rng.choice(['151', '171', '176'])} {d(7)}",
        "de/national-dash": f"030-{d(8)}",
        "fr/national-spaces": f"0{rng.randint(1, 5)} {d(2)} {d(2)} {d(2)} {d(2)}",
        "fr/national-dots": f"06.{d(2)}.{d(2)}.{d(2)}.{d(2)}",
        "fr/intl": f"+33 {rng.randint(1, 7)} {d(2)} {d(2)} {d(2)} {d(2)}",
        "au/intl": f"+61 2 {d(4)} {d(4)}",
        "au/national-parens": f"(02) {d(4)} {d(4)}",
        "in/intl-mobile": f"+91 {rng.randint(7, 9)}{d(4)} {d(5)}",
        "in/intl-dashes": f"+91-{rng.randint(7, 9)}{d(4)}-{d(5)}",
        "jp/intl": f"+81 3-{d(4)}-{d(4)}",
        "jp/national": f"03-{d(4)}-{d(4)}",
        "br/intl-mobile": f"+55 11 9{d(4)}-{d(4)}",
        "it/intl": f"+39 02 {d(4)} {d(4)}",
        "nl/national": f"020-{d(3)} {d(4)}",
        "ch/intl": f"+41 {rng.choice(['44', '22', '79'])} {d(3)} {d(2)} {d(2)}",
        "de/intl-trunk": f"+49 (0)89 {d(4)} {d(4)}",
        "de/intl-00": f"0049 89 {d(8)}",
        "uk/intl-00": f"0044 20 {rng.randint(3, 8)}{d(3)} {d(4)}",
        "uk/parens-cc": f"(+44) 20 {rng.randint(3, 8)}{d(3)} {d(4)}",
        "us/intl-dots": f"+1.{npa}.{nxx}.{d(4)}",
        "us/spaces": f"{npa} {nxx} {d(4)}",
        "us/parens-tight": f"({npa}){nxx}-{d(4)}",
        "ru/intl": f"+7 495 {d(3)}-{d(2)}-{d(2)}",
        "cn/intl-mobile": f"+86 138 {d(4)} {d(4)}",
        "ie/intl": f"+353 1 {d(3)} {d(4)}",
        "se/intl": f"+46 8 {d(3)} {d(3)} {d(2)}",
        "cz/intl": f"+420 {rng.randint(2, 7)}{d(2)} {d(3)} {d(3)}",
    }
    label = rng.choice(sorted(formats))
    return formats[label], f"phone/{label}"


# (brand, prefixes, length, grouping when spaced or dashed)
CARD_BRANDS: list[tuple[str, list[str], int, list[int]]] = [
    ("visa16", ["4"], 16, [4, 4, 4, 4]),
    ("visa13", ["4"], 13, [4, 4, 4, 1]),
    ("mastercard", ["51", "52", "53", "54", "55"], 16, [4, 4, 4, 4]),
    ("mastercard-2series", ["2221", "2500", "2720"], 16, [4, 4, 4, 4]),
    ("amex", ["34", "37"], 15, [4, 6, 5]),
    ("discover", ["6011", "644", "65"], 16, [4, 4, 4, 4]),
    ("diners", ["300", "305", "36", "38"], 14, [4, 6, 4]),
    ("jcb", ["3528", "3589"], 16, [4, 4, 4, 4]),
    ("unionpay", ["62"], 16, [4, 4, 4, 4]),
    ("maestro19", ["6759", "5018"], 19, [4, 4, 4, 4, 3]),
]


def _card_digits(rng: random.Random) -> tuple[str, str, list[int]]:
    brand, prefixes, length, groups = rng.choice(CARD_BRANDS)
    payload = rng.choice(prefixes)
    payload += _digits(rng, length - 1 - len(payload))
    return brand, payload + luhn_check_digit(payload), groups


def _grouped(digits: str, groups: list[int], sep: str) -> str:
    out, pos = [], 0
    for size in groups:
        out.append(digits[pos : pos + size])
        pos += size
    return sep.join(out)


def _format_card(rng: random.Random, digits: str, groups: list[int]) -> tuple[str, str]:
    style = rng.choice(["compact", "spaces", "dashes"])
    if style == "compact":
        return digits, style
    return _grouped(digits, groups, " " if style == "spaces" else "-"), style


def gen_card(rng: random.Random) -> Planted:
    brand, digits, groups = _card_digits(rng)
    assert luhn_ok(digits)
    text, style = _format_card(rng, digits, groups)
    return text, f"card/{brand}/{style}"


IBAN_COUNTRIES: dict[str, int] = {
    "DE": 22, "FR": 27, "GB": 22, "ES": 24, "IT": 27, "NL": 18, "BE": 16, "CH": 21, "AT": 20,
    "PL": 28, "SE": 24, "NO": 15, "PT": 25, "IE": 22, "DK": 18, "FI": 18, "LU": 20, "SA": 24,
    "BR": 29, "TR": 26, "MT": 31, "CY": 28, "GR": 27, "HR": 21, "RO": 24,
}  # fmt: skip
# BBANs that open with letters (bank codes, national check letters); the rest are digits.
_BBAN_LETTERS = {"GB": 4, "IE": 4, "NL": 4, "MT": 4, "RO": 4, "IT": 1}


def _bban(rng: random.Random, country: str) -> str:
    n = IBAN_COUNTRIES[country] - 4
    letters = _BBAN_LETTERS.get(country, 0)
    head = "".join(rng.choice(string.ascii_uppercase) for _ in range(letters))
    if country == "FR":  # RIB key letters are rare; a mixed tail like '...3M02606' happens
        return _digits(rng, n - 6) + rng.choice(string.ascii_uppercase) + _digits(rng, 5)
    return head + _digits(rng, n - letters)


def _format_iban(rng: random.Random, compact: str) -> tuple[str, str]:
    if rng.random() < 0.5:
        return compact, "compact"
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4)), "grouped"


def gen_iban(rng: random.Random) -> Planted:
    country = rng.choice(sorted(IBAN_COUNTRIES))
    bban = _bban(rng, country)
    iban = country + iban_check_digits(country, bban) + bban
    assert iban_mod97(iban) == 1 and len(iban) == IBAN_COUNTRIES[country]
    text, style = _format_iban(rng, iban)
    return text, f"iban/{country}/{style}"


URL_SCHEMES = [
    "https", "http", "ftp", "sftp", "ssh", "postgresql", "postgres", "mysql", "mariadb", "redis",
    "rediss", "mongodb", "mongodb+srv", "amqp", "amqps", "smtp", "ldap",
]  # fmt: skip
URL_HOSTS = [
    "db-primary.internal.example.com",
    "192.168.10.20",
    "cache.eu-west-1.example.net",
    "localhost",
    "broker",
    "ftp.example.org",
    "cluster0.ab12c.example.net",
]
URL_PATHS = [
    "",
    "",
    "/",
    "/prod",
    "/0",
    "/analytics?sslmode=verify-full",
    "/pub/data.tar.gz",
    "/vhost",
    "#main",
]


def gen_url_credentials(rng: random.Random) -> Planted:
    scheme = rng.choice(URL_SCHEMES)
    user = rng.choice(["admin", "root", "deploy", "svc-reports", rng.choice(FIRST), "user%40corp"])
    label = "user-password"
    if scheme.startswith("redis") and rng.random() < 0.5:
        user, label = "", "password-only"
    alphabet = string.ascii_letters + string.digits + "!$*_-~."
    password = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 20)))
    if rng.random() < 0.2:
        password += rng.choice(["%40", "%23", "%2F"]) + _digits(rng, 2)
        label += "+percent"
    host = rng.choice(URL_HOSTS)
    port = rng.choice(["", "", f":{rng.choice([5432, 3306, 6379, 27017, 5672, 21, 22, 8443])}"])
    path = rng.choice(URL_PATHS)
    return f"{scheme}://{user}:{password}@{host}{port}{path}", f"url/{scheme}/{label}"


GENERATORS: dict[str, Callable[[random.Random], Planted]] = {
    "email": gen_email,
    "ip_address": gen_ip,
    "phone": gen_phone,
    "credit_card": gen_card,
    "iban": gen_iban,
    "url_credentials": gen_url_credentials,
}

# --------------------------------------------------------------------------------------------
# Sentence templates: '{}' is where the planted value goes.
# --------------------------------------------------------------------------------------------

TEMPLATES: dict[str, list[str]] = {
    "email": [
        "If the invoice looks wrong, write to {} and mention the reference.",
        "From: Maria Becker <{}>",
        "Her new address is {}, the old one bounces.",
        "Please add {} to the mailing list (she asked twice).",
        "Contact: mailto:{}",
        "I forwarded the thread to {}; no answer yet.",
        "Sign-ups close Friday — questions go to “{}”.",
        "The reviewer's address, {}, was printed on the cover letter.",
        "Unsubscribe requests: {}.",
        "Is {} still the right address for the editor?",
    ],
    "ip_address": [
        "Failed password for root from {} port 52113 ssh2",
        "The report shows repeated logins from {} during the night.",
        "client={} method=GET path=/login status=401",
        "We whitelisted {} for the staging firewall.",
        "Her laptop picked up the address {} from the café's router.",
        "The abuse desk traced the spam to {}.",
        "Add `{}` to allowed_hosts and restart the service.",
        "Connection reset by peer [{}]",
        "Is {} one of ours, or is it the contractor's VPN?",
        "The proxy is set to {}:3128 on every desktop.",
        "sshd listening on [{}]:22",
    ],
    "phone": [
        "You can reach the clinic on {} between 8 and 6.",
        "Tel.: {}",
        "Call me back at {}, I'm in the office until five.",
        "For urgent repairs ring {} (24 hours).",
        "His mobile number is {}; text rather than call.",
        "Bookings by phone: {} or at the front desk.",
        "The landlord's number, {}, is on the lease.",
        "Fax {} — yes, they still use one.",
        "Numéro de téléphone : {}",
        "Phone {} ext. 214 for the accounts team.",
    ],
    "credit_card": [
        "The card number {} was charged twice for one order.",
        "Card: {}, exp. 09/27",
        "Please refund to the card ending in the digits of {}.",
        "Paid with {} at the hotel desk.",
        "cc_number={}&amount=49.90",
        "Her statement lists the card {} under her husband's name.",
        "{}|09/27|731",
        "Kartennummer: {}",
        "Use the card {} for the conference fees, not the company one.",
    ],
    "iban": [
        "Please transfer the deposit to IBAN {} by Monday.",
        "IBAN: {}",
        "Bank details — account holder Sofia Fernandez, {}.",
        "Refunds are paid to {} within five working days.",
        "The standing order goes to {} every month.",
        "Could you confirm that {} is still your account?",
        "Zahlbar auf das Konto {} bei der Sparkasse.",
        "Beneficiary IBAN {}, reference INV-7781.",
    ],
    "url_credentials": [
        "The nightly export connects with {} and exits.",
        "DATABASE_URL={}",
        'conn = connect("{}")',
        "Somebody pasted {} into the public channel.",
        "  url: {}",
        "Mirror: {}, then unpack the archive.",
        "The old broker string ({}) still works, sadly.",
        "export CACHE_URL='{}'",
    ],
}

FILLER = [
    "The weather held up and the ferry left on time.",
    "We still have not decided where the summer party will be.",
    "Thanks for your patience while we sort this out.",
    "The board approved the budget without further changes.",
    "None of the attached photos open on my phone.",
    "Honestly, the new office is much quieter than the old one.",
    "Lunch is on the second floor today because the canteen is closed.",
    "The draft needs another pass before it goes to the printer.",
    "I'll bring the cables and the projector on Thursday.",
    "Les résultats seront publiés à la fin du mois.",
    "Der Zug nach München hatte wieder Verspätung.",
    "Anyway, let me know what you think about the proposal.",
    "The kids loved the museum, especially the dinosaurs.",
    "Our release notes list every change since the spring.",
]

# --------------------------------------------------------------------------------------------
# Hard negatives: each returns a sentence and the (kind, substring) of the tricky part.
# --------------------------------------------------------------------------------------------


def _bad_luhn_card(rng: random.Random) -> str:
    _, digits, groups = _card_digits(rng)
    bad = digits[:-1] + str((int(digits[-1]) + rng.randint(1, 9)) % 10)
    assert not luhn_ok(bad)
    return _format_card(rng, bad, groups)[0]


def _bad_check_iban(rng: random.Random) -> str:
    country = rng.choice(sorted(IBAN_COUNTRIES))
    bban = _bban(rng, country)
    good = int(iban_check_digits(country, bban))
    iban = f"{country}{rng.choice([c for c in range(2, 99) if c != good]):02d}{bban}"
    assert iban_mod97(iban) != 1
    return _format_iban(rng, iban)[0]


def _ean13(rng: random.Random) -> str:
    payload = rng.choice(["400", "401", "590", "762", "500", "871", "301", "020"]) + _digits(rng, 9)
    return payload + ean13_check_digit(payload)


def _isbn13(rng: random.Random, hyphens: bool) -> str:
    payload = rng.choice(["978", "979"]) + _digits(rng, 9)
    full = payload + isbn13_check_digit(payload)
    if not hyphens:
        return full
    return f"{full[:3]}-{full[3]}-{full[4:7]}-{full[7:12]}-{full[12]}"


def _isbn10(rng: random.Random) -> str:
    payload = _digits(rng, 9)
    return f"{payload[0]}-{payload[1:4]}-{payload[4:9]}-{isbn10_check_digit(payload)}"


def negative(rng: random.Random) -> tuple[str, str, str]:
    """One hard negative: (kind, sentence template, the value that looks like PII but is not)."""

    def d(n: int) -> str:
        return _digits(rng, n)

    y, m, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    h, mi = rng.randint(0, 23), rng.randint(0, 59)
    octet = lambda: str(rng.randint(0, 255))  # noqa: E731
    months = ["Jan.", "March", "June", "Sept.", "November"]
    city, state, zip_head = rng.choice(
        [("Boston", "MA", "02"), ("Newark", "NJ", "07"), ("Springfield", "IL", "62"), ("Austin", "TX", "78")]
    )
    choices: list[tuple[str, str, str]] = [
        ("year", "The firm was founded in {} and listed a decade later.", str(y)),
        ("date-iso", "The hearing is set for {} at the district court.", f"{y}-{m:02d}-{day:02d}"),
        ("date-dotted", "Rechnung vom {}, fällig in 14 Tagen.", f"{day:02d}.{m:02d}.{y}"),
        ("date-us", "Due {} unless extended.", f"{m}/{day}/{y}"),
        ("date-words", "It opened on {}, after two delays.", f"{rng.choice(months)} {day}, {y}"),
        ("time", "Doors open at {} sharp.", f"{h:02d}:{mi:02d}"),
        ("time-seconds", "The backup finished at {} local time.", f"{h:02d}:{mi:02d}:{rng.randint(0, 59):02d}"),
        ("price-usd", "The repair came to {} including parts.", f"${rng.randint(1, 9)},{d(3)}.{d(2)}"),
        ("price-eur", "Das Ticket kostet {} im Vorverkauf.", f"{rng.randint(10, 999)},{d(2)} €"),
        ("price-spaced", "Le devis s'élève à {} TTC.", f"{rng.randint(1, 99)} {d(3)},{d(2)} €"),
        ("isbn13", "The second edition is ISBN {}.", _isbn13(rng, hyphens=True)),
        ("isbn13-bare", "Scan the barcode {} on the back cover.", _isbn13(rng, hyphens=False)),
        ("isbn10", "The out-of-print original is ISBN {}.", _isbn10(rng)),
        ("ean13", "EAN {} is printed under the barcode.", _ean13(rng)),
        ("order-number", "Your order #{} has shipped.", str(rng.randint(10**7, 10**10))),
        ("order-code", "Order no. {} is ready for pickup.", f"ORD-{y}-{d(6)}"),
        ("po-number", "Purchase order {} covers the second batch.", f"45{d(8)}"),
        ("invoice", "Invoice {} is attached.", f"{y}/{d(4)}"),
        ("tracking-ups", "Tracking: {}.", f"1Z{d(3)}AA{d(10)}"),
        ("tracking-usps", "USPS tracking {} shows it in transit.", " ".join(d(4) for _ in range(5)) + f" {d(2)}"),
        ("zip4", f"Mail it to {city}, {state} {{}}.", f"{zip_head}{d(3)}-{d(4)}"),
        ("pages", "See pages {} for the proof.", f"{rng.randint(100, 300)}-{rng.randint(301, 600)}"),
        ("score", "They won {} after extra time.", f"{rng.randint(0, 5)}-{rng.randint(0, 5)}"),
        ("coordinates", "The summit sits at {}.", f"{rng.randint(10, 60)}.{d(4)}, {rng.randint(1, 30)}.{d(4)}"),
        ("population", "The region has {} inhabitants.", f"{rng.randint(1, 9)} {d(3)} {d(3)}"),
        ("product-code", "Replacement part no. {} fits both models.", f"{rng.randint(10, 99)}-{d(4)}-{d(4)}"),
        ("product-code", "Order the filter as SKU {}.", f"{rng.randint(1, 9)}-{d(4)}-{d(4)}-{d(1)}"),
        ("product-code", "Model {} is discontinued.", f"KX-TG{d(4)}"),
        ("product-code", "Catalogue number {} (black, size M).", f"{rng.randint(100, 999)}.{d(3)}.{d(2)}"),
        ("version", "Upgrade to version {} before migrating.", f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}"),
        ("version", "Firmware {} fixes the Wi-Fi drop.", f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}"),
        ("version", "Requires Python {} or newer.", f"3.{rng.randint(8, 13)}.{rng.randint(0, 12)}"),
        ("version", "Build {} was the last stable one.", f"{octet()}.{octet()}.{octet()}.{octet()}.{octet()}"),
        ("version", "It was tagged v{} yesterday.", f"{rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}"),
        ("section", "As required by section {} of the agreement.", f"{rng.randint(1, 9)}.{rng.randint(1, 9)}.{rng.randint(1, 9)}.{rng.randint(1, 9)}"),
        ("oid", "The attribute OID is {}.", f"1.3.6.1.4.1.{rng.randint(100, 60000)}"),
        ("bad-octet", "The bogus address {} was rejected by the parser.", f"{rng.randint(256, 999)}.{octet()}.{octet()}.{octet()}"),
        ("loopback", "The service only listens on {} by default.", rng.choice(["127.0.0.1", "0.0.0.0", "127.0.1.1"])),
        ("bad-luhn", "The test number {} was declined.", _bad_luhn_card(rng)),
        ("bad-iban", "The transfer to {} bounced back.", _bad_check_iban(rng)),
        ("placeholder-card", "Never charge the dummy card {}.", rng.choice(["0000 0000 0000 0000", "1111-1111-1111-1111"])),
        ("local-mailbox", "Cron mails its output to {} on the box.", rng.choice(["root@localhost", "user@localhost", "deploy@buildhost"])),
        ("handle", "Ping {} on chat if the build breaks.", f"@{rng.choice(FIRST)}"),
        ("url-no-password", "Clone it from {} first.", rng.choice(["ssh://git@git.example.com/team/app.git", "https://maria@bitbucket.example.org/team/app.git"])),
        ("url-plain", "The docs live at {}.", f"https://docs.example.com/v{rng.randint(1, 9)}/guide?lang=en#setup"),
        ("url-port", "The health check hits {}.", f"http://localhost:{rng.randint(1024, 9999)}/health"),
        ("mac", "The MAC address {} is on the allow list.", ":".join(f"{rng.randrange(256):02X}" for _ in range(6))),
        ("code-slice", "Reverse it with {} in Python.", "s[::-1]"),
        ("cpp-scope", "It calls {} internally.", "std::chrono::steady_clock"),
        ("measure", "The parcel weighs {}.", f"{rng.randint(1, 30)}.{rng.randint(0, 9)} kg"),
        ("serial", "The serial number is {} according to the label.", d(24)),
        ("sort-code", "Sort code {}, as on the old cheque.", f"{d(2)}-{d(2)}-{d(2)}"),
        ("range-years", "He lived there from {}.", f"{y - 20}–{y}"),
    ]  # fmt: skip
    return rng.choice(choices)


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def build_records(seed: int = SEED, documents: int = DOCUMENTS) -> list[dict[str, object]]:
    """Seeded documents of prose with planted PII and hard negatives at recorded offsets."""
    rng = random.Random(seed)
    counts = rng.choices(list(PLANTED_PER_DOC), weights=list(PLANTED_PER_DOC.values()), k=documents)
    deck = [t for t in TYPES for _ in range(-(-sum(counts) // len(TYPES)))]
    rng.shuffle(deck)
    records: list[dict[str, object]] = []
    for i, n_planted in enumerate(counts):
        # A part is (template, value, type, format) for planted values, (sentence, kind, value) otherwise.
        parts: list[tuple[str, ...]] = []
        for _ in range(n_planted):
            kind = deck.pop()
            value, fmt = GENERATORS[kind](rng)
            templates = TEMPLATES[kind]
            if ":" in value:  # "addr:port" is IPv4 only; IPv6 takes its port in brackets
                templates = [t for t in templates if "{}:" not in t]
            parts.append(("planted", rng.choice(templates), value, kind, fmt))
        for _ in range(rng.choice([1, 1, 2, 3])):
            kind, template, value = negative(rng)
            parts.append(("negative", template, value, kind))
        for _ in range(rng.choice([0, 1, 2])):
            parts.append(("filler", rng.choice(FILLER)))
        rng.shuffle(parts)
        text = ""
        spans: list[dict[str, object]] = []
        negatives: list[dict[str, object]] = []
        ends_with_value = False
        for part in parts:
            if text:
                # Two values side by side ("... 3756 581805 65691 3059 ...") would read as one.
                starts_with_value = part[0] != "filler" and part[1].startswith("{}")
                side_by_side = ends_with_value or starts_with_value
                text += "\n" if side_by_side else rng.choice([" ", " ", "\n", "\n\n"])
            ends_with_value = part[0] != "filler" and part[1].endswith("{}")
            if part[0] == "filler":
                text += part[1]
                continue
            template, value, kind = part[1:4]
            start = len(text) + template.index("{}")
            text += template.format(value)
            assert text[start : start + len(value)] == value, (template, value)
            if part[0] == "planted":
                spans.append({"type": kind, "start": start, "end": start + len(value), "format": part[4]})
            else:
                negatives.append({"kind": kind, "start": start, "end": start + len(value)})
        records.append({"id": f"planted-{i:04d}", "text": text, "spans": spans, "negatives": negatives})
    return records


def dumps(records: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> None:
    records = build_records()
    OUTPUT.write_text(dumps(records), encoding="utf-8")
    n_spans = sum(len(r["spans"]) for r in records)  # type: ignore[arg-type]
    print(f"wrote {len(records)} documents, {n_spans} planted values to {OUTPUT}")


if __name__ == "__main__":
    main()
