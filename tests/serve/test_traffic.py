"""RequestLog: deterministic sampling, PII redaction, and lines that orchestra-eval's loaders read."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestra.eval.tasks.generation import read_generation
from orchestra.eval.tasks.perplexity import file_documents
from orchestra.serve.traffic import RequestLog, RequestLogError, sample_fraction

EMAIL, PHONE, CARD, IP = "jane.doe@example.com", "+1 415-555-0143", "4111 1111 1111 1111", "192.168.1.20"


def meta(request_id: str, endpoint: str = "/v1/chat/completions") -> dict[str, Any]:
    return {
        "id": request_id,
        "created": 1700000000.5,
        "version": "v2",
        "model": "tiny",
        "endpoint": endpoint,
        "latency_s": 0.25,
        "usage": {"prompt_tokens": 12, "completion_tokens": 5},
        "finish_reason": "stop",
    }


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sampling_is_deterministic_and_matches_the_rate(tmp_path: Path) -> None:
    ids = [f"chatcmpl-{i:05d}" for i in range(4000)]
    a = RequestLog(tmp_path / "a.jsonl", 0.25, seed=7)
    b = RequestLog(tmp_path / "b.jsonl", 0.25, seed=7)
    other_seed = RequestLog(tmp_path / "c.jsonl", 0.25, seed=8)
    picked = [i for i in ids if a.sampled(i)]
    assert picked == [i for i in ids if b.sampled(i)]
    # Binomial(4000, 0.25): sd ~27, so 4.5 sd either side.
    assert abs(len(picked) - 1000) < 120
    assert picked != [i for i in ids if other_seed.sampled(i)]
    # A larger rate keeps every id a smaller one picked (a sample grows, it does not reshuffle).
    wider = RequestLog(tmp_path / "d.jsonl", 0.5, seed=7)
    assert set(picked) <= {i for i in ids if wider.sampled(i)}
    assert all(0.0 <= sample_fraction(i, 7) < 1.0 for i in ids[:50])

    written = [a.maybe_write({**meta(i), "prompt": "Hi", "completion": "there"}) for i in ids[:200]]
    assert written == [a.sampled(i) for i in ids[:200]]
    assert [r["id"] for r in lines(tmp_path / "a.jsonl")] == [i for i in ids[:200] if a.sampled(i)]


def test_rate_zero_and_one(tmp_path: Path) -> None:
    never = RequestLog(tmp_path / "never.jsonl", 0.0)
    always = RequestLog(tmp_path / "always.jsonl", 1.0)
    for i in range(100):
        record = {**meta(f"r{i}"), "prompt": "a", "completion": "b"}
        assert not never.maybe_write(record)
        assert always.maybe_write(record)
    assert (tmp_path / "never.jsonl").read_text() == ""
    assert len(lines(tmp_path / "always.jsonl")) == 100


def test_pii_is_redacted_everywhere_and_counted_once(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "nested" / "traffic.jsonl"
    log = RequestLog(path, 1.0)
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": f"My email is {EMAIL} and my phone {PHONE}. Card: {CARD}."},
    ]
    answer = f"I will write to {EMAIL}."
    # The server's form: the conversation already ends with the answer; response and text repeat it.
    assert log.maybe_write(
        {
            **meta("chatcmpl-1"),
            "messages": [*messages, {"role": "assistant", "content": answer}],
            "response": answer,
            "text": "\n".join(m["content"] for m in messages) + answer,
            "user": EMAIL,
            "metadata": {"notes": [f"from {IP}", {"deep": PHONE}]},
        }
    )
    raw = path.read_text(encoding="utf-8")
    for secret in (EMAIL, PHONE, CARD, IP, "4111"):
        assert secret not in raw
    (record,) = lines(path)
    assert (
        record["messages"][1]["content"] == "My email is <EMAIL> and my phone <PHONE>. Card: <CREDIT_CARD>."
    )
    assert record["messages"][-1] == {"role": "assistant", "content": "I will write to <EMAIL>."}
    assert len(record["messages"]) == 3  # the answer is not appended a second time
    assert record["response"] == "I will write to <EMAIL>."
    assert record["user"] == "<EMAIL>"
    assert record["metadata"] == {"notes": ["from <IP_ADDRESS>", {"deep": "<PHONE>"}]}
    assert "<PHONE>" in record["text"] and EMAIL not in record["text"]
    # Planted: emails in the user turn, the answer and `user`; phones in the turn and metadata.
    assert record["pii_redacted"] == {"credit_card": 1, "email": 3, "ip_address": 1, "phone": 2}
    for key, value in meta("chatcmpl-1").items():
        assert record[key] == value


def test_log_is_read_by_the_generation_and_perplexity_loaders(tmp_path: Path) -> None:
    path = tmp_path / "traffic.jsonl"
    log = RequestLog(path, 1.0)
    chat = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"What is 2+2? Reply to {EMAIL}"},
    ]
    assert log.maybe_write({**meta("chatcmpl-a"), "messages": chat, "response": "4"})
    assert log.maybe_write(
        {**meta("cmpl-b", "/v1/completions"), "prompt": "The capital of France is", "completion": " Paris."}
    )
    log.close()

    examples = read_generation(str(path))
    assert examples == [
        (
            [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2+2? Reply to <EMAIL>"},
                {"role": "assistant", "content": "4"},
            ],
            ["4"],
        ),
        (
            [
                {"role": "user", "content": "The capital of France is"},
                {"role": "assistant", "content": " Paris."},
            ],
            [" Paris."],
        ),
    ]
    documents = file_documents([str(path)], "text")
    assert documents == [
        "Answer briefly.\nWhat is 2+2? Reply to <EMAIL>\n4",
        "The capital of France is Paris.",
    ]
    first, second = lines(path)
    assert first["usage"] == {"prompt_tokens": 12, "completion_tokens": 5}
    assert second["completion"] == " Paris." and second["pii_redacted"] == {}


def test_unscorable_requests_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "traffic.jsonl"
    log = RequestLog(path, 1.0)
    user = [{"role": "user", "content": "hello"}]
    assert not log.maybe_write({**meta("e1"), "messages": user, "response": ""})
    assert not log.maybe_write({**meta("e2"), "messages": user, "response": "  \n"})
    assert not log.maybe_write({**meta("e3"), "messages": user})  # an error: no answer
    assert not log.maybe_write(
        {**meta("e4"), "messages": [{"role": "tool", "content": "x"}], "response": "y"}
    )
    assert not log.maybe_write({**meta("e5", "/v1/completions"), "prompt": "", "completion": "x"})
    assert log.maybe_write({**meta("ok"), "messages": user, "response": "hi"})
    assert [r["id"] for r in lines(path)] == ["ok"]
    assert "created" in lines(path)[0]


def test_concurrent_appends_give_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "traffic.jsonl"
    log = RequestLog(path, 1.0)
    long_answer = "word " * 2000

    def work(t: int) -> None:
        for i in range(100):
            log.maybe_write({**meta(f"t{t}-{i}"), "prompt": "say words", "completion": long_answer})

    pool = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    records = lines(path)
    assert len(records) == 600
    assert {r["id"] for r in records} == {f"t{t}-{i}" for t in range(6) for i in range(100)}
    assert all(r["response"] == long_answer for r in records)


def test_appends_to_an_existing_log(tmp_path: Path) -> None:
    path = tmp_path / "traffic.jsonl"
    with RequestLog(path, 1.0) as log:
        log.maybe_write({**meta("first"), "prompt": "a", "completion": "b"})
    with RequestLog(path, 1.0) as log:
        log.maybe_write({**meta("second"), "prompt": "a", "completion": "b"})
    assert [r["id"] for r in lines(path)] == ["first", "second"]


def test_unwritable_path_fails_at_construction(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RequestLogError, match=str(blocker / "traffic.jsonl")):
        RequestLog(blocker / "traffic.jsonl", 0.5)
    with pytest.raises(RequestLogError, match=str(tmp_path)):
        RequestLog(tmp_path, 0.5)  # a folder, not a file


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_bad_sample_rate(tmp_path: Path, rate: float) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        RequestLog(tmp_path / "x.jsonl", rate)


def test_record_without_id(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "x.jsonl", 1.0)
    with pytest.raises(ValueError, match="'id'"):
        log.maybe_write({"prompt": "a", "completion": "b"})
    with pytest.raises(ValueError, match="messages"):
        log.maybe_write({"id": "x", "messages": "hello", "response": "b"})


def test_openai_message_forms_are_logged_as_sft(tmp_path: Path) -> None:
    path = tmp_path / "traffic.jsonl"
    log = RequestLog(path, 1.0)
    messages = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Mail "}, {"type": "text", "text": EMAIL}]},
    ]
    assert log.maybe_write({**meta("chatcmpl-parts"), "messages": messages, "response": "Done."})
    ((conversation, refs),) = read_generation(str(path))
    assert conversation == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Mail <EMAIL>"},
        {"role": "assistant", "content": "Done."},
    ]
    assert refs == ["Done."]
    assert lines(path)[0]["pii_redacted"] == {"email": 1}
