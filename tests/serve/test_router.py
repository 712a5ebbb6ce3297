"""The A/B router end to end: the official openai client -> router -> real OpenAI-shaped versions on loopback.

The versions are small FastAPI apps (tests/serve/upstream.py) that tag every answer with their
name; the router only ever sees their URLs, so any real server can take their place.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import yaml

from orchestra.serve.router import (
    LATENCY_RESERVOIR,
    Reservoir,
    RoutingTableError,
    StateError,
    create_router_app,
    load_table,
    parse_table,
)
from tests.serve.ab import (
    ADMIN_KEY,
    CLIENT_KEY,
    ROOT,
    UPSTREAM_KEY,
    chat,
    client,
    fresh_versions,
    route_config,
    router,
    running_versions,
    stats,
    table,
    wait_for,
    write_yaml,
)
from tests.serve.live import free_port
from tests.serve.upstream import Upstream

versions = pytest.fixture(scope="module")(running_versions)
ups = pytest.fixture(fresh_versions)


# --- the routing table ------------------------------------------------------------------------------------


def test_ten_thousand_users_split_within_one_percent_and_a_weight_change_moves_the_fewest() -> None:
    users = [f"user-{i}" for i in range(10_000)]
    for weights in ({"a": 0.9, "b": 0.1}, {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 2, "b": 0, "c": 6}):
        entries = [
            {"name": n, "url": f"http://127.0.0.1:{9000 + i}", "weight": w}
            for i, (n, w) in enumerate(weights.items())
        ]
        routing = parse_table({"versions": entries}, "t.yaml")
        counts = Counter(routing.assign(u).name for u in users)
        total = sum(weights.values())
        for name, weight in weights.items():
            assert abs(counts[name] / len(users) - weight / total) < 0.01, (weights, counts)
    before = parse_table({"versions": [{"name": "a", "url": "http://h:1", "weight": 0.9},
                                       {"name": "b", "url": "http://h:2", "weight": 0.1}]}, "t.yaml")  # fmt: skip
    after = parse_table({"versions": [{"name": "a", "url": "http://h:1", "weight": 0.8},
                                      {"name": "b", "url": "http://h:2", "weight": 0.2}]}, "t.yaml")  # fmt: skip
    moved = [(before.assign(u).name, after.assign(u).name) for u in users]
    changed = [m for m in moved if m[0] != m[1]]
    assert set(changed) == {("a", "b")}  # only a's users move, and only to b
    assert abs(len(changed) / len(users) - 0.1) < 0.01  # the 10% the weights moved, no more


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "a", "url": "http://h:1", "weight": 1}, {"name": "a", "url": "http://h:2", "weight": 1}],
         r"versions\[1\] \(a\): the name 'a' is used twice"),
        ([{"name": "a", "url": "ftp://h:1", "weight": 1}], r"versions\[0\] \(a\): 'url' must be an http\(s\) URL"),
        ([{"name": "a", "url": "http://h:1", "weight": 1}, {"name": "b", "url": "http://h:2", "weight": -1}],
         r"versions\[1\] \(b\): 'weight' must be >= 0, got -1"),
        ([{"name": "a", "url": "http://h:1", "weight": 0}, {"name": "s", "url": "http://h:2", "shadow": True}],
         r"the weights of the non-shadow versions \['a'\] sum to 0"),
        ([{"name": "a", "url": "http://h:1", "wieght": 1}], r"versions\[0\] \(a\): unknown keys \['wieght'\]"),
        ([{"name": "a", "url": "http://h:1"}], r"versions\[0\] \(a\): 'weight' is missing"),
        ([{"name": "s", "url": "http://h:1", "shadow": True, "weight": 0.5}], r"versions\[0\] \(s\): a shadow version gets no share"),
        ([{"url": "http://h:1", "weight": 1}], r"versions\[0\]: 'name' must be a non-empty string"),
        ([{"name": "unrouted", "url": "http://h:1", "weight": 1}], r"versions\[0\] \(unrouted\): 'unrouted' labels refused requests"),
    ],
)  # fmt: skip
def test_bad_routing_table_names_the_file_and_the_entry(entries: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(RoutingTableError, match=r"routing table versions\.yaml: " + message):
        parse_table({"versions": entries}, "versions.yaml")


def test_unreadable_table_and_bad_yaml_are_named(tmp_path: Path) -> None:
    with pytest.raises(RoutingTableError, match=r"missing\.yaml: cannot read it"):
        load_table(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("versions: [\n")
    with pytest.raises(RoutingTableError, match=r"bad\.yaml: not valid YAML"):
        load_table(str(tmp_path / "bad.yaml"))


# --- routing real requests ------------------------------------------------------------------------------


def test_real_requests_follow_the_assignment_and_users_stay_across_a_reload(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    cfg = route_config(tmp_path, table(versions, v1=0.7, v2=0.3))
    with router(cfg) as (url, routing):
        c = client(url)
        seen: dict[str, str] = {}
        for i in range(300):
            text, header, _ = chat(c, user=f"user-{i}")
            assert text == f"answer from {header}"  # the header names the version that wrote the answer
            assert header == routing.table.assign(f"user-{i}").name
            seen[f"user-{i}"] = header
        share = sum(v == "v2" for v in seen.values()) / len(seen)
        assert abs(share - 0.3) < 0.08, share  # 3 binomial sd for 300 users
        counted = stats(url)
        assert counted["v1"]["requests"] + counted["v2"]["requests"] == 300
        assert counted["v2"]["share"] == pytest.approx(share)
        assert len(ups["v1"].received) + len(ups["v2"].received) == 300

        for i in range(10):  # the same user, again and again, by the body's user or the X-User-Id header
            assert chat(c, user="user-3")[1] == seen["user-3"]
            assert chat(c, extra_headers={"X-User-Id": f"user-{i}"})[1] == seen[f"user-{i}"]
        # Reload with the weights unchanged (the file rewritten in another layout): nobody moves.
        Path(cfg.versions_file).write_text("# same table\n" + yaml.safe_dump(table(versions, v1=0.7, v2=0.3)))
        assert (
            httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code
            == 200
        )
        for i in range(0, 300, 7):
            assert chat(c, user=f"user-{i}")[1] == seen[f"user-{i}"]
        # No user id at all: a random draw by weight.
        anonymous = Counter(chat(c)[1] for _ in range(60))
        assert set(anonymous) <= {"v1", "v2"} and anonymous["v1"] > anonymous["v2"]


def test_forced_version_header(versions: dict, ups: dict[str, Upstream], tmp_path: Path) -> None:
    cfg = route_config(tmp_path, table(versions, v1=1.0, v2=0.0, v3="shadow"))
    with router(cfg) as (url, _):
        c = client(url)
        assert chat(c, user="u")[:2] == ("answer from v1", "v1")
        assert chat(c, user="u", extra_headers={"X-Orchestra-Version": "v2"})[:2] == ("answer from v2", "v2")
        with pytest.raises(
            openai.BadRequestError, match=r"X-Orchestra-Version: 'v9' is not in the routing table"
        ):
            chat(c, extra_headers={"X-Orchestra-Version": "v9"})
        with pytest.raises(openai.BadRequestError, match="'v3' is a shadow version") as err:
            chat(c, extra_headers={"X-Orchestra-Version": "v3"})
        assert err.value.code == "unknown_version"


def test_shadow_gets_a_copy_and_never_answers_or_slows_the_client(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    ups["v3"].delay_s = 1.0
    cfg = route_config(tmp_path, table(versions, v1=1.0, v3="shadow"), shadow_timeout_s=5.0)
    with router(cfg) as (url, _):
        c = client(url)
        for i in range(8):
            started = time.monotonic()
            text, header, _ = chat(c, user=f"s{i}", messages=[{"role": "user", "content": f"question {i}"}])
            assert time.monotonic() - started < 0.5  # the shadow takes 1 s; the client never waits for it
            assert (text, header) == ("answer from v1", "v1")
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "question 8"}], stream=True
            )
            if chunk.choices
        )
        assert streamed == "answer from v1"
        wait_for(lambda: stats(url)["v3"]["requests"] == 9)
        assert (
            sorted(ups["v3"].texts())
            == sorted(ups["v1"].texts())
            == sorted(f"question {i}" for i in range(9))
        )
        shadow = stats(url)["v3"]
        assert shadow["shadow"] and shadow["errors"] == 0 and shadow["share"] is None
        assert shadow["latency_p50_s"] >= 1.0
        latency = shadow["comparison"]["latency"]
        assert latency["n_treatment"] == 9 and latency["n_control"] == 9
        assert set(shadow["comparison"]) == {"latency"}  # no one rates a shadow's answers
        metrics = httpx.get(f"{url}/metrics").text
        assert 'orchestra_shadow_requests_total{code="200",version="v3"} 9.0' in metrics


def test_feedback_finds_the_planted_better_version_and_not_the_identical_one(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    """Simulated users rate v2 higher (mean score 0.65 vs 0.5, sd 0.15; thumbs up 80% vs 40%); v4 like v1."""
    cfg = route_config(tmp_path, table(versions, v1=0.34, v2=0.33, v4=0.33))
    rng = np.random.default_rng(0)
    quality = {"v1": (0.5, 0.4), "v2": (0.65, 0.8), "v4": (0.5, 0.4)}  # (mean score, thumbs-up rate)
    with (
        router(cfg) as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as h,
    ):
        c = client(url)
        for i in range(450):
            _, version, rid = chat(c, user=f"rater-{i}")
            mean, up_rate = quality[version]
            score = float(np.clip(rng.normal(mean, 0.15), 0, 1))
            thumbs = "up" if rng.random() < up_rate else "down"
            reply = h.post("/v1/feedback", json={"id": rid, "score": score, "thumbs": thumbs})
            assert reply.status_code == 200 and reply.json()["version"] == version
        result = stats(url)
        assert result["v1"]["control"] and result["v1"]["comparison"] is None
        better, same = result["v2"]["comparison"], result["v4"]["comparison"]
        assert better["score"]["decision"] == "treatment better"
        assert better["score"]["ci_low"] > 0 and better["score"]["p_value"] <= 0.05
        assert better["thumbs"]["decision"] == "treatment better"
        assert same["score"]["decision"] == "no difference yet" and same["score"]["p_value"] > 0.05
        assert same["thumbs"]["decision"] == "no difference yet"
        assert same["score"]["ci_low"] < 0 < same["score"]["ci_high"]
        n = sum(result[v]["feedback"]["score"]["n"] for v in ("v1", "v2", "v4"))
        assert n == 450 and better["score"]["n_control"] == result["v1"]["feedback"]["score"]["n"]
        low, high = result["v2"]["feedback"]["score"]["ci_low"], result["v2"]["feedback"]["score"]["ci_high"]
        assert low < 0.65 < high

        # The feedback endpoint's errors, OpenAI-shaped.
        _, _, rid = chat(c, user="rater-0")
        first = h.post("/v1/feedback", json={"id": rid, "thumbs": "up"})
        assert first.status_code == 200
        again = h.post("/v1/feedback", json={"id": rid, "thumbs": "down"})
        assert again.status_code == 409 and again.json()["error"]["param"] == "thumbs"
        unknown = h.post("/v1/feedback", json={"id": "chatcmpl-nope", "score": 0.5})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "response_not_found"
        for bad, param in (({"id": rid, "score": 1.5}, "score"), ({"id": rid, "thumbs": "sideways"}, "thumbs"),
                           ({"id": rid}, None), ({"score": 0.5}, "id")):  # fmt: skip
            reply = h.post("/v1/feedback", json=bad)
            assert reply.status_code == 400, bad
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
            assert reply.json()["error"]["param"] == param
        assert h.post("/v1/feedback", content=b"{not json").status_code == 400
        assert httpx.post(f"{url}/v1/feedback", json={"id": rid, "score": 1}).status_code == 401


def test_comparison_state_is_saved_and_restored(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    state = tmp_path / "state" / "ab.json"
    cfg = route_config(tmp_path, table(versions, v1=0.5, v2=0.5), state_path=str(state))
    with (
        router(cfg) as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as h,
    ):
        c = client(url)
        for i in range(60):
            _, version, rid = chat(c, user=f"p{i}")
            assert h.post("/v1/feedback", json={"id": rid, "score": 0.8 if version == "v2" else 0.3 + 0.001 * i}).status_code == 200  # fmt: skip
        before = stats(url)
    saved = json.loads(state.read_text())
    assert saved["control"] == "v1" and set(saved["comparisons"]) == {"v2"}
    with router(cfg) as (url, _):
        after = stats(url)
    for name in ("v1", "v2"):
        assert after[name]["feedback"] == before[name]["feedback"]
        assert after[name]["requests"] == before[name]["requests"]
    assert after["v2"]["comparison"]["score"] == before["v2"]["comparison"]["score"]
    state.write_text('{"control": "v1", "versions": {"v1": {"requests": -1}}}')
    with pytest.raises(StateError, match=r"ab\.json: versions\.v1\.requests"):
        create_router_app(cfg)


# --- promote, roll back, reload -------------------------------------------------------------------------


def test_promote_roll_back_and_a_bad_table_refused_while_the_old_one_serves(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    cfg = route_config(tmp_path, table(versions, v1=1.0, v2=0.0))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with router(cfg) as (url, _):
        c = client(url)
        users = [f"p-{i}" for i in range(30)]
        assert {chat(c, user=u)[1] for u in users} == {"v1"}
        promoted = httpx.post(f"{url}/admin/weights", json={"weights": {"v1": 0, "v2": 1}}, headers=admin)
        assert promoted.status_code == 200
        assert {chat(c, user=u)[1] for u in users} == {"v2"}
        on_disk = {
            v["name"]: v["weight"] for v in yaml.safe_load(Path(cfg.versions_file).read_text())["versions"]
        }
        assert on_disk == {"v1": 0.0, "v2": 1.0}
        rolled_back = httpx.post(f"{url}/admin/weights", json={"weights": {"v1": 1, "v2": 0}}, headers=admin)
        assert rolled_back.status_code == 200
        assert {chat(c, user=u)[1] for u in users} == {"v1"}

        # Refused: unknown version, weights summing to 0, a broken file; v1 keeps answering.
        unknown = httpx.post(f"{url}/admin/weights", json={"weights": {"v9": 1}}, headers=admin)
        assert unknown.status_code == 400 and "no version 'v9'" in unknown.json()["error"]["message"]
        zero = httpx.post(f"{url}/admin/weights", json={"weights": {"v1": 0}}, headers=admin)
        assert zero.status_code == 400 and "sum to 0" in zero.json()["error"]["message"]
        write_yaml(Path(cfg.versions_file), table(versions, v1=1.0, v2=-1.0))
        refused = httpx.post(f"{url}/admin/reload", headers=admin)
        assert refused.status_code == 400
        message = refused.json()["error"]["message"]
        assert cfg.versions_file in message and "versions[1] (v2)" in message and "still serving" in message
        assert {chat(c, user=u)[1] for u in users} == {"v1"}
        assert stats(url)["v2"]["weight"] == 0.0

        # Only admin keys may change the table.
        assert (
            httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {CLIENT_KEY}"}).status_code
            == 403
        )
        assert httpx.post(f"{url}/admin/reload").status_code == 401


def test_sighup_reloads_and_sigterm_stops_the_cli(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    cfg = route_config(tmp_path, table(versions, v1=1.0, v2=0.0), state_path=str(tmp_path / "ab.json"))
    port = free_port()
    command = [sys.executable, "-m", "orchestra.cli.route", f"versions_file={cfg.versions_file}", f"port={port}",
               f"api_keys_file={cfg.api_keys_file}", f"upstream_api_key={UPSTREAM_KEY}", f"state_path={cfg.state_path}"]  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k not in ("ORCHESTRA_API_KEYS", "ORCHESTRA_UPSTREAM_API_KEY")
    }
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert process.poll() is None, process.communicate()[0]
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60)
        c = client(url)
        assert chat(c, user="sig")[1] == "v1"
        write_yaml(Path(cfg.versions_file), table(versions, v1=0.0, v2=1.0))
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: stats(url)["v2"]["weight"] == 1.0)
        assert chat(c, user="sig")[1] == "v2"
        write_yaml(Path(cfg.versions_file), {"versions": []})  # refused: the process keeps serving v2
        process.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert chat(c, user="sig")[1] == "v2"
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 0, output
        assert "reload refused" in output and "no version answers clients" in output
        assert json.loads(Path(cfg.state_path).read_text())["versions"]["v2"]["requests"] == 2
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_cli_names_a_bad_table_and_a_missing_one(tmp_path: Path) -> None:
    bad = write_yaml(tmp_path / "v.yaml", {"versions": [{"name": "a", "url": "nope", "weight": 1}]})
    for args, expected in (([f"versions_file={bad}"], "versions[0] (a): 'url' must be an http(s) URL"),
                           ([], "versions_file: give the routing table: versions_file=<yaml>")):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "orchestra.cli.route", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        assert expected in " ".join(done.stdout.split()), done.stdout + done.stderr


# --- the proxy itself -----------------------------------------------------------------------------------


def test_streaming_passes_events_through_as_they_come(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    ups["v1"].chunk_gap_s = 0.25
    cfg = route_config(tmp_path, table(versions, v1=1.0))
    with (
        router(cfg) as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as h,
    ):
        c = client(url)
        started = time.monotonic()
        arrivals, text, rid = [], "", None
        with c.chat.completions.with_streaming_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True},
        ) as response:  # fmt: skip
            assert response.headers["x-orchestra-version"] == "v1"
            for chunk in response.parse():
                arrivals.append(time.monotonic() - started)
                rid = chunk.id
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                else:
                    assert chunk.usage is not None and chunk.usage.completion_tokens == 3
        assert text == "answer from v1"
        # Relayed as the version wrote them (5 gaps of 0.25 s), not gathered: the first came long before the last.
        assert arrivals[-1] - arrivals[0] > 0.9 and arrivals[0] < 0.6
        assert h.post("/v1/feedback", json={"id": rid, "thumbs": "up"}).status_code == 200

        # A client that leaves mid-stream: counted at once as 499, not when the version would have finished.
        ups["v1"].chunk_gap_s = 2.0
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with h.stream("POST", "/v1/chat/completions", json=body) as leaving:
            next(leaving.iter_raw())
        wait_for(
            lambda: 'code="499",endpoint="/v1/chat/completions"' in httpx.get(f"{url}/metrics").text, 1.5
        )
        assert stats(url)["v1"]["requests"] == 2

        ups["v1"].chunk_gap_s = 0.0
        pieces = [
            ch.choices[0].text
            for ch in c.completions.create(model="tiny", prompt="x", stream=True)
            if ch.choices
        ]
        assert "".join(pieces) == "answer from v1"
        plain = c.completions.create(model="tiny", prompt="x", max_tokens=4)
        assert plain.choices[0].text == "answer from v1" and plain.usage is not None
        metrics = httpx.get(f"{url}/metrics").text
        assert 'orchestra_time_to_first_token_seconds_count{model="tiny",version="v1"} 2.0' in metrics
        assert 'orchestra_completion_tokens_total{model="tiny",version="v1"} 6.0' in metrics


def test_auth_and_the_upstream_key(versions: dict, ups: dict[str, Upstream], tmp_path: Path) -> None:
    cfg = route_config(tmp_path, table(versions, v1=1.0))
    with router(cfg) as (url, _):
        with pytest.raises(openai.AuthenticationError):
            chat(client(url, key="wrong"))
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert ups["v1"].received == []
        unrouted = 'orchestra_requests_total{code="401",endpoint="/v1/chat/completions",model="",version="unrouted"} 1.0'
        assert unrouted in httpx.get(f"{url}/metrics").text  # refused before routing, still counted
        chat(client(url))
        sent = ups["v1"].received[-1]["headers"]
        assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the router's key, never the client's
    cfg = route_config(tmp_path, table(versions, v1=1.0), upstream_api_key="not-the-key")
    with router(cfg) as (url, _), pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        chat(client(url))  # the version's own 401 passes through


def test_errors_pass_through_and_a_dead_or_slow_version_is_502_or_504(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there
    document = table(versions, v1=1.0)
    document["versions"].append({"name": "dead", "url": f"http://127.0.0.1:{closed}", "weight": 0.0})
    cfg = route_config(tmp_path, document, upstream_timeout_s=0.5, max_body_bytes=2000)
    with router(cfg) as (url, _):
        c = client(url)
        with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist") as missing:
            c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "model_not_found"
        assert missing.value.response.headers["x-orchestra-version"] == "v1"
        with pytest.raises(openai.BadRequestError) as too_long:
            c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1000
            )
        assert too_long.value.param == "max_tokens"
        with pytest.raises(
            openai.InternalServerError, match="version v1 answered HTTP 500: Internal Server Error"
        ):
            c.chat.completions.create(model="crash", messages=[{"role": "user", "content": "hi"}])

        with pytest.raises(openai.InternalServerError, match="version dead is unreachable") as dead:
            chat(c, extra_headers={"X-Orchestra-Version": "dead"})
        assert dead.value.status_code == 502 and dead.value.code == "upstream_unreachable"
        ups["v1"].delay_s = 2.0
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError, match=r"did not answer within 0\.5 s") as slow:
            chat(c)
        assert slow.value.status_code == 504 and time.monotonic() - started < 1.5
        ups["v1"].delay_s = 0.0

        with pytest.raises(openai.APIStatusError, match="exceeds the limit of 2000 bytes") as big:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 3000}])
        assert big.value.status_code == 413
        bad_json = httpx.post(f"{url}/v1/chat/completions", content=b"[1, 2", headers={"Authorization": f"Bearer {CLIENT_KEY}"})  # fmt: skip
        assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
        nowhere = httpx.get(f"{url}/v1/nowhere")
        assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "not_found"
        counted = stats(url)
        assert (
            counted["dead"]["errors"] == 1 and counted["v1"]["errors"] == 2
        )  # the 500 and the 504, not the 4xx


def test_models_are_the_union_and_ready_needs_a_live_version(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    cfg = route_config(tmp_path, table(versions, v1=0.5, v2=0.5, v3="shadow"))
    with router(cfg) as (url, _):
        ids = sorted(m.id for m in client(url).models.list())
        assert ids == ["only-v1", "only-v2", "tiny"]  # a shadow's models are not offered
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 200 and ready.json()["versions"] == {"v1": True, "v2": True}
    dead = {"versions": [{"name": "gone", "url": f"http://127.0.0.1:{free_port()}", "weight": 1}]}
    with router(route_config(tmp_path, dead)) as (url, _):
        assert httpx.get(f"{url}/ready").status_code == 503
        with pytest.raises(openai.InternalServerError, match="no version answered"):
            client(url).models.list()


def test_sampled_requests_are_logged_with_their_version(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    log_path = tmp_path / "traffic.jsonl"
    cfg = route_config(tmp_path, table(versions, v1=0.5, v2=0.5), log_path=str(log_path), log_sample_rate=1.0)
    with router(cfg) as (url, _):
        c = client(url)
        ids = {chat(c, user=f"log-{i}", messages=[{"role": "user", "content": "mail me at ann@example.com"}])[2]
               for i in range(6)}  # fmt: skip
        streamed = list(c.completions.create(model="tiny", prompt="say", stream=True))
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    chats = [r for r in lines if r["endpoint"] == "/v1/chat/completions"]
    assert {r["id"] for r in chats} == ids
    for record in chats:
        assert record["messages"][-1] == {"role": "assistant", "content": f"answer from {record['version']}"}
        assert "ann@example.com" not in json.dumps(record)
    (completion,) = [r for r in lines if r["endpoint"] == "/v1/completions"]
    assert completion["id"] == streamed[0].id and completion["response"].startswith("answer from")


def test_only_the_last_responses_tracked_answers_take_feedback(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    cfg = route_config(tmp_path, table(versions, v1=1.0), responses_tracked=3)
    with (
        router(cfg) as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as h,
    ):
        ids = [chat(client(url), user=f"lru-{i}")[2] for i in range(4)]
        assert (
            h.post("/v1/feedback", json={"id": ids[0], "score": 1}).status_code == 404
        )  # the oldest is forgotten
        assert [h.post("/v1/feedback", json={"id": i, "score": 1}).status_code for i in ids[1:]] == [200] * 3


def test_latency_reservoir_is_bounded_and_a_uniform_sample() -> None:
    reservoir = Reservoir(LATENCY_RESERVOIR, random.Random(0))
    for x in range(100_000):
        reservoir.add(x / 100_000)
    assert len(reservoir.values) == LATENCY_RESERVOIR and reservoir.seen == 100_000
    assert reservoir.quantile(0.5) == pytest.approx(
        0.5, abs=0.04
    )  # of the whole stream, not its first values
    assert reservoir.quantile(0.95) == pytest.approx(0.95, abs=0.02)
    assert Reservoir(4, random.Random(0)).quantile(0.5) is None
