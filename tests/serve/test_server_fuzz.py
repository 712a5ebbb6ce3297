"""Fuzzed requests (hypothesis): every bad body gets a 4xx with an OpenAI-shaped error, never a 500,
and the server keeps answering a good request afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestra.config import ServeConfig
from orchestra.serve.app import Server, create_app
from orchestra.train.checkpoint.load import load_for_eval
from tests.serve.live import running, tiny_checkpoint

KEY = "fuzz-key"
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "stream", "user", "logprobs", "echo", "max_completion_tokens", "stream_options", "unknown_field"]  # fmt: skip

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny.ckpt")
    keys = ckpt.parent / "keys"
    keys.write_text(KEY + "\n")
    cfg = ServeConfig(
        ckpt=str(ckpt), model_name="tiny", api_keys_file=str(keys), max_tokens_limit=8, default_max_tokens=4,
        max_body_bytes=4_000, request_timeout_s=30,
    )  # fmt: skip
    with running(create_app(Server(cfg, load_for_eval(ckpt)))) as base:
        yield base


def _check(url: str, path: str, content: bytes, headers: dict[str, str]) -> int:
    r = httpx.post(url + path, content=content, headers=headers, timeout=60)
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert "choices" in r.json()
        return 200
    assert 400 <= r.status_code < 500, (r.status_code, r.text, content[:200])
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error
    return r.status_code


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    keep_model=st.booleans(),
)
def test_fuzzed_bodies_get_client_errors(url: str, path: str, body: dict[str, Any], keep_model: bool) -> None:
    if keep_model:
        body["model"] = "tiny"
    content = json.dumps(body).encode()
    _check(url, path, content, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.binary(max_size=300), auth=st.sampled_from([None, "Bearer " + KEY, "Bearer nope", "Basic x", KEY])
)
def test_fuzzed_bytes_and_keys(url: str, raw: bytes, auth: str | None) -> None:
    headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {})
    code = _check(url, "/v1/completions", raw, headers)
    if auth != "Bearer " + KEY:
        assert code == 401


def test_oversized_and_still_serving(url: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({"model": "tiny", "prompt": "a" * 10_000}).encode()
    assert _check(url, "/v1/completions", big, headers) == 413
    ok = httpx.post(
        url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=headers, timeout=60
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(url + "/nope").status_code == 404 and "error" in httpx.get(url + "/nope").json()
