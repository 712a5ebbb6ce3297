"""Helpers of the router tests: running versions, routing tables, a router on a free port, the openai client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from orchestra.config import RouteConfig
from orchestra.serve.router import create_router_app
from tests.serve.live import running
from tests.serve.upstream import Upstream, upstream_app

ROOT = Path(__file__).resolve().parents[2]
CLIENT_KEY, ADMIN_KEY, UPSTREAM_KEY = "client-secret", "admin-secret", "upstream-secret"
NAMES = ("v1", "v2", "v3", "v4")


def running_versions() -> Iterator[dict[str, tuple[Upstream, str]]]:
    """Four running versions v1..v4, each requiring the router's upstream key (a module fixture)."""
    ups = {name: Upstream(name, models=("tiny", f"only-{name}"), key=UPSTREAM_KEY) for name in NAMES}
    with ExitStack() as stack:
        yield {name: (up, stack.enter_context(running(upstream_app(up)))) for name, up in ups.items()}


def fresh_versions(
    versions: dict[str, tuple[Upstream, str]], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Upstream]:
    """The versions, with nothing received yet and no delay (a per-test fixture)."""
    monkeypatch.delenv("ORCHESTRA_API_KEYS", raising=False)
    monkeypatch.delenv("ORCHESTRA_UPSTREAM_API_KEY", raising=False)
    for up, _ in versions.values():
        up.received.clear()
        up.delay_s = up.chunk_gap_s = 0.0
    return {name: up for name, (up, _) in versions.items()}


def table(versions: dict[str, tuple[Upstream, str]], **weights: float | str) -> dict[str, Any]:
    """A routing table document: name=weight, or name="shadow"."""
    entries: list[dict[str, Any]] = []
    for name, weight in weights.items():
        url = versions[name][1]
        if weight == "shadow":
            entries.append({"name": name, "url": url, "shadow": True})
        else:
            entries.append({"name": name, "url": url, "weight": weight})
    return {"versions": entries}


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def route_config(tmp_path: Path, document: dict[str, Any], **overrides: Any) -> RouteConfig:
    (tmp_path / "keys.txt").write_text(f"# client keys\n{CLIENT_KEY}\n")
    (tmp_path / "admin.txt").write_text(f"{ADMIN_KEY}\n")
    fields = {
        "versions_file": str(write_yaml(tmp_path / "versions.yaml", document)),
        "api_keys_file": str(tmp_path / "keys.txt"),
        "admin_api_keys_file": str(tmp_path / "admin.txt"),
        "upstream_api_key": UPSTREAM_KEY,
        "upstream_timeout_s": 10.0,
        "min_samples": 20,
        **overrides,
    }
    return RouteConfig(**fields)


@contextmanager
def router(cfg: RouteConfig, seed: int = 0) -> Iterator[tuple[str, Any]]:
    """The router running on a free port: (base URL, the Router object, for read-only use)."""
    app = create_router_app(cfg, seed=seed)
    with running(app) as url:
        yield url, app.state.router


def client(url: str, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20)


def chat(
    c: openai.OpenAI, user: str | None = None, messages: list[dict[str, str]] | None = None, **kwargs: Any
) -> tuple[str, str, str]:
    """(answer text, X-Orchestra-Version header, response id) of one chat completion."""
    extra = {"user": user} if user is not None else {}
    raw = c.chat.completions.with_raw_response.create(
        model="tiny",
        messages=messages or [{"role": "user", "content": "hi"}],
        max_tokens=8,
        **extra,
        **kwargs,
    )
    completion = raw.parse()
    return completion.choices[0].message.content or "", raw.headers["x-orchestra-version"], completion.id


def stats(url: str) -> dict[str, Any]:
    return {v["name"]: v for v in httpx.get(f"{url}/api/stats").json()["versions"]}


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
