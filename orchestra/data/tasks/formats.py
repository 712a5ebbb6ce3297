"""The jsonl layer shared by every task file: records with their ``file:line``, checked text fields.

A bad record is refused with one :class:`DataError` naming ``file:line`` and what is wrong;
nothing is ever written next to the user's files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# The label of a position that takes no loss (the prompt, system and user turns, padding): the
# one the model's loss skips, defined once beside the model's config.
from orchestra.config import IGNORE_INDEX as IGNORE_INDEX
from orchestra.data.errors import DataError
from orchestra.data.sources import jsonl_records


def read_records(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, record) for every non-blank line; a file with none is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: does not exist (expected a jsonl file of examples)")
    count = 0
    for where, record in jsonl_records(path):
        count += 1
        yield where, record
    if count == 0:
        raise DataError(f"{path}: no examples (the file is empty)")


def text_field(record: Mapping[str, Any], key: str, where: str, expected: str) -> str:
    """``record[key]`` as a non-blank string; ``expected`` (the record's form) goes in the error."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (found {sorted(record)}; expected {expected})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value
