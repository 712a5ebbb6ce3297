"""A small real OpenAI-shaped server standing in for one model version behind the router.

Every answer says which version wrote it ("answer from v1"), so a test sees where the router
sent a request. It records what it received, can be slowed down, and answers the usual
OpenAI errors (unknown model 404, max_tokens too large 400, a non-OpenAI 500 for model
"crash"). The router tests only need its URL, so any other server (ours, vLLM) can stand in.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

MAX_TOKENS = 100


@dataclass
class Upstream:
    name: str
    models: tuple[str, ...] = ("tiny",)
    delay_s: float = 0.0
    """Wait before answering (the whole answer, or the first event of a stream)."""
    chunk_gap_s: float = 0.0
    """Wait between the events of a stream."""
    key: str | None = None
    """Bearer key it requires; None: none."""
    received: list[dict[str, Any]] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [r["body"]["messages"][-1]["content"] for r in self.received if "messages" in r["body"]]


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def upstream_app(up: Upstream) -> FastAPI:
    app = FastAPI()
    headers = {"X-Orchestra-Version": up.name}

    def check(request: Request) -> Response | None:
        if up.key is not None and request.headers.get("authorization") != f"Bearer {up.key}":
            return error(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    async def answer(request: Request, chat: bool) -> Response:
        refused = check(request)
        if refused is not None:
            return refused
        body = await request.json()
        up.received.append({"path": request.url.path, "body": body, "headers": dict(request.headers)})
        if up.delay_s:
            await asyncio.sleep(up.delay_s)
        model = body.get("model")
        if model == "crash":
            return PlainTextResponse("Internal Server Error", status_code=500)
        if model not in up.models:
            return error(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        if body.get("max_tokens", 16) > MAX_TOKENS:
            return error(400, f"max_tokens must be at most {MAX_TOKENS}", param="max_tokens")
        words = ["answer", " from", f" {up.name}"]
        prefix = "chatcmpl" if chat else "cmpl"
        rid = f"{prefix}-{up.name}-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)
            events = stream_events(rid, created, model, words, chat, usage if include_usage else None)
            return StreamingResponse(
                paced(events, up.chunk_gap_s), media_type="text/event-stream", headers=headers
            )
        text = "".join(words)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            kind = "text_completion"
        document = {
            "id": rid,
            "object": kind,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
        return JSONResponse(document, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await answer(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        refused = check(request)
        if refused is not None:
            return refused
        data = [{"id": m, "object": "model", "created": 0, "owned_by": up.name} for m in up.models]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def stream_events(
    rid: str, created: int, model: str, words: list[str], chat: bool, usage: dict[str, int] | None
) -> list[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
        chunk = {
            "id": rid,
            "object": kind,
            "created": created,
            "model": model,
            "choices": choices,
            **(extra or {}),
        }
        return f"data: {json.dumps(chunk)}\n\n"

    out = []
    if chat:
        out.append(
            event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        )
    for i, word in enumerate(words):
        finish = "stop" if i == len(words) - 1 else None
        part = {"delta": {"content": word}} if chat else {"text": word}
        out.append(event([{"index": 0, **part, "finish_reason": finish}]))
    if usage is not None:
        out.append(event([], {"usage": usage}))
    out.append("data: [DONE]\n\n")
    return out


async def paced(events: list[str], gap_s: float) -> AsyncIterator[bytes]:
    for i, text in enumerate(events):
        if i and gap_s:
            await asyncio.sleep(gap_s)
        yield text.encode()
