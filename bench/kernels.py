"""Fused kernels against the tools users would otherwise pick, on one CUDA GPU, in bf16.

    python bench/kernels.py                 # full sweep: hidden 2k-16k, vocab 32k-256k, tokens 4k-32k
    python bench/kernels.py --quick         # a few shapes per op, a few minutes
    python bench/kernels.py --ops linear_cross_entropy --providers ours eager liger

For every op and shape, forward + backward of: the eager PyTorch reference (the model's torch
ops), ``torch.compile`` of that reference, Liger-Kernel (when installed) and ours. Time is the
median of ``triton.testing.do_bench``; memory is the peak allocated during one forward + backward
above what the inputs already hold (``torch.cuda.max_memory_allocated`` delta). Rows go to
bench/results/kernels-<device>-<date>.csv; a markdown table with ours/peer ratios (below 1: ours
is faster or smaller) and a check against the issue's targets are printed for docs/benchmarks.md.
A shape a provider cannot fit is recorded as ``oom``, not fatal.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OPS = ("rms_norm", "rope", "swiglu", "linear_cross_entropy")
PROVIDERS = ("ours", "eager", "compile", "liger")
PEERS = PROVIDERS[1:]
HEAD_DIM = 128  # rope: heads = hidden / 128, GQA with 4 query heads per kv head
SEQ_LEN = 4096  # rope: tokens = batch * 4096
EPS = 1e-6
FIELDS = ["date", "device", "torch", "triton", "liger", "op", "shape", "tokens", "hidden", "vocab", "dtype",
          "provider", "status", "median_ms", "peak_mem_mb"]  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One op at one size; inputs are built only when the case runs."""

    op: str
    tokens: int
    hidden: int
    vocab: int | None = None

    @property
    def shape(self) -> str:
        if self.op == "linear_cross_entropy":
            return f"N={self.tokens} D={self.hidden} V={self.vocab}"
        if self.op == "rope":
            h = self.hidden // HEAD_DIM
            return f"B={self.tokens // SEQ_LEN} T={SEQ_LEN} H={h} Hkv={max(1, h // 4)} hd={HEAD_DIM}"
        if self.op == "swiglu":
            return f"N={self.tokens} F={ffn_dim(self.hidden)}"
        return f"N={self.tokens} D={self.hidden}"


def ffn_dim(hidden: int) -> int:
    """Llama's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 256."""
    return -(-int(8 * hidden / 3) // 256) * 256


def cases(quick: bool, ops: Sequence[str] = OPS) -> list[Case]:
    """The sweep: element-wise ops over tokens x hidden; the loss over tokens x vocab (and hidden).

    The issue's headline loss shape (vocab 128k, 16k tokens, hidden 4096) is in both sweeps.
    """
    if quick:
        grid = [(4096, 2048), (4096, 4096)]
        lce = [(4096, 2048, 32768), (16384, 4096, 131072)]
    else:
        grid = [(t, h) for t in (4096, 16384, 32768) for h in (2048, 4096, 8192, 16384)]
        lce = [(t, 4096, v) for v in (32768, 131072, 262144) for t in (4096, 16384, 32768)]
        lce += [(16384, h, 131072) for h in (2048, 8192, 16384)]
    out: list[Case] = []
    for op in ops:
        if op == "linear_cross_entropy":
            out += [Case(op, t, h, v) for t, h, v in lce]
        else:
            out += [Case(op, t, h) for t, h in grid]
    return out


def providers_for(op: str) -> dict[str, Callable[..., Any]]:
    """Callables per provider for one op, each taking the case's inputs; Liger only if importable."""
    import torch

    from orchestra.kernels import linear_cross_entropy, rms_norm, rope, swiglu
    from orchestra.model import ops

    refs = {
        "rms_norm": (ops.torch_rms_norm, rms_norm.rms_norm),
        "rope": (ops.torch_apply_rope, rope.apply_rope),
        "swiglu": (ops.torch_swiglu, swiglu.swiglu),
        "linear_cross_entropy": (ops.torch_linear_cross_entropy, linear_cross_entropy.linear_cross_entropy),
    }  # fmt: skip
    ref, ours = refs[op]
    table: dict[str, Callable[..., Any]] = {
        "ours": ours,
        "eager": ref,
        "compile": torch.compile(ref, dynamic=False),
    }
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import functional as lf

        table["liger"] = {
            "rms_norm": lambda x, w, eps: lf.liger_rms_norm(x, w, eps),
            # Liger wants cos/sin [1, T, hd] (or [B, T, hd]).
            "rope": lambda q, k, cos, sin: lf.liger_rope(q, k, cos[None], sin[None]),
            "swiglu": lf.liger_swiglu,
            "linear_cross_entropy": lambda h, w, t: lf.liger_fused_linear_cross_entropy(
                h, w, t, ignore_index=-100
            ),
        }[op]
    return table


def make_inputs(case: Case, device: str) -> tuple[tuple[Any, ...], list[Any], Callable[[Any], None]]:
    """(call arguments, leaves to reset between runs, backward given the op's output)."""
    import torch

    bf16 = torch.bfloat16
    n, d = case.tokens, case.hidden

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, dtype=bf16) * scale).requires_grad_(True)

    if case.op == "rms_norm":
        x, w = leaf(n, d), leaf(d)
        dy = torch.randn(n, d, device=device, dtype=bf16)
        return (x, w, EPS), [x, w], lambda y: y.backward(dy)
    if case.op == "swiglu":
        f = ffn_dim(d)
        g, u = leaf(n, f), leaf(n, f)
        dy = torch.randn(n, f, device=device, dtype=bf16)
        return (g, u), [g, u], lambda y: y.backward(dy)
    if case.op == "rope":
        from orchestra.model.transformer import rope_cache

        b, h = n // SEQ_LEN, d // HEAD_DIM
        hkv = max(1, h // 4)
        # The model's layout: [B, H, T, hd] views of [B, T, H, hd] projections.
        q = leaf(b, SEQ_LEN, h, HEAD_DIM).detach().transpose(1, 2).requires_grad_(True)
        k = leaf(b, SEQ_LEN, hkv, HEAD_DIM).detach().transpose(1, 2).requires_grad_(True)
        cos, sin = rope_cache(HEAD_DIM, SEQ_LEN, 10000.0, device)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        return (q, k, cos, sin), [q, k], lambda out: torch.autograd.backward(out, (dq, dk))
    h, w = leaf(n, d), leaf(case.vocab or 0, d, scale=0.02)
    t = torch.randint(0, case.vocab or 1, (n,), device=device)
    t[::20] = -100  # some padding, as real batches have
    return (h, w, t), [h, w], lambda loss: loss.backward()


def measure(fn: Callable[..., Any], args: tuple[Any, ...], leaves: list[Any], backward: Callable[[Any], None],
            rep_ms: int) -> tuple[float, float]:  # fmt: skip
    """(median ms, peak MB above the inputs) of forward + backward."""
    import torch
    import triton.testing

    def step() -> None:
        backward(fn(*args))

    step()  # warm-up: Triton autotune / torch.compile happen here, outside the measurement
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in leaves:
        t.grad = None
    ms = triton.testing.do_bench(step, warmup=25, rep=rep_ms, grad_to_none=leaves, return_mode="median")
    return float(ms), peak_mb


def run_case(case: Case, providers: Sequence[str], rep_ms: int) -> list[dict[str, Any]]:
    """One row per provider: ok with numbers, or oom / error with none."""
    import torch

    table = providers_for(case.op)
    rows = []
    for name in providers:
        if name not in table:
            continue
        row: dict[str, Any] = {"op": case.op, "shape": case.shape, "tokens": case.tokens, "hidden": case.hidden,
                               "vocab": case.vocab or "", "dtype": "bf16", "provider": name,
                               "status": "ok", "median_ms": "", "peak_mem_mb": ""}  # fmt: skip
        try:
            args, leaves, backward = make_inputs(case, "cuda")
            ms, mb = measure(table[name], args, leaves, backward, rep_ms)
            row.update(median_ms=round(ms, 4), peak_mem_mb=round(mb, 1))
        except torch.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as e:  # a peer that fails on a shape is a result, not a crash
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        finally:
            args = leaves = backward = None  # type: ignore[assignment]
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {case.op:22s} {case.shape:40s} {name:8s} {row['status']:4s} {row['median_ms']} ms "
              f"{row['peak_mem_mb']} MB", flush=True)  # fmt: skip
    return rows


def _cell(rows: dict[str, dict[str, Any]], peer: str, key: str, scale: float = 1.0) -> str:
    """'value (ours/peer)' for a peer, or its status when it did not run."""
    r = rows.get(peer)
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"].split(":")[0]
    value = float(r[key]) / scale
    ours = rows.get("ours")
    if peer == "ours" or ours is None or ours["status"] != "ok" or not float(r[key]):
        return f"{value:.3g}"
    return f"{value:.3g} ({float(ours[key]) / float(r[key]):.2f})"


def markdown(rows: list[dict[str, Any]]) -> str:
    """Time and peak-memory table, one line per (op, shape); (x) = ours / peer."""
    head = ["op", "shape"] + [f"{p} ms" for p in PROVIDERS] + [f"{p} GB" for p in PROVIDERS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"]), {})[r["provider"]] = r
    for (op, shape), by in groups.items():
        cells = [op, shape] + [_cell(by, p, "median_ms") for p in PROVIDERS]
        cells += [_cell(by, p, "peak_mem_mb", 1024.0) for p in PROVIDERS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_report(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, shape by shape: ours <= compile and liger in time, <= liger in memory;
    linear_cross_entropy at V=128k, N=16k: <= 1/4 of eager's memory and <= 1.1x eager's time."""
    by: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok":
            by.setdefault((r["op"], r["shape"]), {})[r["provider"]] = r
    out = []
    for (op, shape), p in by.items():
        ours = p.get("ours")
        if ours is None:
            continue
        checks = [(peer, "median_ms", 1.0) for peer in ("compile", "liger")] + [("liger", "peak_mem_mb", 1.0)]
        if op == "linear_cross_entropy" and ours["vocab"] == 131072 and ours["tokens"] == 16384:
            checks += [("eager", "peak_mem_mb", 0.25), ("eager", "median_ms", 1.1)]
        for peer, key, limit in checks:
            if peer not in p:
                continue
            ratio = float(ours[key]) / max(float(p[peer][key]), 1e-9)
            verdict = "ok  " if ratio <= limit else "MISS"
            what = "time" if key == "median_ms" else "memory"
            out.append(f"{verdict} {op} {shape}: {what} ours/{peer} = {ratio:.2f} (target <= {limit:g})")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few shapes per op instead of the full sweep")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--rep", type=int, default=200, help="do_bench measuring time per run, ms")
    parser.add_argument(
        "--out", type=Path, default=None, help="CSV path (default bench/results/kernels-<device>-<date>.csv)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/kernels.py needs a CUDA GPU (none visible to this torch build); nothing was run"
        )
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench/kernels.py: unset TRITON_INTERPRET; interpreter timings mean nothing")
    import triton

    torch._dynamo.config.cache_size_limit = 256  # one compiled graph per shape, never a silent eager fallback
    device = torch.cuda.get_device_name()
    date = dt.date.today().isoformat()
    liger = "-"
    if importlib.util.find_spec("liger_kernel") is not None:
        from importlib.metadata import version

        liger = version("liger-kernel")
    meta = {
        "date": date,
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "liger": liger,
    }
    print(
        f"Device: {device} — {date} — torch {torch.__version__}, triton {triton.__version__}, liger {liger}"
    )

    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = args.out or ROOT / "bench" / "results" / f"kernels-{slug}-{date}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    # Rows are written case by case, so a run stopped part-way (a time box) keeps what it measured.
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for case in cases(args.quick, args.ops):
            new = [{**meta, **r} for r in run_case(case, args.providers, args.rep)]
            writer.writerows(new)
            f.flush()
            rows += new
    print(f"\nDevice: {device} — {date} — bf16, forward+backward; cells: value (ours/peer)\n")
    print(markdown(rows))
    print("\nTargets:\n" + "\n".join(target_report(rows)))
    print(f"\nCSV: {out}")


if __name__ == "__main__":
    sys.exit(main())
