"""The A/B router (`orchestra-route`): one OpenAI-compatible endpoint in front of several model versions.

Each user is kept on one version (a hash of their id against the table's cumulative weights),
shadow versions get a copy of the traffic whose answers are never returned, and user feedback
on answers feeds always-valid sequential comparisons of every version against the control
(orchestra/serve/sequential.py), so the dashboard may be read at any time without inflating the
error rate. The routing table is a YAML file re-read on POST /admin/reload or SIGHUP; POST
/admin/weights rewrites it (promote, roll back) without a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import httpx
import numpy as np
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestra.config import RouteConfig
from orchestra.io import atomic_write_text
from orchestra.serve.dashboard import add_dashboard
from orchestra.serve.metrics import ServingMetrics
from orchestra.serve.protocol import APIError, has_key, read_body, read_json, read_keys
from orchestra.serve.sequential import ArmStats, SequentialComparison, mean_confidence_sequence
from orchestra.serve.traffic import RequestLog

__all__ = [
    "USER_HEADER",
    "VERSION_HEADER",
    "Router",
    "RoutingTable",
    "RoutingTableError",
    "StateError",
    "Version",
    "create_router_app",
    "load_table",
    "user_bucket",
]

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Orchestra-Version"
USER_HEADER = "X-User-Id"
PROXIED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
LATENCY_RESERVOIR = 2048
"""Latencies kept per version for p50/p95: a uniform sample of all requests, bounded in memory."""
MAX_SHADOW_IN_FLIGHT = 64
"""Mirrored requests in flight at once; more are dropped (counted) so a slow shadow cannot
take the connection pool the answers to clients need."""
SAVE_INTERVAL_S = 2.0
"""How often changed comparison state is written to state_path (and once more on shutdown)."""
READY_TIMEOUT_S = 2.0
"""How long /ready waits for a version's /health."""
METRICS: dict[str, dict[str, Any]] = {
    "score": {"higher_is_better": True, "binary": False, "bounds": (0.0, 1.0)},
    "thumbs": {"higher_is_better": True, "binary": True},
    "latency": {"higher_is_better": False, "binary": False},
}
"""What is compared against the control: mean feedback score, thumbs-up rate, latency of answers."""
Metric = Literal["score", "thumbs", "latency"]
UNROUTED = "unrouted"
"""The version label of requests refused before a version was chosen (a bad key, body or forced version)."""


# --- the routing table ----------------------------------------------------------------------------------


class RoutingTableError(ValueError):
    """The routing table cannot be used; the message names the file and the entry."""


class StateError(ValueError):
    """The saved comparison state cannot be read; the message names the file and the field."""


@dataclass(frozen=True)
class Version:
    name: str
    url: str
    """Base URL, without a trailing slash (the router appends /v1/...)."""
    weight: float = 0.0
    shadow: bool = False


def user_bucket(user_id: str) -> float:
    """The user's fixed place in [0, 1): the first 8 bytes of sha256(user id)."""
    return int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class RoutingTable:
    path: str
    versions: tuple[Version, ...]

    @property
    def primaries(self) -> tuple[Version, ...]:
        """Versions that answer clients (the shadows only receive copies)."""
        return tuple(v for v in self.versions if not v.shadow)

    @property
    def shadows(self) -> tuple[Version, ...]:
        return tuple(v for v in self.versions if v.shadow)

    def get(self, name: str) -> Version | None:
        return next((v for v in self.versions if v.name == name), None)

    def weight_share(self, version: Version) -> float:
        """The version's configured fraction of traffic (0 for shadows)."""
        if version.shadow:
            return 0.0
        return version.weight / sum(v.weight for v in self.primaries)

    def pick(self, u: float) -> Version:
        """The primary version whose interval of the cumulative weights holds u in [0, 1).

        Versions keep their order in the table, so changing weights moves only the users whose
        place falls between the old and the new interval ends.
        """
        total = sum(v.weight for v in self.primaries)
        edge = 0.0
        candidates = [v for v in self.primaries if v.weight > 0]
        for version in candidates:
            edge += version.weight / total
            if u < edge:
                return version
        return candidates[-1]  # u within rounding of 1

    def assign(self, user_id: str) -> Version:
        return self.pick(user_bucket(user_id))


_ENTRY_KEYS = {"name", "url", "weight", "shadow"}


def parse_table(data: Any, path: str) -> RoutingTable:
    """Validate a routing table read from ``path``; raises RoutingTableError naming the file and entry."""

    def bad(message: str) -> RoutingTableError:
        return RoutingTableError(f"routing table {path}: {message}")

    if not isinstance(data, dict) or not isinstance(data.get("versions"), list):
        raise bad("expected a mapping with a list under 'versions'")
    if set(data) != {"versions"}:
        raise bad(f"unknown top-level keys {sorted(set(data) - {'versions'})} (only 'versions' is read)")
    versions: list[Version] = []
    for i, entry in enumerate(data["versions"]):
        where = f"versions[{i}]"
        if not isinstance(entry, dict):
            raise bad(f"{where}: expected a mapping with name, url, weight (and shadow), got {entry!r}")
        name = entry.get("name")
        if not (isinstance(name, str) and name.strip()):
            raise bad(f"{where}: 'name' must be a non-empty string, got {name!r}")
        where = f"{where} ({name})"
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise bad(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_ENTRY_KEYS)})")
        if any(v.name == name for v in versions):
            raise bad(f"{where}: the name {name!r} is used twice")
        if name == UNROUTED:
            raise bad(f"{where}: {UNROUTED!r} labels refused requests in the metrics; pick another name")
        url = entry.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise bad(f"{where}: 'url' must be an http(s) URL such as http://127.0.0.1:8001, got {url!r}")
        if parts.query or parts.fragment:
            raise bad(f"{where}: 'url' must be a base URL without query or fragment, got {url!r}")
        shadow = entry.get("shadow", False)
        if not isinstance(shadow, bool):
            raise bad(f"{where}: 'shadow' must be true or false, got {shadow!r}")
        weight = entry.get("weight", 0.0 if shadow else None)
        if weight is None:
            raise bad(f"{where}: 'weight' is missing (a number >= 0; or mark it 'shadow: true')")
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)):
            raise bad(f"{where}: 'weight' must be a number >= 0, got {weight!r}")
        if weight < 0:
            raise bad(f"{where}: 'weight' must be >= 0, got {weight}")
        if shadow and weight != 0:
            raise bad(
                f"{where}: a shadow version gets no share of the answers; drop its weight (got {weight})"
            )
        versions.append(Version(name=name, url=str(url).rstrip("/"), weight=float(weight), shadow=shadow))
    primaries = [v for v in versions if not v.shadow]
    if not primaries:
        raise bad("no version answers clients: every entry is a shadow (or the list is empty)")
    if sum(v.weight for v in primaries) <= 0:
        raise bad(f"the weights of the non-shadow versions {[v.name for v in primaries]} sum to 0")
    return RoutingTable(path=path, versions=tuple(versions))


def load_table(path: str) -> RoutingTable:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise RoutingTableError(f"routing table {path}: cannot read it ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RoutingTableError(f"routing table {path}: not valid YAML ({err})") from None
    return parse_table(data, path)


def table_yaml(table: RoutingTable) -> str:
    entries: list[dict[str, Any]] = []
    for v in table.versions:
        entry: dict[str, Any] = {"name": v.name, "url": v.url}
        if v.shadow:
            entry["shadow"] = True
        else:
            entry["weight"] = v.weight
        entries.append(entry)
    return yaml.safe_dump({"versions": entries}, sort_keys=False)


# --- per-version bookkeeping ------------------------------------------------------------------------------


class Reservoir:
    """A uniform sample of at most ``size`` values of a stream (Vitter's algorithm R)."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng
        self.seen = 0
        self.values: list[float] = []

    def add(self, x: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(x)
            return
        slot = self.rng.randrange(self.seen)
        if slot < self.size:
            self.values[slot] = x

    def quantile(self, q: float) -> float | None:
        return float(np.quantile(self.values, q)) if self.values else None


@dataclass
class VersionStats:
    requests: int = 0
    """Answered requests (mirrored ones for a shadow version), errors included."""
    errors: int = 0
    """The version's failures: status >= 500, unreachable, timed out."""
    shadow_dropped: int = 0
    """Copies not sent because MAX_SHADOW_IN_FLIGHT were already in flight."""
    feedback: dict[str, ArmStats] = field(default_factory=lambda: {m: ArmStats() for m in METRICS})


@dataclass
class Tracked:
    """What the router remembers of one answer, for the feedback that may follow."""

    version: str
    user: str | None
    created: float
    latency_s: float | None = None
    rated: set[str] = field(default_factory=set)


class Experiment:
    """Per-version totals and, for every version other than the control, one comparison per metric."""

    def __init__(self, cfg: RouteConfig, table: RoutingTable, control: str, seed: int | None = None) -> None:
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.control = control
        self.stats: dict[str, VersionStats] = {}
        self.latency: dict[str, Reservoir] = {}
        self.comparisons: dict[str, dict[str, SequentialComparison]] = {}
        self.dirty = False
        self.retable(table, control)

    def _comparison(self, metric: str) -> SequentialComparison:
        return SequentialComparison(alpha=self.cfg.alpha, min_samples=self.cfg.min_samples, **METRICS[metric])

    def retable(self, table: RoutingTable, control: str) -> None:
        """Follow a new table: new versions get fresh comparisons; a new control restarts them all."""
        if control != self.control:
            log.warning("control changed from %s to %s: the comparisons start afresh", self.control, control)
            self.comparisons = {}
            self.control = control
        names = {v.name for v in table.versions}
        for name in names:
            self.stats.setdefault(name, VersionStats())
            self.latency.setdefault(name, Reservoir(LATENCY_RESERVOIR, self.rng))
        self.comparisons = {k: c for k, c in self.comparisons.items() if k in names}
        for name in names - {control}:
            self.comparisons.setdefault(name, {m: self._comparison(m) for m in METRICS})
        self.dirty = True

    def observe(self, version: str, metric: Metric, x: float) -> None:
        """One observation of ``metric`` for ``version``: its totals, and the comparisons it is part of."""
        stats = self.stats.get(version)
        if stats is None:  # a version dropped from the table since it answered
            return
        stats.feedback[metric].add(x)
        if version == self.control:
            for comparisons in self.comparisons.values():
                comparisons[metric].add("control", x)
        elif version in self.comparisons:
            self.comparisons[version][metric].add("treatment", x)
        self.dirty = True

    def answered(self, version: str, code: int, latency_s: float) -> None:
        stats = self.stats.get(version)
        if stats is None:
            return
        stats.requests += 1
        if code >= 500:
            stats.errors += 1
        elif 200 <= code < 300:
            self.latency[version].add(latency_s)
            self.observe(version, "latency", latency_s)
        self.dirty = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "control": self.control,
            "versions": {
                name: {
                    "requests": s.requests,
                    "errors": s.errors,
                    "feedback": {m: a.to_dict() for m, a in s.feedback.items()},
                }
                for name, s in self.stats.items()
            },
            "comparisons": {
                name: {m: c.to_dict() for m, c in comparisons.items()}
                for name, comparisons in self.comparisons.items()
            },
        }

    def restore(self, data: Any, path: str) -> None:
        """Take back saved totals and comparisons (those of versions still in the table)."""
        if not isinstance(data, dict) or not isinstance(data.get("versions"), dict):
            raise StateError(f"state_path {path}: expected an object with 'versions' and 'comparisons'")
        try:
            for name, saved in data["versions"].items():
                if name not in self.stats:
                    continue
                where = f"versions.{name}"
                if not isinstance(saved, dict):
                    raise ValueError(f"{where}: expected an object")
                stats = self.stats[name]
                for key in ("requests", "errors"):
                    value = saved.get(key, 0)
                    if not (isinstance(value, int) and value >= 0):
                        raise ValueError(f"{where}.{key}: expected an integer >= 0, got {value!r}")
                    setattr(stats, key, value)
                feedback = saved.get("feedback", {})
                for metric in METRICS:
                    if metric in feedback:
                        stats.feedback[metric] = ArmStats.from_dict(
                            feedback[metric], f"{where}.feedback.{metric}"
                        )
            if data.get("control") != self.control:
                log.warning(
                    "state_path %s compared against %r, the control is now %r: the comparisons start afresh",
                    path,
                    data.get("control"),
                    self.control,
                )
                return
            comparisons = data.get("comparisons", {})
            if not isinstance(comparisons, dict):
                raise ValueError("comparisons: expected an object")
            for name, saved in comparisons.items():
                if name not in self.comparisons or not isinstance(saved, dict):
                    continue
                for metric in METRICS:
                    if metric in saved:
                        self.comparisons[name][metric] = SequentialComparison.from_dict(
                            saved[metric], f"comparisons.{name}.{metric}"
                        )
        except ValueError as err:
            raise StateError(f"state_path {path}: {err}") from None


# --- errors and authentication ----------------------------------------------------------------------------


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    version: str | None = None,
) -> JSONResponse:
    headers = {VERSION_HEADER: version} if version else None
    body = APIError(status, message, type=type, param=param, code=code).body()
    return JSONResponse(body, status_code=status, headers=headers)


def upstream_error_body(content: bytes, status: int, version: str) -> bytes:
    """The version's error body as it is when OpenAI-shaped, else wrapped into that shape."""
    with suppress(ValueError):
        data = json.loads(content)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return content
    text = content.decode("utf-8", "replace").strip()[:500]
    kind = "server_error" if status >= 500 else "invalid_request_error"
    message = f"version {version} answered HTTP {status}" + (f": {text}" if text else "")
    return json.dumps(APIError(status, message, type=kind).body()).encode()


# --- what is learnt from an answer ------------------------------------------------------------------------


@dataclass
class Answer:
    """Fields of an answer (whole or streamed) the router needs: id, usage, finish reason, text."""

    id: str | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)
    streamed: bool = False
    first_token_at: float | None = None
    """When the first text of a streamed answer went by (a whole answer has no first token)."""
    error: dict[str, Any] | None = None

    def read(self, data: Any, keep_text: bool) -> None:
        if not isinstance(data, dict):
            return
        if self.id is None and isinstance(data.get("id"), str):
            self.id = data["id"]
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        if isinstance(data.get("error"), dict):
            self.error = data["error"]
        choices = data.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # the first choice is the one logged
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
            part = choice.get("delta") or choice.get("message") or {}
            text = part.get("content") if isinstance(part, dict) else None
            if text is None:
                text = choice.get("text")
            if isinstance(text, str) and text:
                if self.streamed and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                if keep_text:
                    self.text.append(text)


class EventWatcher:
    """Reads the server-sent events going by (the bytes themselves are relayed untouched)."""

    def __init__(self, answer: Answer, keep_text: bool) -> None:
        self.answer, self.keep_text = answer, keep_text
        self.buffer = b""

    def feed(self, chunk: bytes) -> None:
        self.buffer = (self.buffer + chunk).replace(b"\r\n", b"\n")
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                with suppress(ValueError):
                    self.answer.read(json.loads(payload), self.keep_text)


@dataclass
class Call:
    """One routed request, from its arrival to its last byte."""

    version: str
    model: str
    endpoint: str
    started: float
    body: Mapping[str, Any]
    user: str | None
    answer: Answer = field(default_factory=Answer)


# --- the router -------------------------------------------------------------------------------------------


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    score: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    thumbs: Literal["up", "down"] | None = None

    @model_validator(mode="after")
    def _score_or_thumbs(self) -> FeedbackBody:
        if self.score is None and self.thumbs is None:
            raise ValueError("give a 'score' in [0, 1] or 'thumbs': 'up' | 'down'")
        return self


class WeightsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, float]


def parse_body(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"] if param is None else f"{param}: {first['msg']}"
        raise APIError(400, message, param=param) from None


class Router:
    """The routing table, the shared upstream client and everything the router counts."""

    def __init__(
        self, cfg: RouteConfig, *, metrics: ServingMetrics | None = None, seed: int | None = None
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.table = load_table(cfg.versions_file)
        self.control = self._control(self.table)
        self.keys = read_keys(cfg.api_keys_file, "api_keys_file", "ORCHESTRA_API_KEYS")
        self.admin_keys = read_keys(cfg.admin_api_keys_file, "admin_api_keys_file", None) or self.keys
        if not self.keys:
            log.warning(
                "no API key configured (api_keys_file or ORCHESTRA_API_KEYS): anyone can call this router"
            )
        self.upstream_key = cfg.upstream_api_key or os.environ.get("ORCHESTRA_UPSTREAM_API_KEY", "")
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.rng = random.Random(seed)
        self.experiment = Experiment(cfg, self.table, self.control, seed)
        self.responses: OrderedDict[str, Tracked] = OrderedDict()
        self.loaded_at = time.time()
        self.client: httpx.AsyncClient | None = None
        self.shadow_tasks: set[asyncio.Task[None]] = set()
        if cfg.state_path and Path(cfg.state_path).is_file():
            try:
                saved = json.loads(Path(cfg.state_path).read_text())
            except (OSError, ValueError) as err:
                raise StateError(f"state_path {cfg.state_path}: cannot read it ({err})") from None
            self.experiment.restore(saved, cfg.state_path)
            self.experiment.dirty = False
        self.request_log = RequestLog(cfg.log_path, cfg.log_sample_rate) if cfg.log_path else None

    def _control(self, table: RoutingTable) -> str:
        if not self.cfg.control:
            return table.primaries[0].name
        version = table.get(self.cfg.control)
        if version is None or version.shadow:
            raise RoutingTableError(
                f"routing table {table.path}: control={self.cfg.control!r} must name one of its non-shadow "
                f"versions {[v.name for v in table.primaries]}"
            )
        return version.name

    # --- the table ---

    def use_table(self, table: RoutingTable) -> None:
        control = self._control(table)  # raises before anything changes
        self.table, self.control = table, control
        self.experiment.retable(table, control)
        self.loaded_at = time.time()
        log.info(
            "routing table %s: %s", table.path, ", ".join(f"{v.name}={v.weight:g}" for v in table.versions)
        )

    def reload(self) -> RoutingTable:
        """Re-read versions_file; a bad table raises RoutingTableError and the current one keeps serving."""
        table = load_table(self.cfg.versions_file)
        self.use_table(table)
        return table

    def reload_logged(self) -> None:
        """SIGHUP: reload, reporting a refused table in the log (there is no one to answer)."""
        try:
            self.reload()
        except RoutingTableError as err:
            log.error("reload refused, still serving the previous table: %s", err)

    def set_weights(self, weights: Mapping[str, float]) -> RoutingTable:
        """Promote / roll back: new weights for the named versions, written to versions_file, then reloaded.

        The file is rewritten from the table it holds (comments in it are not kept).
        """
        current = load_table(self.cfg.versions_file)
        for name in weights:
            version = current.get(name)
            if version is None:
                known = [v.name for v in current.versions]
                raise RoutingTableError(f"routing table {current.path}: no version {name!r} (known: {known})")
            if version.shadow:
                raise RoutingTableError(
                    f"routing table {current.path}: {name} is a shadow version and has no weight"
                )
        entries = [
            {"name": v.name, "url": v.url, "shadow": v.shadow, "weight": float(weights.get(v.name, v.weight))}
            for v in current.versions
        ]
        table = parse_table({"versions": entries}, current.path)  # validated before the file is touched
        self._control(table)
        atomic_write_text(self.cfg.versions_file, table_yaml(table), durable=True)
        return self.reload()

    # --- choosing a version ---

    def choose(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> tuple[Version, str | None]:
        """The version for this request and the user id it was chosen by (None: a random draw)."""
        user = body.get("user")
        if not (isinstance(user, str) and user):
            user = headers.get(USER_HEADER) or None
        forced = headers.get(VERSION_HEADER)
        if forced is not None:
            return self.forced(forced.strip()), user
        if user is not None:
            return self.table.assign(user), user
        return self.table.pick(self.rng.random()), None

    def forced(self, name: str) -> Version:
        """The version a request names in its X-Orchestra-Version header (400 if it cannot answer)."""
        version = self.table.get(name)
        if version is not None and not version.shadow:
            return version
        why = "is a shadow version" if version is not None else "is not in the routing table"
        known = ", ".join(v.name for v in self.table.primaries)
        raise APIError(
            400,
            f"{VERSION_HEADER}: {name!r} {why} (versions: {known})",
            param=VERSION_HEADER,
            code="unknown_version",
        )

    # --- upstream calls ---

    def upstream_headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.upstream_key:
            headers["authorization"] = f"Bearer {self.upstream_key}"
        return headers

    def http(self) -> httpx.AsyncClient:
        if self.client is None:
            raise RuntimeError("the router's HTTP client runs only inside the app's lifespan")
        return self.client

    def track(self, answer_id: str, version: str, user: str | None) -> Tracked:
        tracked = Tracked(version=version, user=user, created=time.time())
        self.responses[answer_id] = tracked
        self.responses.move_to_end(answer_id)
        while len(self.responses) > self.cfg.responses_tracked:
            self.responses.popitem(last=False)
        return tracked

    def finish(
        self, call: Call, code: int, tracked: Tracked | None = None, error_type: str | None = None
    ) -> None:
        """Count one answered request: metrics, per-version totals, latency comparison, request log."""
        latency = time.monotonic() - call.started
        answer, labels = call.answer, {"version": call.version, "model": call.model}
        self.metrics.observe_request(
            **labels, endpoint=call.endpoint, code=code, latency_s=latency, error_type=error_type
        )
        if answer.first_token_at is not None:
            self.metrics.observe_first_token(**labels, seconds=answer.first_token_at - call.started)
        usage = answer.usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int) and prompt >= 0 and completion >= 0:
            self.metrics.add_tokens(**labels, prompt=prompt, completion=completion)
        self.experiment.answered(call.version, code, latency)
        if tracked is not None:
            tracked.latency_s = latency
        if self.request_log is not None and answer.id is not None and 200 <= code < 300:
            self.write_log(call, answer.id, latency)

    def write_log(self, call: Call, answer_id: str, latency: float) -> None:
        assert self.request_log is not None
        answer = call.answer
        record: dict[str, Any] = {
            "id": answer_id,
            "created": time.time(),
            "version": call.version,
            "model": call.model,
            "endpoint": call.endpoint,
            "latency_s": latency,
            "usage": answer.usage,
            "finish_reason": answer.finish_reason,
        }
        text = "".join(answer.text)
        if call.endpoint == "/v1/chat/completions":
            record["messages"] = call.body.get("messages")
            record["response"] = text
        else:
            record["prompt"] = call.body.get("prompt")
            record["completion"] = text
        try:
            self.request_log.maybe_write(record)
        except (ValueError, OSError) as err:  # the log must never cost a client its answer
            log.warning("request %s not logged: %s", answer_id, err)

    async def admit(self, request: Request) -> tuple[bytes, dict[str, Any], tuple[Version, str | None]]:
        """Key, body and version of a completion request, or the APIError that turns it away."""
        if self.keys and not has_key(request, self.keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        raw = await read_body(request, self.cfg.max_body_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return raw, body, self.choose(body, request.headers)

    def failed(self, call: Call, code: int, message: str) -> JSONResponse:
        """502 (unreachable) or 504 (timed out), counted against the version."""
        kind = "upstream_timeout" if code == 504 else "upstream_unreachable"
        self.finish(call, code, error_type=kind)
        return error_response(code, message, type="server_error", code=kind, version=call.version)

    async def proxy(self, request: Request, endpoint: str) -> Response:
        started = time.monotonic()
        try:
            raw, body, (version, user) = await self.admit(request)
        except APIError as err:  # turned away before a version is chosen: counted as "unrouted"
            self.metrics.observe_request(
                version=UNROUTED, model="", endpoint=endpoint, code=err.status,
                latency_s=time.monotonic() - started, error_type=err.type,
            )  # fmt: skip
            raise
        model = body.get("model")
        call = Call(version.name, model if isinstance(model, str) else "", endpoint, started, body, user)
        for shadow in self.table.shadows:
            self.mirror(shadow, endpoint, raw)
        client, timeout = self.http(), self.cfg.upstream_timeout_s
        upstream_request = client.build_request(
            "POST", version.url + endpoint, content=raw, headers=self.upstream_headers(), timeout=timeout
        )
        try:  # the whole wait for the status line is bounded, not only each read
            upstream = await asyncio.wait_for(client.send(upstream_request, stream=True), timeout)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            return self.failed(call, 504, f"version {version.name} did not answer within {timeout:g} s")
        except httpx.HTTPError as err:
            return self.failed(
                call, 502, f"version {version.name} is unreachable ({type(err).__name__}: {err})"
            )
        keep_text = self.request_log is not None
        content_type = upstream.headers.get("content-type", "application/json")
        if upstream.status_code == 200 and content_type.startswith("text/event-stream"):
            headers = {VERSION_HEADER: version.name, "cache-control": "no-cache", "x-accel-buffering": "no"}
            return RelayResponse(self.relay(upstream, call, keep_text), headers=headers)
        try:
            left = max(0.0, timeout - (time.monotonic() - started))
            content = await asyncio.wait_for(upstream.aread(), left)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            return self.failed(
                call, 504, f"version {version.name} did not finish its answer within {timeout:g} s"
            )
        except httpx.HTTPError as err:
            return self.failed(
                call, 502, f"version {version.name} broke off its answer ({type(err).__name__})"
            )
        finally:
            await upstream.aclose()
        tracked = None
        if upstream.status_code >= 400:
            content = upstream_error_body(content, upstream.status_code, version.name)
            content_type = "application/json"
        else:
            with suppress(ValueError):
                call.answer.read(json.loads(content), keep_text)
            if call.answer.id is not None:
                tracked = self.track(call.answer.id, version.name, user)
        self.finish(call, upstream.status_code, tracked)
        return Response(
            content,
            status_code=upstream.status_code,
            media_type=content_type,
            headers={VERSION_HEADER: version.name},
        )

    async def relay(
        self, upstream: httpx.Response, call: Call, keep_text: bool
    ) -> AsyncGenerator[bytes, None]:
        """Pass the version's events on as they come, noting the answer's id as soon as it goes by."""
        answer = call.answer
        answer.streamed = True
        watcher = EventWatcher(answer, keep_text)
        tracked: Tracked | None = None
        code, error_type = 499, "client_closed"  # unless the stream ends, or fails on the version's side
        try:
            async for chunk in upstream.aiter_bytes():
                watcher.feed(chunk)
                if tracked is None and answer.id is not None:
                    tracked = self.track(answer.id, call.version, call.user)
                yield chunk
            code, error_type = (502, "upstream_error") if answer.error is not None else (200, "")
        except httpx.TimeoutException:
            code, error_type = 504, "upstream_timeout"
            yield sse_error(
                f"version {call.version} sent nothing for {self.cfg.upstream_timeout_s:g} s", error_type
            )
        except httpx.HTTPError as err:
            code, error_type = 502, "upstream_unreachable"
            yield sse_error(f"version {call.version} broke off its answer ({type(err).__name__})", error_type)
        finally:
            # Counted first: a client that left cancels this generator, and the close below may not finish.
            self.finish(call, code, tracked, error_type or None)
            with anyio.CancelScope(shield=True):
                await upstream.aclose()

    def mirror(self, version: Version, endpoint: str, raw: bytes) -> None:
        """Send a copy to a shadow version in the background; nothing waits for it."""
        if len(self.shadow_tasks) >= MAX_SHADOW_IN_FLIGHT:
            self.experiment.stats[version.name].shadow_dropped += 1
            return
        task = asyncio.create_task(self.shadow_call(version, endpoint, raw))
        self.shadow_tasks.add(task)
        task.add_done_callback(self.shadow_tasks.discard)

    async def shadow_call(self, version: Version, endpoint: str, raw: bytes) -> None:
        started = time.monotonic()
        timeout = self.cfg.shadow_timeout_s
        try:
            response = await asyncio.wait_for(
                self.http().post(
                    version.url + endpoint, content=raw, headers=self.upstream_headers(), timeout=timeout
                ),
                timeout,
            )
            code = response.status_code
        except (httpx.TimeoutException, asyncio.TimeoutError):
            code = 504
        except httpx.HTTPError:
            code = 502
        latency = time.monotonic() - started
        self.metrics.observe_shadow(version=version.name, code=code, latency_s=latency)
        self.experiment.answered(version.name, code, latency)

    async def models(self, request: Request) -> Response:
        """The union of the non-shadow versions' models (each listed once, as the first version has it)."""
        if self.keys and not has_key(request, self.keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        client = self.http()

        async def listed(version: Version) -> list[Any] | None:
            try:
                response = await client.get(
                    version.url + "/v1/models",
                    headers=self.upstream_headers(),
                    timeout=self.cfg.upstream_timeout_s,
                )
                data = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                return None
            return data.get("data") if isinstance(data, dict) and isinstance(data.get("data"), list) else None

        answers = await asyncio.gather(*(listed(v) for v in self.table.primaries))
        if all(a is None for a in answers):
            return error_response(502, "no version answered GET /v1/models", type="server_error",
                                  code="upstream_unreachable")  # fmt: skip
        seen: dict[str, Any] = {}
        for models in answers:
            for model in models or []:
                if isinstance(model, dict) and isinstance(model.get("id"), str):
                    seen.setdefault(model["id"], model)
        return JSONResponse({"object": "list", "data": list(seen.values())})

    def feedback(self, body: FeedbackBody) -> dict[str, Any]:
        tracked = self.responses.get(body.id)
        if tracked is None:
            raise APIError(
                404,
                f"id: no answer {body.id!r} among the last {self.cfg.responses_tracked} routed",
                param="id",
                code="response_not_found",
            )
        given: dict[Metric, float] = {}
        if body.score is not None:
            given["score"] = body.score
        if body.thumbs is not None:
            given["thumbs"] = 1.0 if body.thumbs == "up" else 0.0
        again = sorted(set(given) & tracked.rated)
        if again:
            raise APIError(
                409,
                f"{again[0]}: feedback on {body.id!r} was already recorded",
                param=again[0],
                code="duplicate",
            )
        for metric, value in given.items():
            self.experiment.observe(tracked.version, metric, value)
            tracked.rated.add(metric)
        self.metrics.observe_feedback(
            version=tracked.version, score=given.get("score", given.get("thumbs", 0.0))
        )
        return {"id": body.id, "version": tracked.version, "recorded": given}

    async def ready(self) -> tuple[bool, dict[str, bool]]:
        client = self.http()

        async def healthy(version: Version) -> bool:
            try:
                response = await client.get(version.url + "/health", timeout=READY_TIMEOUT_S)
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        primaries = self.table.primaries
        answers = await asyncio.gather(*(healthy(v) for v in primaries))
        states = {v.name: ok for v, ok in zip(primaries, answers, strict=True)}
        return any(answers), states

    # --- what the dashboard shows ---

    def stats(self) -> dict[str, Any]:
        experiment = self.experiment
        primary_requests = sum(experiment.stats[v.name].requests for v in self.table.primaries)
        versions = []
        for v in self.table.versions:
            stats = experiment.stats[v.name]
            latency = experiment.latency[v.name]
            feedback = {}
            for metric in ("score", "thumbs"):
                arm = stats.feedback[metric]
                kind = METRICS[metric]
                interval = mean_confidence_sequence(
                    arm,
                    self.cfg.alpha,
                    binary=kind["binary"],
                    min_samples=self.cfg.min_samples,
                    bounds=kind.get("bounds"),
                )
                feedback[metric] = {
                    "n": arm.n,
                    "mean": arm.mean if arm.n else None,
                    "ci_low": None if interval is None else interval[0],
                    "ci_high": None if interval is None else interval[1],
                }
            comparison = None
            if v.name in experiment.comparisons:
                comparison = {m: c.result().to_dict() for m, c in experiment.comparisons[v.name].items()}
                if v.shadow:  # no one rates a shadow's answers: only its latency is compared
                    comparison = {"latency": comparison["latency"]}
            versions.append(
                {
                    "name": v.name,
                    "weight": v.weight,
                    "weight_share": self.table.weight_share(v),
                    "shadow": v.shadow,
                    "control": v.name == self.control,
                    "requests": stats.requests,
                    "errors": stats.errors,
                    "shadow_dropped": stats.shadow_dropped,
                    "share": (stats.requests / primary_requests)
                    if primary_requests and not v.shadow
                    else None,
                    "latency_p50_s": latency.quantile(0.5),
                    "latency_p95_s": latency.quantile(0.95),
                    "feedback": feedback,
                    "comparison": comparison,
                }
            )
        return {
            "control": self.control,
            "alpha": self.cfg.alpha,
            "min_samples": self.cfg.min_samples,
            "versions_file": self.table.path,
            "loaded_at": self.loaded_at,
            "requests": primary_requests,
            "versions": versions,
        }

    def save(self) -> None:
        """Write the comparison state to state_path, atomically (no-op without one)."""
        if not self.cfg.state_path:
            return
        path = Path(self.cfg.state_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.experiment.to_dict()), durable=True)
        self.experiment.dirty = False

    async def autosave(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL_S)
            if self.experiment.dirty:
                try:
                    self.save()
                except OSError as err:
                    log.error("state_path %s: cannot write it (%s)", self.cfg.state_path, err)


class RelayResponse(StreamingResponse):
    """A relayed event stream, closed as soon as the response ends, the client's leaving included.

    Starlette leaves an unfinished body iterator to the garbage collector; closing it here
    closes the version's stream at once and counts the request (as 499) without delay.
    """

    def __init__(self, relay: AsyncGenerator[bytes, None], headers: Mapping[str, str]) -> None:
        super().__init__(relay, media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.relay.aclose()


def sse_error(message: str, code: str) -> bytes:
    """An error event in a stream that has already begun (the OpenAI clients raise it)."""
    body = APIError(502, message, type="server_error", code=code).body()
    return f"data: {json.dumps(body)}\n\n".encode()


def create_router_app(
    cfg: RouteConfig, *, metrics: ServingMetrics | None = None, seed: int | None = None
) -> FastAPI:
    """The router as a FastAPI app; ``app.state.router`` is its :class:`Router` (reload, set_weights)."""
    router = Router(cfg, metrics=metrics, seed=seed)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        async with httpx.AsyncClient(timeout=cfg.upstream_timeout_s, limits=limits) as client:
            router.client = client
            saver = asyncio.create_task(router.autosave())
            try:
                yield
            finally:
                saver.cancel()
                for task in list(router.shadow_tasks):
                    task.cancel()
                await asyncio.gather(saver, *router.shadow_tasks, return_exceptions=True)
                router.client = None
                router.save()
                if router.request_log is not None:
                    router.request_log.close()

    app = FastAPI(title="Orchestra router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.router = router

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return error_response(
            err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, f"internal error: {type(err).__name__}", type="server_error")

    def require_admin(request: Request) -> None:
        if not router.admin_keys:
            return
        if has_key(request, router.admin_keys):
            return
        if router.keys and has_key(request, router.keys):
            raise APIError(403, "this key may not change the routing table", type="permission_error")
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def json_body(request: Request) -> Any:
        return await read_json(request, cfg.max_body_bytes)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await router.proxy(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.proxy(request, "/v1/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await router.models(request)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        if router.keys and not has_key(request, router.keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return router.feedback(parse_body(FeedbackBody, await json_body(request)))

    @app.post("/admin/reload")
    async def reload(request: Request) -> dict[str, Any]:
        require_admin(request)
        try:
            router.reload()
        except RoutingTableError as err:
            raise APIError(400, f"{err}; still serving the previous table", param="versions_file") from None
        return router.stats()

    @app.post("/admin/weights")
    async def weights(request: Request) -> dict[str, Any]:
        require_admin(request)
        body: WeightsBody = parse_body(WeightsBody, await json_body(request))
        try:
            router.set_weights(body.weights)
        except RoutingTableError as err:
            raise APIError(400, f"{err}; still serving the previous table", param="weights") from None
        return router.stats()

    @app.get("/api/stats")
    async def stats() -> dict[str, Any]:
        return router.stats()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok, versions = await router.ready()
        return JSONResponse({"ready": ok, "versions": versions}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_page() -> Response:
        content, content_type = router.metrics.render()
        return Response(content, media_type=content_type)

    add_dashboard(app)
    return app
