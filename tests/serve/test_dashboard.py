"""The router's /dashboard: served offline-ready, and rendered by headless Chromium with /api/stats' numbers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from orchestra.serve.dashboard import dashboard_html
from tests.serve.ab import CLIENT_KEY, fresh_versions, route_config, router, running_versions, table, wait_for
from tests.serve.upstream import Upstream

versions = pytest.fixture(scope="module")(running_versions)
ups = pytest.fixture(fresh_versions)


def test_page_is_self_contained() -> None:
    """No script, style, font or image from elsewhere: the page must work without internet access."""
    page = dashboard_html()
    assert re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) is None
    assert "@import" not in page and "url(" not in page
    assert 'fetch("/api/stats"' in page


def test_router_serves_the_page(versions: dict, ups: dict[str, Upstream], tmp_path: Path) -> None:
    with router(route_config(tmp_path, table(versions, v1=1.0))) as (url, _):
        reply = httpx.get(f"{url}/dashboard")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assert reply.text == dashboard_html()


class Cells(HTMLParser):
    """Every element with data-field (by version and field) or with an id, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], dict[str, Any]] = {}
        self.ids: dict[str, dict[str, Any]] = {}
        self.open: list[dict[str, Any]] = []
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        entry = {"attrs": a, "text": ""}
        if "data-field" in a:
            self.cells[(str(a.get("data-version")), str(a["data-field"]))] = entry
        if "id" in a:
            self.ids[str(a["id"])] = entry
        if tag not in ("meta", "link", "br", "img", "input"):
            self.open.append(entry)

    def handle_endtag(self, tag: str) -> None:
        if self.open:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        for entry in self.open:
            entry["text"] += data


def chromium() -> str:
    """The chromium binary; installed from Debian's packages where it is missing (CI runs as root)."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], check=True, env=env,
                       timeout=1200)  # fmt: skip
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and cannot be installed here (not root, or no apt-get)")
    return found


def browse(binary: str, url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               "--window-size=1280,900", "--virtual-time-budget=5000", *args, url]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def value(cell: dict[str, Any], key: str = "data-value") -> float | None:
    raw = cell["attrs"][key]
    return None if raw == "" else float(raw)


@pytest.mark.slow
def test_chromium_renders_the_numbers_of_api_stats(
    versions: dict, ups: dict[str, Upstream], tmp_path: Path
) -> None:
    binary = chromium()
    cfg = route_config(tmp_path, table(versions, v1=0.6, v2=0.4, v3="shadow"))
    rng = np.random.default_rng(1)
    with (
        router(cfg) as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as h,
    ):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
        for i in range(120):
            raw = c.chat.completions.with_raw_response.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], user=f"d{i}"
            )
            version, rid = raw.headers["x-orchestra-version"], raw.parse().id
            score = float(np.clip(rng.normal(0.8 if version == "v2" else 0.4, 0.1), 0, 1))
            h.post(
                "/v1/feedback", json={"id": rid, "score": score, "thumbs": "up" if score > 0.6 else "down"}
            )
        wait_for(lambda: h.get("/api/stats").json()["versions"][2]["requests"] == 120)
        stats = h.get("/api/stats").json()
        shot = tmp_path / "dashboard.png"
        browse(binary, f"{url}/dashboard", tmp_path / "profile-shot", f"--screenshot={shot}")
        dom = browse(binary, f"{url}/dashboard", tmp_path / "profile-dom", "--dump-dom").stdout
        assert h.get("/api/stats").json() == stats  # nothing changed while the page was read

    import matplotlib.image

    assert shot.stat().st_size > 20_000
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1280)
    assert (
        len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50
    )  # text, tables, bars: not a blank page

    page = Cells()
    page.feed(dom)
    assert page.body.get("data-loaded") == "1"
    assert page.ids["status"]["attrs"]["data-state"] == "ok"
    assert page.ids["control"]["attrs"]["data-value"] == "v1"
    assert value(page.ids["total-requests"]) == stats["requests"] == 120
    for v in stats["versions"]:
        name = v["name"]
        for key in (
            "weight",
            "weight_share",
            "share",
            "requests",
            "errors",
            "latency_p50_s",
            "latency_p95_s",
        ):
            assert value(page.cells[(name, key)]) == v[key], (name, key)
        assert page.cells[(name, "requests")]["text"] == str(v["requests"])
        assert page.cells[(name, "role")]["text"] == (
            "control" if v["control"] else "shadow" if v["shadow"] else "treatment"
        )
        if not v["shadow"]:
            for metric in ("score", "thumbs"):
                fb = v["feedback"][metric]
                assert value(page.cells[(name, f"feedback.{metric}.n")]) == fb["n"]
                assert value(page.cells[(name, f"feedback.{metric}.mean")]) == fb["mean"]
                interval = page.cells[(name, f"feedback.{metric}.ci")]
                assert (value(interval, "data-low"), value(interval, "data-high")) == (
                    fb["ci_low"],
                    fb["ci_high"],
                )
        for metric, result in (v["comparison"] or {}).items():
            prefix = f"comparison.{metric}."
            assert value(page.cells[(name, prefix + "p_value")]) == result["p_value"]
            assert value(page.cells[(name, prefix + "difference")]) == result["difference"]
            interval = page.cells[(name, prefix + "ci")]
            assert (value(interval, "data-low"), value(interval, "data-high")) == (
                result["ci_low"],
                result["ci_high"],
            )
            assert page.cells[(name, prefix + "decision")]["text"] == result["decision"]
    by_name = {v["name"]: v for v in stats["versions"]}
    assert by_name["v2"]["comparison"]["score"]["decision"] == "treatment better"  # the page shows a verdict
    assert (("v1", "comparison.score.decision") not in page.cells) and (
        "v3",
        "feedback.score.n",
    ) not in page.cells
