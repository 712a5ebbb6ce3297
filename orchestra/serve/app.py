"""The OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI).

POST /v1/chat/completions (through the model's chat template) and /v1/completions, streaming
(server-sent events) or not; GET /v1/models, /health, /ready and /metrics. Every error is
OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) with its HTTP status, so
the official clients raise their usual exceptions. docs/serving.md describes the behaviour.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestra.config import ServeConfig
from orchestra.eval.model import EvalModel
from orchestra.serve.engine import (
    Engine,
    EngineStopped,
    Event,
    GenerationSequence,
    QueueFull,
    SamplingParams,
    prompt_ids_for_chat,
)
from orchestra.serve.metrics import ServingMetrics
from orchestra.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_bearer,
    parse,
    read_json,
    read_keys,
)

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Orchestra-Version"


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request falls in a sample of ``rate`` (a hash of its id: the same on every host)."""
    if rate <= 0:
        return False
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


class TextStream:
    """Tokens of one choice to text deltas, cut at the first stop sequence.

    Text is held back while it ends in an incomplete UTF-8 character or could be the start of a
    stop sequence, so a client never receives text that a later token takes back.
    """

    def __init__(self, evaluated: EvalModel, stops: list[str]) -> None:
        self.evaluated, self.stops = evaluated, stops
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.evaluated.decode(self.tokens)
        hits = [i for i in (text.find(s, max(0, len(self.sent) - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._advance(text[: min(hits)])
        safe = text.rstrip("\ufffd")
        for stop in self.stops:  # hold back a suffix that may grow into a stop sequence
            for k in range(min(len(stop) - 1, len(safe)), 0, -1):
                if safe.endswith(stop[:k]):
                    safe = safe[:-k]
                    break
        return self._advance(safe)

    def finish(self) -> str:
        """What is left to send when the sequence ends (held-back text, unless a stop cut it)."""
        if self.stopped:
            return ""
        return self._advance(self.evaluated.decode(self.tokens))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


@dataclass
class Choice:
    index: int
    sequence: GenerationSequence
    text: TextStream
    finish_reason: str | None = None


@dataclass
class Job:
    """One request's choices in the engine, with the queue their events arrive on."""

    request_id: str
    prompts: list[list[int]]
    choices: list[Choice]
    events: asyncio.Queue[tuple[int, Event]]
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    prompt_nll: float | None = None

    def cancel(self) -> None:
        for choice in self.choices:
            choice.sequence.cancel()

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.text.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Server:
    """What the endpoints share: the model, the engine, limits, keys, metrics and logs."""

    def __init__(self, cfg: ServeConfig, evaluated: EvalModel, metrics: ServingMetrics | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.evaluated = evaluated
        self.model_name = cfg.model_name or Path(cfg.ckpt.rstrip("/")).stem or "model"
        self.version = cfg.version or self.model_name
        self.metrics = metrics or ServingMetrics()
        self.keys = read_keys(cfg.api_keys_file)
        if not self.keys:
            log.warning(
                "no API key configured (api_keys_file or ORCHESTRA_API_KEYS): anyone can call this server"
            )
        self.engine = Engine(
            evaluated.model,
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            metrics=self.metrics,
            version=self.version,
            model_name=self.model_name,
        )
        self.context = self.engine.context
        self.max_prompt = min(cfg.max_prompt_tokens or self.context - 1, self.context - 1)
        self.shutting_down = False
        self.request_log: Any = None
        if cfg.log_path:
            from orchestra.serve.traffic import RequestLog

            self.request_log = RequestLog(cfg.log_path, cfg.log_sample_rate)  # seed 0: the router's sample
        from orchestra.serve.drift import DriftMonitor

        self.drift = DriftMonitor(cfg.drift_window, registry=self.metrics.registry)
        # Drift and the request log run on one background thread, in request order: language
        # identification and a window's tests would otherwise stall the event loop.
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchestra-monitor")
        self.drift_lock = threading.Lock()

    @property
    def labels(self) -> dict[str, str]:
        return {"version": self.version, "model": self.model_name}

    # -- requests to engine sequences -----------------------------------------------------------

    def params(
        self, req: ChatCompletionRequest | CompletionRequest, prompt_len: int, index: int, score: bool
    ) -> SamplingParams:
        asked = req.budget()
        if asked is not None and asked > self.cfg.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={asked} exceeds this server's limit of {self.cfg.max_tokens_limit}",
                param="max_tokens",
            )
        room = self.context - prompt_len
        if asked is not None and asked > room:
            raise APIError(
                400,
                f"this model's context is {self.context} tokens; the prompt takes {prompt_len} and max_tokens "
                f"asks for {asked} more. Shorten the prompt or lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        budget = asked if asked is not None else min(self.cfg.default_max_tokens, room)
        return SamplingParams(
            max_tokens=budget,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=None if req.seed is None else req.seed + index,
            stop_ids=tuple(self.evaluated.eos_ids),
            score_prompt=score,
        )

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        if len(ids) > self.max_prompt:
            raise APIError(
                400,
                f"this model's maximum prompt length is {self.max_prompt} tokens; the prompt has {len(ids)}",
                param=param,
                code="context_length_exceeded",
            )

    def start_job(self, req: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]]) -> Job:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if req.model != self.model_name:
            raise APIError(
                404, f"The model `{req.model}` does not exist (this server serves `{self.model_name}`).",
                param="model", code="model_not_found",
            )  # fmt: skip
        if req.n > self.cfg.max_n:
            raise APIError(400, f"n={req.n} exceeds this server's limit of {self.cfg.max_n}", param="n")
        prefix = "chatcmpl" if isinstance(req, ChatCompletionRequest) else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        score = sampled(request_id, self.cfg.drift_sample_rate)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        choices = []
        for p, prompt in enumerate(prompts):
            for i in range(req.n):
                index = p * req.n + i

                def deliver(event: Event, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))

                params = self.params(req, len(prompt), index, score and index == 0)
                seq = GenerationSequence(prompt, params, deliver)
                choices.append(Choice(index, seq, TextStream(self.evaluated, req.stops())))
        try:
            self.engine.submit([c.sequence for c in choices])
        except QueueFull as err:
            raise APIError(429, str(err), type="rate_limit_error", code="queue_full") from None
        except EngineStopped as err:
            raise APIError(503, str(err), type="server_error", code="shutting_down") from None
        return Job(request_id, prompts, choices, events)

    async def next_event(self, job: Job, request: Request) -> tuple[int, Event] | None:
        """The next event of the job; None on timeout. Cancels the job when the client is gone."""
        deadline = job.started + self.cfg.request_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return await asyncio.wait_for(job.events.get(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise asyncio.CancelledError("client disconnected") from None

    def apply(self, job: Job, index: int, event: Event) -> str:
        """Advance choice ``index`` by one event; returns its new text."""
        choice = job.choices[index]
        if event.prompt_nll is not None:
            job.prompt_nll = event.prompt_nll
        if choice.finish_reason is not None:
            return ""
        if event.kind == "error":
            job.cancel()
            raise APIError(500, f"generation failed: {event.message}", type="server_error")
        if event.kind == "done":
            choice.finish_reason = "stop" if event.finish_reason == "stop" else "length"
            return choice.text.finish()
        assert event.token is not None
        if job.first_token is None:
            job.first_token = time.monotonic()
        delta = choice.text.add(event.token)
        if choice.text.stopped:
            choice.sequence.cancel()
            choice.finish_reason = "stop"
        return delta

    def timed_out(self, job: Job) -> None:
        """End every unfinished choice at the deadline: "length" with what it has, 504 if nothing came."""
        job.cancel()
        if job.first_token is None:
            raise APIError(
                504, f"no token within request_timeout_s={self.cfg.request_timeout_s}", type="timeout"
            )
        for choice in job.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "length"

    def finished(self, job: Job, endpoint: str, prompt_text: str, extra: dict[str, Any]) -> None:
        """Account a completed job: tokens, drift signals, the sampled request log."""
        usage = job.usage()
        self.metrics.add_tokens(
            **self.labels, prompt=usage["prompt_tokens"], completion=usage["completion_tokens"]
        )
        record = {
            "id": job.request_id,
            "created": time.time(),
            "version": self.version,
            "model": self.model_name,
            "endpoint": endpoint,
            "latency_s": round(time.monotonic() - job.started, 6),
            "usage": usage,
            "finish_reason": job.choices[0].finish_reason,
            # no "text": the log builds it from the redacted parts, so PII at their seam is not missed
            **extra,
        }
        self.background.submit(self._monitor, len(job.prompts[0]), prompt_text, job.prompt_nll, record)

    def _monitor(
        self, prompt_tokens: int, prompt_text: str, prompt_nll: float | None, record: dict[str, Any]
    ) -> None:
        try:
            with self.drift_lock:
                self.drift.observe(
                    version=self.version, prompt_tokens=prompt_tokens, text=prompt_text, prompt_nll=prompt_nll
                )
            if self.request_log is not None:
                self.request_log.maybe_write(record)
        except Exception:  # monitoring never fails a request
            log.exception("drift / request log update failed")

    def drift_snapshot(self) -> dict[str, Any]:
        with self.drift_lock:
            return dict(self.drift.snapshot())


def _chunk(job: Job, model: str, created: int, chat: bool, index: int, text: str, finish: str | None) -> str:
    if chat:
        body: dict[str, Any] = {
            "id": job.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish}],
        }  # fmt: skip
    else:
        body = {
            "id": job.request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}],
        }  # fmt: skip
    return f"data: {json.dumps(body)}\n\n"


def create_app(server: Server) -> FastAPI:
    """The FastAPI app; the engine thread runs for the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        server.shutting_down = True
        await asyncio.to_thread(server.engine.stop, server.cfg.shutdown_grace_s)
        server.background.shutdown(wait=True)

    app = FastAPI(title="Orchestra", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers={VERSION_HEADER: server.version})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if err.status_code == 404 else None
        body = APIError(
            err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=kind
        ).body()
        return JSONResponse(body, status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        body = APIError(500, f"internal error: {type(err).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    app.add_middleware(ObserveRequests, server=server)

    async def begin(request: Request, kind: type[ChatCompletionRequest] | type[CompletionRequest]) -> Any:
        check_bearer(request, server.keys)
        return parse(kind, await read_json(request, server.cfg.max_body_bytes))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = await begin(request, ChatCompletionRequest)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        try:
            ids = prompt_ids_for_chat(server.evaluated, messages)
        except Exception as err:  # a template that cannot render this conversation
            raise APIError(
                400, f"messages: the chat template cannot render them ({err})", param="messages"
            ) from None
        server.check_prompt(ids, "messages")
        job = server.start_job(req, [ids])
        extra = {"messages": messages}
        prompt_text = "\n".join(m["content"] for m in messages)
        return await respond(request, req, job, chat=True, prompt_text=prompt_text, extra=extra)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await begin(request, CompletionRequest)
        raw = req.prompt
        if isinstance(raw, str):
            texts: list[str] = [raw]
        elif raw and all(isinstance(x, str) for x in raw):
            texts = [str(x) for x in raw]
        else:
            texts = []
        vocab = server.evaluated.tokenizer.get_vocab_size(with_added_tokens=True)
        if texts:
            prompts = [server.evaluated.encode(t) for t in texts]
        elif raw and all(isinstance(x, int) for x in raw):
            prompts = [[int(x) for x in raw if isinstance(x, int)]]
        elif raw and all(isinstance(x, list) for x in raw):
            prompts = [[int(t) for t in x] for x in raw if isinstance(x, list)]
        else:
            raise APIError(400, "prompt: give a string, a list of strings or token ids", param="prompt")
        for ids in prompts:
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            server.check_prompt(ids, "prompt")
        job = server.start_job(req, prompts)
        prompt_text = texts[0] if texts else server.evaluated.decode(prompts[0])
        return await respond(
            request, req, job, chat=False, prompt_text=prompt_text, extra={"prompt": prompt_text}
        )

    async def respond(
        request: Request,
        req: ChatCompletionRequest | CompletionRequest,
        job: Job,
        *,
        chat: bool,
        prompt_text: str,
        extra: dict[str, Any],
    ) -> Response:
        created = int(time.time())
        endpoint = request.url.path
        headers = {VERSION_HEADER: server.version}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(
                stream(request, job, req.model, created, chat, include_usage, endpoint, prompt_text, extra),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        try:
            while not job.done:
                got = await server.next_event(job, request)
                if got is None:
                    server.timed_out(job)
                    break
                server.apply(job, *got)
        except BaseException:
            job.cancel()
            raise
        server.finished(job, endpoint, prompt_text, _logged(job, chat, extra))
        choices: list[dict[str, Any]] = []
        for c in job.choices:
            if chat:
                message = {"role": "assistant", "content": c.text.sent}
                choices.append(
                    {"index": c.index, "message": message, "finish_reason": c.finish_reason, "logprobs": None}
                )
            else:
                choices.append(
                    {
                        "index": c.index,
                        "text": c.text.sent,
                        "finish_reason": c.finish_reason,
                        "logprobs": None,
                    }
                )
        body = {
            "id": job.request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": req.model,
            "choices": choices,
            "usage": job.usage(),
            "system_fingerprint": server.version,
        }
        return JSONResponse(body, headers=headers)

    async def stream(
        request: Request,
        job: Job,
        model: str,
        created: int,
        chat: bool,
        include_usage: bool,
        endpoint: str,
        prompt_text: str,
        extra: dict[str, Any],
    ) -> AsyncIterator[str]:
        try:
            if chat:
                for c in job.choices:
                    first = {
                        "id": job.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    }  # fmt: skip
                    yield f"data: {json.dumps(first)}\n\n"
            while not job.done:
                try:
                    got = await server.next_event(job, request)
                    if got is None:
                        server.timed_out(job)
                        for c in job.choices:
                            yield _chunk(job, model, created, chat, c.index, "", c.finish_reason)
                        break
                    index, event = got
                    was_open = job.choices[index].finish_reason is None
                    delta = server.apply(job, index, event)
                except APIError as err:  # after the headers: the error travels as an event
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                finish = job.choices[index].finish_reason
                if delta or (was_open and finish is not None):
                    yield _chunk(job, model, created, chat, index, delta, finish if was_open else None)
            server.finished(job, endpoint, prompt_text, _logged(job, chat, extra))
            if include_usage:
                usage: dict[str, Any] = {
                    "id": job.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model, "choices": [], "usage": job.usage(),
                }  # fmt: skip
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away mid-stream frees its rows at the next step

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_bearer(request, server.keys)
        card = {
            "id": server.model_name, "object": "model", "created": int(time.time()), "owned_by": "orchestra",
            "max_model_len": server.context, "version": server.version,
        }  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]}, headers={VERSION_HEADER: server.version})

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.engine.alive()
        return JSONResponse(
            {"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503
        )

    @app.get("/ready")
    async def ready() -> JSONResponse:
        waiting, running = server.engine.load()
        ok = server.engine.alive() and not server.shutting_down
        body = {"ready": ok, "waiting": waiting, "running": running, "version": server.version}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        data, content_type = server.metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/drift")
    async def drift(request: Request) -> JSONResponse:
        check_bearer(request, server.keys)
        return JSONResponse(server.drift_snapshot())

    return app


class ObserveRequests:
    """ASGI middleware: every /v1/ request's status and latency, up to its last byte (streams too).

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would sit between a streaming
    endpoint and the client's disconnect.
    """

    def __init__(self, app: Any, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = {"code": 500, "done": False}

        async def observed_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._observe(scope["path"], int(status["code"]), started)
                status["done"] = True

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if not status["done"]:  # the client left before the end: counted as 499 (client closed)
                self._observe(scope["path"], 499, started)

    def _observe(self, path: str, code: int, started: float) -> None:
        self.server.metrics.observe_request(
            **self.server.labels, endpoint=path, code=code, latency_s=time.monotonic() - started
        )


def _logged(job: Job, chat: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """The request log's conversation fields: chats end with the assistant's answer (orchestra-eval reads them)."""
    answer = job.choices[0].text.sent
    if chat:
        return {
            "messages": [*extra["messages"], {"role": "assistant", "content": answer}],
            "response": answer,
        }
    return {"prompt": extra["prompt"], "completion": answer}
