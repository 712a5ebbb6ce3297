"""The one error type of the data pipeline, so CLIs can print it as a single clear line."""

from __future__ import annotations


class DataError(ValueError):
    """A corpus, tokenizer or prepared dataset that cannot be used; the message names the culprit."""
