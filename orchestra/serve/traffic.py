"""Sampled request/response logging with PII redaction, to a JSONL file that orchestra-eval reads.

A traffic log is how production prompts become an evaluation set: every line is an sft example
the ``generation`` task scores (``messages`` ending with the assistant's answer, or ``prompt`` and
``response``) and carries ``text`` (prompt + answer) for the ``perplexity`` task with
``text_field=text``. Each line also holds the request's metadata (id, created, version, model,
endpoint, latency_s, usage, finish_reason) and ``pii_redacted``, the number of redactions per PII
type.

Sampling hashes the request id, so a server and a router that log the same ids with the same
seed and rate pick the same requests, and a restart does not change which ones. Every string a
user or the model wrote is anonymised (``<EMAIL>``, ``<PHONE>``, ...) before it reaches the disk;
only the fields the server itself sets (id, version, model, ...) are kept verbatim.

The router imports this module, so it stays light: it checks the example format itself rather
than importing the training data stack.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from orchestra.data.pii import anonymize
from orchestra.serve.metrics import is_finite_number

__all__ = ["RequestLog", "RequestLogError", "sample_fraction"]

# Values the server sets, not its users: kept verbatim (a redacted id could not be joined).
_SERVER_FIELDS = frozenset({"id", "created", "version", "model", "endpoint", "finish_reason", "object"})
# Roles of an sft conversation (orchestra.data.tasks.chat.ROLES): other roles cannot be scored.
_ROLES = ("system", "user", "assistant")


class RequestLogError(OSError):
    """The request log cannot be written where it was configured."""


def sample_fraction(request_id: str, seed: int = 0) -> float:
    """The request's place in [0, 1): the same on every host, so samples of the same ids agree."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _redact(value: Any, counts: Counter[str] | None) -> Any:
    """``value`` with every nested string anonymised; redactions are added to ``counts`` if given."""
    if isinstance(value, str):
        text, found = anonymize(value)
        if counts is not None:
            counts.update({kind: n for kind, n in found.items() if n})
        return text
    if isinstance(value, dict):
        return {key: _redact(item, counts) if key != "role" else item for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(item, counts) for item in value]
    return value


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat message in the sft form: text parts joined, ``developer`` read as ``system``.

    The router logs the client's request body as sent; the server has already done the same.
    """
    out = dict(message)
    if out.get("role") == "developer":
        out["role"] = "system"
    content = out.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        out["content"] = "".join(str(p.get("text", "")) for p in content)
    return out


def _nonblank(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _scorable(record: dict[str, Any]) -> bool:
    """Whether orchestra-eval's generation task accepts the record (the sft rules of its loader)."""
    messages = record.get("messages")
    if messages is not None:
        return (
            bool(messages)
            and all(m.get("role") in _ROLES and _nonblank(m.get("content")) for m in messages)
            and messages[-1]["role"] == "assistant"
        )
    return _nonblank(record.get("prompt")) and _nonblank(record.get("response"))


class RequestLog:
    """Appends a deterministic sample of requests, PII redacted, one JSON object per line.

    ``maybe_write`` takes the request's fields: ``id`` (required), the metadata, and either
    ``messages`` (the chat conversation, as OpenAI's API takes it; the answer is appended as an
    assistant turn unless the conversation already ends with it) or ``prompt`` (a completion),
    with the answer in
    ``response`` or ``completion``. ``text`` is derived as prompt + answer when not given. A
    request without a usable answer (an error, an empty or whitespace-only answer, a turn of a
    role or content the eval cannot read) is not written: every line must stay scorable, and
    failures are counted by the metrics. Safe to call from several threads.
    """

    def __init__(self, path: str | Path, sample_rate: float, seed: int = 0) -> None:
        if not is_finite_number(sample_rate):
            raise ValueError(f"sample_rate must be a number in [0, 1], got {sample_rate!r}")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        self.path = Path(path)
        self.sample_rate = float(sample_rate)
        self.seed = seed
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: TextIO = self.path.open("a", encoding="utf-8")
        except OSError as err:
            reason = err.strerror or str(err)
            raise RequestLogError(f"request log {self.path}: cannot write there ({reason})") from None

    def sampled(self, request_id: str) -> bool:
        """Whether this request id falls in the log's sample."""
        return sample_fraction(request_id, self.seed) < self.sample_rate

    def maybe_write(self, record: dict[str, Any]) -> bool:
        """Write the record if its id is sampled and it holds a scorable answer; True when written."""
        request_id = record.get("id") if isinstance(record, dict) else None
        if not (isinstance(request_id, str) and request_id.strip()):
            raise ValueError(f"request log record needs a non-empty string 'id', got {request_id!r}")
        if not self.sampled(request_id):
            return False
        line = self._line(request_id, record)
        if line is None:
            return False
        with self._lock:
            if self._file.closed:
                raise RequestLogError(f"request log {self.path}: already closed")
            self._file.write(line)
            self._file.flush()
        return True

    def _line(self, request_id: str, record: dict[str, Any]) -> str | None:
        counts: Counter[str] = Counter()
        out: dict[str, Any] = {}
        chat = "messages" in record
        answer_key = "response" if "response" in record else "completion"
        answer = record.get(answer_key)
        for key, value in record.items():
            if key == "messages" and isinstance(value, list):
                value = [_plain_message(m) if isinstance(m, dict) else m for m in value]
            if key in _SERVER_FIELDS:
                out[key] = value
            elif key == "text" or (key in ("response", "completion") and (chat or key != answer_key)):
                # Copies of text counted elsewhere: redacted, but not counted twice.
                out[key] = _redact(value, None)
            else:
                out[key] = _redact(value, counts)
        if chat:
            messages = out["messages"]
            if not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
                raise ValueError(
                    f"request log record {request_id}: 'messages' must be a list of {{'role', 'content'}} objects"
                )
            if isinstance(answer, str) and not (messages and messages[-1].get("role") == "assistant"):
                messages.append({"role": "assistant", "content": _redact(answer, counts)})
            contents = [m.get("content") for m in messages]
            default_text = "\n".join(c for c in contents if isinstance(c, str))
        else:
            if "response" not in out and isinstance(answer, str):
                out["response"] = _redact(answer, None)
            prompt, response = out.get("prompt"), out.get("response")
            default_text = (prompt if isinstance(prompt, str) else "") + (
                response if isinstance(response, str) else ""
            )
        if not _scorable(out):
            return None
        out.setdefault("created", time.time())
        out.setdefault("text", default_text)
        out["pii_redacted"] = dict(sorted(counts.items()))
        try:
            return json.dumps(out, ensure_ascii=False) + "\n"
        except (TypeError, ValueError) as err:
            raise ValueError(f"request log record {request_id}: not JSON serialisable ({err})") from None

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
