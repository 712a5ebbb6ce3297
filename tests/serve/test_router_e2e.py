"""The router in front of real orchestra-serve versions (two different models and a shadow copy):
answers through the router are each version's own, streams pass through, feedback is attributed,
and both the router's and the servers' metrics count the traffic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from orchestra.config import ServeConfig
from orchestra.serve.app import Server, create_app
from orchestra.train.checkpoint.load import load_for_eval
from tests.serve.ab import UPSTREAM_KEY, chat, client, route_config, router, stats
from tests.serve.live import running, tiny_checkpoint


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, Server]]]:
    """v1 and v2: two differently initialised tiny models; v3: v2's weights again, as a shadow."""
    root = tmp_path_factory.mktemp("e2e")
    keys = root / "upstream-keys.txt"
    keys.write_text(UPSTREAM_KEY + "\n")
    ckpts = {"v1": tiny_checkpoint(root / "a.ckpt", seed=1), "v2": tiny_checkpoint(root / "b.ckpt", seed=2)}
    ckpts["v3"] = ckpts["v2"]
    with ExitStack() as stack:
        out = {}
        for name, ckpt in ckpts.items():
            cfg = ServeConfig(ckpt=str(ckpt), model_name="tiny", version=name, api_keys_file=str(keys),
                              default_max_tokens=8)  # fmt: skip
            server = Server(cfg, load_for_eval(ckpt))
            out[name] = (stack.enter_context(running(create_app(server))), server)
        yield out


def test_router_in_front_of_real_servers(
    servers: dict[str, tuple[str, Server]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ORCHESTRA_API_KEYS", raising=False)
    document = {
        "versions": [
            {"name": "v1", "url": servers["v1"][0], "weight": 0.5},
            {"name": "v2", "url": servers["v2"][0], "weight": 0.5},
            {"name": "v3", "url": servers["v3"][0], "shadow": True},
        ]
    }
    with router(route_config(tmp_path, document)) as (url, _):
        c = client(url)
        direct = {
            name: client(servers[name][0], key=UPSTREAM_KEY).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "def f(x):"}], max_tokens=8, temperature=0
            )
            for name in ("v1", "v2")
        }
        assert direct["v1"].choices[0].message.content != direct["v2"].choices[0].message.content
        seen: dict[str, int] = {"v1": 0, "v2": 0}
        ids = {}
        for i in range(40):
            text, version, response_id = chat(
                c, user=f"user-{i}", messages=[{"role": "user", "content": "def f(x):"}], temperature=0
            )
            assert text == direct[version].choices[0].message.content  # the version's own answer
            seen[version] += 1
            ids[response_id] = version
        assert seen["v1"] > 5 and seen["v2"] > 5

        stream = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "def f(x):"}], max_tokens=8, temperature=0,
            stream=True, user="user-0",
        )  # fmt: skip
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        first_version = ids[next(iter(ids))]
        assert streamed == direct[first_version].choices[0].message.content

        headers = {"Authorization": "Bearer client-secret"}
        for response_id, version in ids.items():
            score = 1.0 if version == "v2" else 0.0
            r = httpx.post(f"{url}/v1/feedback", json={"id": response_id, "score": score}, headers=headers)
            assert r.status_code == 200, r.text
        by_version = stats(url)
        assert by_version["v1"]["requests"] >= seen["v1"] and by_version["v2"]["requests"] >= seen["v2"]
        score = {name: by_version[name]["feedback"]["score"] for name in ("v1", "v2")}
        assert (score["v1"]["n"], score["v1"]["mean"]) == (seen["v1"], 0.0)  # attributed to the right version
        assert (score["v2"]["n"], score["v2"]["mean"]) == (seen["v2"], 1.0)

        # The servers counted what the router sent them; the shadow got a copy of every request.
        metrics = {name: httpx.get(servers[name][0] + "/metrics").text for name in ("v1", "v2", "v3")}
        assert 'version="v1"' in metrics["v1"] and 'code="200"' in metrics["v1"]
        shadow_count = sum(
            float(line.split()[-1])
            for line in metrics["v3"].splitlines()
            if line.startswith("orchestra_requests_total{") and 'code="200"' in line
        )
        assert shadow_count >= 30  # mirrored in the background; most have landed by now
