"""`orchestra-serve` as a process: start, serve, and SIGTERM (requests in flight finish, new ones are refused)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from orchestra.cli.serve import vllm_command
from orchestra.config import ServeConfig
from tests.serve.live import free_port, tiny_checkpoint

pytestmark = pytest.mark.slow


def _start(ckpt: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "ORCHESTRA_API_KEYS": "k1", "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        "-m",
        "orchestra.cli.serve",
        f"ckpt={ckpt}",
        f"port={port}",
        "model_name=tiny",
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read() if proc.stdout else "exited")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server not ready")


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(ckpt, port, "max_tokens_limit=60", "default_max_tokens=16", "shutdown_grace_s=30")
    try:
        _wait_ready(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=60)
        assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices
        results: list[object] = []

        def long_request() -> None:
            try:
                r = client.completions.create(model="tiny", prompt="x", max_tokens=60, temperature=0)
                results.append(r.choices[0].finish_reason)
            except Exception as err:  # recorded: the test fails on it below
                results.append(err)

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(0.3)  # the request is in the engine
        proc.send_signal(signal.SIGTERM)
        # The listening socket closes once the event loop handles the signal (at once, or a
        # moment later on a loaded machine): from then on a new connection is refused.
        refused, deadline = False, time.monotonic() + 15
        while not refused and time.monotonic() < deadline:
            try:
                httpx.get(url + "/health", timeout=2)
                time.sleep(0.05)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                refused = True
        assert refused, "the server kept accepting connections after SIGTERM"
        worker.join(60)
        assert results and results[0] in ("length", "stop"), results
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_config_is_one_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestra.cli.serve", f"ckpt={tmp_path / 'missing.ckpt'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        proc.returncode == 2
        and "does not exist" in proc.stdout
        and "Traceback" not in proc.stdout + proc.stderr
    )
    proc = subprocess.run(
        [sys.executable, "-m", "orchestra.cli.serve", f"ckpt={tmp_path}", "max_batch_size=0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "max_batch_size: must be a positive integer" in proc.stdout


def test_vllm_command_maps_the_settings(tmp_path: Path) -> None:
    cfg = ServeConfig(
        ckpt=str(tmp_path), model_name="m", host="0.0.0.0", port=9001, max_batch_size=32, seed=3,
        dtype="bfloat16", max_prompt_tokens=1000, max_tokens_limit=24, vllm_args=["--enforce-eager"],
    )  # fmt: skip
    cmd = vllm_command(cfg, tmp_path, ["k1", "k2"])
    assert cmd[:3] == ["vllm", "serve", str(tmp_path)]
    pairs = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert (
        pairs["--served-model-name"] == "m" and pairs["--port"] == "9001" and pairs["--max-num-seqs"] == "32"
    )
    assert pairs["--dtype"] == "bfloat16" and pairs["--max-model-len"] == "1024" and pairs["--seed"] == "3"
    assert cmd[cmd.index("--api-key") + 1 : cmd.index("--api-key") + 3] == ["k1", "k2"]
    assert cmd[-1] == "--enforce-eager"


def test_vllm_engine_serves_the_export(tmp_path: Path) -> None:
    """engine=vllm end to end where vLLM is installed (a GPU machine)."""
    pytest.importorskip("vllm")
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    port = free_port()
    proc = _start(ckpt, port, "engine=vllm")
    try:
        deadline = time.monotonic() + 600  # vLLM has no /ready: its /health answers once loaded
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "vllm exited"
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        assert client.completions.create(model="tiny", prompt="a", max_tokens=4).choices[0].text is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
