"""orchestra-serve's OpenAI API through the official `openai` client on 127.0.0.1.

The reference for every answer is orchestra.model.generate on the same tokens, one request at
a time; the wire format is what the official client parses (it raises on anything else).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from orchestra.config import ServeConfig
from orchestra.eval.model import EvalModel
from orchestra.model import generate
from orchestra.serve.app import Server, create_app
from orchestra.serve.engine import prompt_ids_for_chat
from orchestra.train.checkpoint.load import load_for_eval
from tests.serve.live import running, tiny_checkpoint

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.ckpt")


@pytest.fixture(scope="module")
def evaluated(ckpt: Path) -> EvalModel:
    return load_for_eval(ckpt)


@pytest.fixture(scope="module")
def live(
    ckpt: Path, evaluated: EvalModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Server]]:
    folder = tmp_path_factory.mktemp("log")
    log, keys = folder / "requests.jsonl", folder / "keys.txt"
    keys.write_text(f"# clients\nother-key\n{KEY}\n")
    cfg = ServeConfig(
        ckpt=str(ckpt), model_name="tiny", version="v1", api_keys_file=str(keys), max_batch_size=4, max_queue=8,
        max_body_bytes=20_000, max_tokens_limit=48, default_max_tokens=16, log_path=str(log),
        log_sample_rate=1.0, drift_window=10,
    )  # fmt: skip
    server = Server(cfg, evaluated)
    with running(create_app(server)) as url:
        yield url, server


@pytest.fixture
def client(live: tuple[str, Server]) -> openai.OpenAI:
    return openai.OpenAI(base_url=live[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRA_API_KEYS", f"other-key,{KEY}")


def greedy(evaluated: EvalModel, ids: list[int], n: int) -> tuple[str, str]:
    """(text, finish_reason) of greedy decoding alone, cut at the first EOS."""
    out = generate(evaluated.model, torch.tensor(ids), n, temperature=0.0)[len(ids) :].tolist()  # type: ignore[arg-type]
    stop = next((i for i, t in enumerate(out) if t in evaluated.eos_ids), None)
    if stop is not None:
        return evaluated.decode(out[:stop]), "stop"
    return evaluated.decode(out), "length"


def test_chat_completion_is_greedy_decoding_of_the_rendered_chat(
    client: openai.OpenAI, evaluated: EvalModel
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(x, y):"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    ids = prompt_ids_for_chat(evaluated, messages)
    # Orchestra's plain template, written out: what fine-tuning trained on.
    assert evaluated.decode(ids) == "<|system|>\nBe brief.\n<|user|>\ndef add(x, y):\n<|assistant|>\n"
    text, finish = greedy(evaluated, ids, 12)
    assert got.choices[0].message.content == text and got.choices[0].finish_reason == finish
    assert (
        got.choices[0].message.role == "assistant" and got.model == "tiny" and got.id.startswith("chatcmpl-")
    )
    assert got.usage is not None and got.usage.prompt_tokens == len(ids)
    assert 1 <= got.usage.completion_tokens <= 12
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_stop_sequence_and_streaming_equal_the_plain_answer(
    client: openai.OpenAI, evaluated: EvalModel
) -> None:
    prompt = "class Point:\n    def"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    want, _ = greedy(evaluated, evaluated.encode(prompt), 20)
    assert full.choices[0].text == want
    stop = want[3:5]
    assert stop and stop in want
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == want[: want.index(stop)] and cut.choices[0].finish_reason == "stop"

    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]

    messages = [{"role": "user", "content": prompt}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)  # type: ignore[arg-type]
    streamed = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=15, temperature=0, stream=True
    )  # type: ignore[arg-type]
    pieces = list(streamed)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == plain.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_n_and_seed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model="tiny", prompt="import os\n", max_tokens=10, temperature=1.0, top_p=0.95, n=3
    )
    a = client.completions.create(seed=7, **kwargs)
    b = client.completions.create(seed=7, **kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible
    assert len({c.text for c in a.choices}) > 1  # and the choices differ
    assert a.usage is not None and 3 <= a.usage.completion_tokens <= 30 and a.usage.prompt_tokens > 0


def test_concurrent_requests_get_what_they_get_alone(client: openai.OpenAI, evaluated: EvalModel) -> None:
    """Continuous batching: 12 overlapping requests of different lengths, each its solo answer."""
    prompts = [f"x = {i}\n" * (1 + i % 4) for i in range(12)]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6 + i, temperature=0)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, prompt in enumerate(prompts):
        assert results[i] == greedy(evaluated, evaluated.encode(prompt), 6 + i)[0], i


def test_models_auth_and_unknown_model(live: tuple[str, Server], client: openai.OpenAI) -> None:
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["tiny"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    bad = openai.OpenAI(base_url=live[0] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        bad.models.list()
    r = httpx.post(live[0] + "/v1/completions", json={"model": "tiny", "prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "status", "where"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": -1}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 10**9}).encode(), 400, "limit of 48"),
        (json.dumps({"model": "tiny", "prompt": "a", "temperature": 9}).encode(), 400, "temperature"),
        (json.dumps({"model": "tiny", "prompt": "a", "logprobs": 3}).encode(), 400, "logprobs"),
        (json.dumps({"model": "tiny", "prompt": "a", "n": 99}).encode(), 400, "n=99"),
        (json.dumps({"model": "tiny", "prompt": "a" * 600}).encode(), 400, "maximum prompt length"),
        (json.dumps({"model": "tiny", "prompt": [99999]}).encode(), 400, "token ids"),
        (json.dumps({"model": "tiny", "prompt": "a" * 30_000}).encode(), 413, "exceeds the limit"),
        (json.dumps({"model": "tiny"}).encode(), 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(
    live: tuple[str, Server], body: bytes, status: int, where: str
) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(live[0] + "/v1/completions", content=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert where in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(live[0] + "/health").status_code == 200


def test_prompt_plus_max_tokens_past_the_context(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="context is 64 tokens") as info:
        client.completions.create(model="tiny", prompt=[65] * 30, max_tokens=40)
    assert info.value.code == "context_length_exceeded"


def test_a_full_queue_answers_429_and_the_server_keeps_serving(
    ckpt: Path, evaluated: EvalModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ServeConfig(
        ckpt=str(ckpt),
        model_name="tiny",
        max_batch_size=1,
        max_queue=1,
        max_tokens_limit=60,
        default_max_tokens=16,
    )
    server = Server(cfg, evaluated)
    with running(create_app(server)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        codes: list[int] = []

        def ask() -> None:
            try:
                client.completions.create(model="tiny", prompt="a", max_tokens=50, temperature=0)
                codes.append(200)
            except openai.RateLimitError:
                codes.append(429)

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes.count(429) >= 1 and codes.count(200) >= 2, codes
        ok = client.completions.create(model="tiny", prompt="a", max_tokens=2)
        assert ok.choices[0].finish_reason in ("length", "stop")


def test_timeouts_and_disconnects_free_the_batch(ckpt: Path, evaluated: EvalModel) -> None:
    cfg = ServeConfig(
        ckpt=str(ckpt),
        model_name="tiny",
        max_batch_size=2,
        request_timeout_s=0.5,
        max_tokens_limit=60,
        default_max_tokens=16,
    )
    server = Server(cfg, evaluated)
    prefill = server.engine._prefill

    def slow_prefill(joiners: Any) -> None:  # the first token comes after the deadline
        time.sleep(1.0)
        prefill(joiners)

    server.engine._prefill = slow_prefill  # type: ignore[method-assign]
    with running(create_app(server)) as url:
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "tiny", "prompt": "a", "max_tokens": 50}
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        server.engine._prefill = prefill  # type: ignore[method-assign]
        # A client that leaves mid-stream: its row is freed.
        server.cfg.request_timeout_s = 60
        with httpx.stream(
            "POST", url + "/v1/completions", json={**body, "stream": True}, headers=headers
        ) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    break
        deadline = time.monotonic() + 10
        while server.engine.load() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.engine.load() == (0, 0)


def test_metrics_and_the_redacted_request_log(live: tuple[str, Server], client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "mail jo@ex.io"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)  # type: ignore[arg-type]
    text = httpx.get(live[0] + "/metrics").text
    assert (
        'orchestra_requests_total{code="200",endpoint="/v1/chat/completions",model="tiny",version="v1"}'
        in text
    )
    assert "orchestra_time_to_first_token_seconds_count" in text
    server = live[1]
    record = None
    deadline = time.monotonic() + 10
    while record is None and time.monotonic() < deadline:  # written by the monitoring thread
        log = Path(server.cfg.log_path).read_text().splitlines() if Path(server.cfg.log_path).exists() else []
        record = next((json.loads(line) for line in log if json.loads(line)["id"] == reply.id), None)
        time.sleep(0.05)
    assert record is not None
    assert "jo@ex.io" not in json.dumps(record) and "<EMAIL>" in record["messages"][0]["content"]
    assert record["messages"][-1] == {"role": "assistant", "content": reply.choices[0].message.content}
    assert record["version"] == "v1" and record["usage"]["prompt_tokens"] == reply.usage.prompt_tokens  # type: ignore[union-attr]
