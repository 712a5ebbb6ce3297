"""The OpenAI wire format: request bodies (validated with pydantic) and OpenAI-shaped errors.

Only what the server implements is accepted: a field it would silently ignore (logprobs,
tools, non-zero penalties) is refused with a 400 naming it, so a client never gets a different
behaviour from the one it asked for.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request


class APIError(Exception):
    """An error the client gets as ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # "name" and similar annotations change nothing here
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)  # not OpenAI's; vLLM and others accept it too
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Clients send these at their defaults; anything else asks for what this server does not do.
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("at most 4 non-empty stop sequences")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported by this server (only 0)")
        return value

    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False

    def budget(self) -> int | None:
        return self.max_tokens

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server")
        return value


def parse(model: type[BaseModel], body: Any) -> Any:
    """The validated request, or an APIError(400) naming the first offending field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"{where}: not supported by this server"
        else:
            message = f"{where}: {first['msg']}"
        raise APIError(400, message, param=where or None) from None


# --- shared by the server and the router ------------------------------------------------------


def read_keys(path: str, key: str = "api_keys_file", env_var: str | None = "ORCHESTRA_API_KEYS") -> list[str]:
    """Bearer keys: one per line of ``path`` (# comments), else the comma-separated ``env_var``."""
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as err:
            raise ValueError(f"{key}: cannot read {path} ({err.strerror or err})") from None
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise ValueError(f"{key}: {path} holds no key")
        return keys
    if env_var is None:
        return []
    return [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]


def has_key(request: Request, keys: list[str]) -> bool:
    """Whether the Authorization header carries one of ``keys`` (every key compared in constant time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    ok = False
    for key in keys:  # no early exit: the time taken does not tell which key was close
        ok |= hmac.compare_digest(given.strip().encode(), key.encode())
    return scheme.lower() == "bearer" and ok


def check_bearer(request: Request, keys: list[str]) -> None:
    """401 unless no key is configured or the request carries one of ``keys``."""
    if keys and not has_key(request, keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 past ``limit`` bytes (counted, not trusted from the header)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON (400 when it is not), within ``limit`` bytes (413)."""
    raw = await read_body(request, limit)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
