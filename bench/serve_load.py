"""Load test of orchestra-serve on loopback: latency, time to first token and tokens/s from 1 to 64 clients.

    python bench/serve_load.py                       # debug shape, concurrency 1 2 4 8 16 32 64, CPU
    python bench/serve_load.py --concurrency 1 16 --requests 32 --device cuda

A random-initialised model of the debug preset's shape (speed does not depend on the weights)
is written as a Hugging Face folder with a byte-level BPE trained on Python standard-library
sources (as bench/eval_harness.py does), and served by `orchestra-serve` in its own process:

- ``batched``: continuous batching (max_batch_size 64), the server under test at every level;
- ``one-at-a-time``: the same server with max_batch_size 1, at --baseline-concurrency (16), so
  the ratio of the two is measured side by side in one run on the same requests;
- ``queue``: max_batch_size 4 and max_queue 4 at concurrency 64, to show clean 429s above the
  queue limit (and nothing else).

Each level sends ``--requests`` streaming /v1/completions requests (``max(requests, 2 x
concurrency)``), ``--clients`` at a time, greedy, max_tokens ``--max-tokens``, prompts of 20-120
tokens. Latency is request start to the last byte, TTFT start to the first text chunk, tokens
the server's own usage counts; tokens/s is completion tokens over the level's wall time. Rows go
to bench/results/serve_load_<device>.csv and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.benchlib import append_csv  # noqa: E402
from bench.eval_harness import corpus, device_name, write_folder  # noqa: E402

CSV_FIELDS = [
    "date", "device", "torch", "threads", "shape", "params_m", "server", "max_batch_size", "max_queue",
    "concurrency", "requests", "ok", "rejected_429", "other_errors", "completion_tokens", "wall_s",
    "tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p95_s", "latency_p99_s", "ttft_p50_s",
    "ttft_p95_s", "ttft_p99_s", "mean_batch", "load_1min_before",
]  # fmt: skip
KEY = "bench-key"


@dataclass
class Level:
    server: str
    max_batch_size: int
    max_queue: int
    concurrency: int
    requests: int
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    mean_batch: float = 0.0

    def row(self) -> dict[str, Any]:
        ok = self.codes.count(200)
        return {
            "server": self.server, "max_batch_size": self.max_batch_size, "max_queue": self.max_queue,
            "concurrency": self.concurrency, "requests": self.requests, "ok": ok,
            "rejected_429": self.codes.count(429), "other_errors": len(self.codes) - ok - self.codes.count(429),
            "completion_tokens": self.tokens, "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens / self.wall_s, 1), "requests_per_s": round(ok / self.wall_s, 2),
            **{f"latency_p{q}_s": round(quantile(self.latencies, q / 100), 4) for q in (50, 95, 99)},
            **{f"ttft_p{q}_s": round(quantile(self.ttfts, q / 100), 4) for q in (50, 95, 99)},
            "mean_batch": round(self.mean_batch, 2),
        }  # fmt: skip


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """orchestra-serve in its own process (its own cores and GIL, apart from the load generator)."""

    def __init__(self, folder: Path, max_batch_size: int, max_queue: int, args: argparse.Namespace) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "ORCHESTRA_API_KEYS": KEY, "OMP_NUM_THREADS": str(args.threads)}
        command = [
            sys.executable, "-m", "orchestra.cli.serve", f"ckpt={folder}", "model_name=bench", f"port={self.port}",
            f"max_batch_size={max_batch_size}", f"max_queue={max_queue}", f"device={args.device}",
            f"max_tokens_limit={args.max_tokens}", f"default_max_tokens={args.max_tokens}", "request_timeout_s=600",
        ]  # fmt: skip
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    async def ready(self, client: Any) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if (await client.get(self.url + "/ready")).status_code == 200:
                    return
            except Exception:  # not listening yet
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("server not ready after 300 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: Any, url: str, prompt: list[int], max_tokens: int, level: Level) -> None:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    start = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            level.codes.append(response.status_code)
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            if chunk.get("usage"):
                level.tokens += chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    level.codes.append(200)
    level.latencies.append(end - start)
    level.ttfts.append((first or end) - start)


async def batch_size_mean(client: Any, url: str) -> tuple[float, float]:
    """(sum, count) of the server's orchestra_batch_size histogram."""
    text = (await client.get(url + "/metrics")).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("orchestra_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("orchestra_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


async def run_level(
    client: Any, server: ServerProcess, level: Level, prompts: list[list[int]], max_tokens: int
) -> None:
    queue = list(range(level.requests))
    before = await batch_size_mean(client, server.url)

    async def worker() -> None:
        while queue:
            i = queue.pop()
            await one_request(client, server.url, prompts[i % len(prompts)], max_tokens, level)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(level.concurrency)))
    level.wall_s = time.perf_counter() - start
    after = await batch_size_mean(client, server.url)
    steps = after[1] - before[1]
    level.mean_batch = (after[0] - before[0]) / steps if steps else 0.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--baseline-concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least 2 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--corpus-chars", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-queue-test", action="store_true")
    p.add_argument("--csv", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


async def measure(args: argparse.Namespace, folder: Path, prompts: list[list[int]]) -> list[Level]:
    import httpx

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    levels: list[Level] = []
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        plans: list[tuple[str, int, int, list[int]]] = [("batched", 64, 256, list(args.concurrency))]
        plans.append(("one-at-a-time", 1, 256, [args.baseline_concurrency]))
        if not args.no_queue_test:
            plans.append(("queue", 4, 4, [64]))
        for name, batch, queue, concurrencies in plans:
            server = ServerProcess(folder, batch, queue, args)
            try:
                await server.ready(client)
                await run_level(
                    client, server, Level(name, batch, queue, 2, 4), prompts, args.max_tokens
                )  # warm-up
                for c in concurrencies:
                    requests = max(args.requests, 2 * c) if name != "queue" else 4 * c
                    level = Level(name, batch, queue, c, requests)
                    await run_level(client, server, level, prompts, args.max_tokens)
                    levels.append(level)
                    r = level.row()
                    print(f"{name:>14} c={c:<3} ok={r['ok']} 429={r['rejected_429']} tok/s={r['tokens_per_s']} "
                          f"p50={r['latency_p50_s']} p99={r['latency_p99_s']} ttft50={r['ttft_p50_s']} "
                          f"batch={r['mean_batch']}", flush=True)  # fmt: skip
            finally:
                server.stop()
    return levels


def main(argv: Sequence[str] | None = None) -> list[Level]:
    args = parse_args(argv)
    import torch

    from orchestra.data.tokenizer import train_bpe
    from orchestra.model.config import ModelConfig

    cfg = ModelConfig(name="bench-serve", dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=args.seq)  # fmt: skip
    cfg.validate()
    texts = corpus(args.corpus_chars)
    tokenizer = train_bpe(texts, args.vocab, num_documents=len(texts))
    folder, params = write_folder(cfg, tokenizer, Path(tempfile.mkdtemp(prefix="orchestra-serve-bench-")) / "hf", args.seed)  # fmt: skip
    rng = random.Random(args.seed)
    ids = [i for t in texts[:50] for i in tokenizer.encode(t).ids]
    room = args.seq - args.max_tokens
    prompts = []
    for _ in range(64):
        n = rng.randint(20, min(120, room))
        start = rng.randrange(0, len(ids) - n)
        prompts.append(ids[start : start + n])
    load_before = os.getloadavg()[0]
    levels = asyncio.run(measure(args, folder, prompts))

    device = device_name(args.device)
    shape = f"dim={args.dim} layers={args.layers} heads={args.heads} kv_heads={args.kv_heads} ffn={args.ffn} seq={args.seq} vocab={args.vocab}"  # fmt: skip
    base = {"date": dt.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "threads": args.threads, "shape": shape, "params_m": round(params / 1e6, 2),
            "load_1min_before": round(load_before, 2)}  # fmt: skip
    path = (
        args.csv
        or ROOT
        / "bench"
        / "results"
        / f"serve_load_{'cuda' if args.device.startswith('cuda') else 'cpu'}.csv"
    )
    append_csv(path, CSV_FIELDS, [{**base, **level.row()} for level in levels])
    print(f"\nDevice: {device} — {base['date']} — torch {torch.__version__}; {params / 1e6:.1f} M parameters ({shape}); "
          f"server threads {args.threads}; load average before {base['load_1min_before']}\n")  # fmt: skip
    print(markdown(levels))
    ratio = continuous_ratio(levels, args.baseline_concurrency)
    if ratio is not None:
        print(
            f"\ncontinuous batching / one at a time at concurrency {args.baseline_concurrency}: {ratio:.2f}x tokens/s"
        )
    print(f"appended to {path}")
    return levels


def continuous_ratio(levels: Sequence[Level], concurrency: int) -> float | None:
    rows = {(lv.server, lv.concurrency): lv.row() for lv in levels}
    batched, single = rows.get(("batched", concurrency)), rows.get(("one-at-a-time", concurrency))
    if not batched or not single:
        return None
    return float(batched["tokens_per_s"]) / float(single["tokens_per_s"])


def markdown(levels: Sequence[Level]) -> str:
    head = ("| server | batch | queue | clients | requests | ok | 429 | other errors | tokens/s | req/s | "
            "p50 s | p95 s | p99 s | TTFT p50 s | TTFT p95 s | TTFT p99 s | mean batch |")  # fmt: skip
    lines = [head, "|" + "---|" * 17]
    for lv in levels:
        r = lv.row()
        lines.append(
            f"| {r['server']} | {r['max_batch_size']} | {r['max_queue']} | {r['concurrency']} | {r['requests']} | "
            f"{r['ok']} | {r['rejected_429']} | {r['other_errors']} | {r['tokens_per_s']:,} | {r['requests_per_s']} | "
            f"{r['latency_p50_s']} | {r['latency_p95_s']} | {r['latency_p99_s']} | {r['ttft_p50_s']} | "
            f"{r['ttft_p95_s']} | {r['ttft_p99_s']} | {r['mean_batch']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
