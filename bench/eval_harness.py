"""Our lm-eval LM (orchestra.eval.harness.OrchestraLM) against lm-eval's Hugging Face backend (HFLM).

    python bench/eval_harness.py                                  # default shape, 3 repeats, CPU
    python bench/eval_harness.py --repeats 5 --threads 2
    python bench/eval_harness.py --dim 768 --layers 12 --heads 12 --kv-heads 4 --ffn 2048 --device cuda

One process, one exported model, the same requests for both sides. A random-initialised
Llama-shaped model (orchestra.model.build.build_model; speed does not depend on the weights'
values) is written as a Hugging Face folder the way orchestra-export writes one (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), with a byte-level BPE trained here on
Python standard-library sources (orchestra.data.tokenizer.train_bpe). Ours loads the folder with
orchestra.eval.model.from_hf_folder; lm-eval's ``HFLM(pretrained=folder, dtype="float32")`` loads
it with transformers. Both get the same batch size and the same number of torch threads (set once
for the process).

Three workloads, each a list of lm-eval ``Instance`` objects passed to the LM's own method (so
lm-eval's tokenization and request handling are inside the timing for both):

- loglikelihood: ``--requests`` (8) multiple-choice questions, each a context of ~100-400 tokens of
  standard-library text with 4 continuations of 2-6 tokens (4 requests per question);
- loglikelihood_rolling: ``--documents`` (3) documents of ~2.5 contexts each (several windows each);
- generate_until: ``--prompts`` (6) prompts of ~30-130 tokens, greedy, ``max_gen_toks`` 32, until "\\n\\n".

Each workload runs ``--repeats`` times per side, interleaved (ours, HF, ours, HF, ...) after one
untimed warm-up call per side; the reported time is the median. requests/s counts lm-eval requests
(Instances); tokens/s counts context + continuation tokens (loglikelihood), document tokens
(rolling) and prompt + returned tokens (generation), the same numerator for both sides, so the
ratio (ours throughput over HF's = HF seconds / our seconds; above 1.0 we are faster) is the same
for either. The first repeat's outputs are compared: max |Δ log-likelihood| must be at most 1e-4
(for rolling documents, whose sums run to thousands of fp32 terms, at most 1e-4 per scored token)
and every greedy generation must be the same text, else the run exits with status 1 after
writing its rows (check=FAIL). Wall seconds are the headline; the process's CPU seconds and the
1-minute load average before and after are recorded too, since another job on a small machine
moves wall times more than CPU times. Rows are appended to --csv and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchlib import append_csv  # noqa: E402

RESULTS = ROOT / "bench" / "results"  # eval_harness_cpu.csv / eval_harness_cuda.csv by --device
WORKLOADS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
TOLERANCE = 1e-4  # |Δ log-likelihood| (per scored token for rolling documents)
CHOICES = 4
CSV_FIELDS = [
    "date", "device", "torch", "transformers", "lm_eval", "threads", "shape", "params_m", "batch_size",
    "workload", "requests", "tokens", "repeats", "ours_s", "hf_s", "ours_cpu_s", "hf_cpu_s", "ours_requests_per_s",
    "hf_requests_per_s", "ours_tokens_per_s", "hf_tokens_per_s", "ratio", "cpu_ratio", "max_abs_diff", "tolerance",
    "mismatches", "check", "load_1min_before", "load_1min_after",
]  # fmt: skip


# --------------------------------------------------------------------------- the model folder


def model_config(args: argparse.Namespace) -> Any:  # -> ModelConfig
    from orchestra.model.config import ModelConfig

    cfg = ModelConfig(
        name="bench-eval",
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        ffn_dim=args.ffn,
        max_seq_len=args.seq,
    )
    cfg.validate()
    return cfg


def corpus(min_chars: int = 2_000_000) -> list[str]:
    """Python standard-library sources (sorted by name) until ``min_chars``: real text nobody wrote for this."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 2000:
            continue
        texts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    return texts


def write_folder(cfg: Any, tokenizer: Any, out: Path, seed: int) -> tuple[Path, int]:
    """A random-initialised model of ``cfg`` as a Hugging Face folder (orchestra-export's files); (folder, params)."""
    import torch
    from safetensors.torch import save_file

    from orchestra.config import padded_vocab_size
    from orchestra.data.tokenizer import EOS_TOKEN, vocab_size_of
    from orchestra.model.build import build_model
    from orchestra.model.hf import hf_config_dict, to_hf_state_dict

    vocab = padded_vocab_size(cfg, vocab_size_of(tokenizer))
    torch.manual_seed(seed)
    model = build_model(cfg, vocab, device="cpu")
    params = sum(p.numel() for p in model.parameters())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    hf_state = {k: v.contiguous().clone() for k, v in to_hf_state_dict(state, cfg).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    config = hf_config_dict(cfg, vocab, bos_id=eos_id, eos_id=eos_id, torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}) + "\n"
    )
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN}) + "\n"
    )
    return out, params


# --------------------------------------------------------------------------- the workloads


@dataclass
class Workload:
    """One workload's lm-eval requests (``args`` tuples) and the tokens its throughput counts."""

    name: str
    args: list[tuple[Any, ...]]
    tokens: int


def _piece(ids: list[int], rng: random.Random, length: int) -> list[int]:
    start = rng.randrange(0, len(ids) - length)
    return ids[start : start + length]


def build_workloads(
    tokenizer: Any,
    texts: Sequence[str],
    seq: int,
    questions: int,
    documents: int,
    prompts: int,
    max_gen_toks: int,
    seed: int,
) -> dict[str, Workload]:
    """The three workloads' requests from token slices of ``texts`` decoded back to text."""
    rng = random.Random(seed)
    ids: list[int] = []
    for source in texts:
        ids.extend(tokenizer.encode(source).ids)

    def text(n: int) -> str:
        return str(tokenizer.decode(_piece(ids, rng, n)))

    def count(s: str) -> int:
        return len(tokenizer.encode(s).ids)

    ctx_hi = max(8, min(400, seq - 8))
    ctx_lo = min(100, ctx_hi // 2)
    ll_args: list[tuple[Any, ...]] = []
    for _ in range(questions):
        context = text(rng.randint(ctx_lo, ctx_hi))
        for _ in range(CHOICES):
            ll_args.append((context, " " + text(rng.randint(2, 6)).strip()))
    ll_tokens = sum(count(c) + count(x) for c, x in ll_args)

    docs = [(text(int(2.5 * seq)),) for _ in range(documents)]
    doc_tokens = sum(count(d) for (d,) in docs)

    gen_hi = max(4, min(130, seq - max_gen_toks - 1))
    gen_lo = min(30, gen_hi // 2)
    kwargs = {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    gen_args = [(text(rng.randint(gen_lo, gen_hi)), dict(kwargs)) for _ in range(prompts)]
    gen_tokens = sum(count(p) for p, _ in gen_args)  # the returned tokens are added once known
    return {
        "loglikelihood": Workload("loglikelihood", ll_args, ll_tokens),
        "loglikelihood_rolling": Workload("loglikelihood_rolling", docs, doc_tokens),
        "generate_until": Workload("generate_until", gen_args, gen_tokens),
    }


def instances(workload: Workload) -> list[Any]:
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type=workload.name, doc={}, arguments=a, idx=i) for i, a in enumerate(workload.args)
    ]


def call(lm: Any, workload: Workload) -> list[Any]:
    """The LM's method for the workload on fresh Instances, without progress bars."""
    return list(getattr(lm, workload.name)(instances(workload), disable_tqdm=True))


# --------------------------------------------------------------------------- timing and checks


@dataclass
class Result:
    """One workload's timings (wall and process CPU seconds per repeat) and the equality check."""

    workload: str
    requests: int
    tokens: int
    ours_s: list[float]
    hf_s: list[float]
    ours_cpu_s: list[float]
    hf_cpu_s: list[float]
    max_abs_diff: float | None
    tolerance: str
    mismatches: int

    @property
    def ours(self) -> float:
        return statistics.median(self.ours_s)

    @property
    def hf(self) -> float:
        return statistics.median(self.hf_s)

    @property
    def ratio(self) -> float:
        """Our throughput over HF's (HF seconds / our seconds): above 1.0 we are faster."""
        return self.hf / self.ours

    @property
    def cpu_ratio(self) -> float:
        """The same from the process's CPU seconds (all threads): less moved by other jobs' load."""
        return statistics.median(self.hf_cpu_s) / statistics.median(self.ours_cpu_s)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def row(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "requests": self.requests,
            "tokens": self.tokens,
            "repeats": len(self.ours_s),
            "ours_s": round(self.ours, 6),
            "hf_s": round(self.hf, 6),
            "ours_cpu_s": round(statistics.median(self.ours_cpu_s), 6),
            "hf_cpu_s": round(statistics.median(self.hf_cpu_s), 6),
            "ours_requests_per_s": round(self.requests / self.ours, 3),
            "hf_requests_per_s": round(self.requests / self.hf, 3),
            "ours_tokens_per_s": round(self.tokens / self.ours, 1),
            "hf_tokens_per_s": round(self.tokens / self.hf, 1),
            "ratio": round(self.ratio, 4),
            "cpu_ratio": round(self.cpu_ratio, 4),
            "max_abs_diff": None if self.max_abs_diff is None else float(f"{self.max_abs_diff:.3g}"),
            "tolerance": self.tolerance,
            "mismatches": self.mismatches,
            "check": "ok" if self.ok else "FAIL",
        }


def compare(
    workload: str, ours: Sequence[Any], hf: Sequence[Any], doc_tokens: Sequence[int] = ()
) -> tuple[float | None, str, int]:
    """(max |Δ log-likelihood|, the tolerance it is held to, results that fail it) of one workload.

    loglikelihood: each request's |Δ| against TOLERANCE; a differing greedy flag also fails.
    loglikelihood_rolling: each document's |Δ| against TOLERANCE per scored token (a document's
    sum runs to thousands of fp32 terms, and lm-eval sums each window in fp32: at a sum of -5000
    one fp32 step is 5e-4, so an absolute 1e-4 is finer than the reference itself resolves).
    generate_until: every text must be the same (no |Δ|).
    """
    if len(ours) != len(hf):
        raise ValueError(f"{workload}: {len(ours)} results from ours, {len(hf)} from HF")
    if workload == "generate_until":
        return None, "identical text", sum(a != b for a, b in zip(ours, hf, strict=True))
    if workload == "loglikelihood":
        diffs = [abs(a[0] - b[0]) for a, b in zip(ours, hf, strict=True)]
        fails = sum(d > TOLERANCE or a[1] != b[1] for d, a, b in zip(diffs, ours, hf, strict=True))
        return max(diffs, default=0.0), f"{TOLERANCE:g}", fails
    if len(doc_tokens) != len(ours):
        raise ValueError(f"{workload}: token counts for {len(doc_tokens)} documents, results for {len(ours)}")
    diffs = [abs(a - b) for a, b in zip(ours, hf, strict=True)]
    fails = sum(d > TOLERANCE * max(1, n) for d, n in zip(diffs, doc_tokens, strict=True))
    return max(diffs, default=0.0), f"{TOLERANCE:g}/token", fails


def measure(
    workload: Workload,
    ours: Any,
    hf: Any,
    repeats: int,
    count_tokens: Callable[[str], int],
) -> Result:
    """Warm each side once (untimed), then ``repeats`` interleaved timed calls: ours, HF, ours, HF, ..."""
    warm = Workload(workload.name, workload.args[: min(2, len(workload.args))], 0)
    call(ours, warm)
    call(hf, warm)
    wall: dict[str, list[float]] = {"ours": [], "hf": []}
    cpu: dict[str, list[float]] = {"ours": [], "hf": []}
    first: dict[str, list[Any]] = {}
    for _ in range(repeats):
        for side, lm in (("ours", ours), ("hf", hf)):
            start, start_cpu = time.perf_counter(), time.process_time()
            out = call(lm, workload)
            wall[side].append(time.perf_counter() - start)
            cpu[side].append(time.process_time() - start_cpu)
            first.setdefault(side, out)
    tokens = workload.tokens
    doc_tokens: list[int] = []
    if workload.name == "generate_until":
        tokens += sum(count_tokens(s) for s in first["ours"])
    if workload.name == "loglikelihood_rolling":
        doc_tokens = [count_tokens(d) for (d,) in workload.args]
    diff, tol, mismatches = compare(workload.name, first["ours"], first["hf"], doc_tokens)
    return Result(workload.name, len(workload.args), tokens, wall["ours"], wall["hf"], cpu["ours"], cpu["hf"],
                  diff, tol, mismatches)  # fmt: skip


# --------------------------------------------------------------------------- output


def markdown(results: Sequence[Result]) -> str:
    head = ["workload", "requests", "tokens", "ours s", "HF s", "ours req/s", "HF req/s", "ours tok/s",
            "HF tok/s", "ratio ours/HF", "ratio (CPU time)", "max abs diff", "check"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = r.row()
        if r.workload == "generate_until":
            diff = f"{r.mismatches} of {r.requests} texts differ"
        else:
            diff = f"{r.max_abs_diff:.2g} (tol {r.tolerance})" + (
                f", {r.mismatches} over" if r.mismatches else ""
            )
        lines.append(
            f"| {r.workload} | {r.requests} | {r.tokens:,} | {r.ours:.2f} | {r.hf:.2f} | "
            f"{r.requests / r.ours:,.2f} | {r.requests / r.hf:,.2f} | {row['ours_tokens_per_s']:,.0f} | "
            f"{row['hf_tokens_per_s']:,.0f} | {r.ratio:.3f} | {r.cpu_ratio:.3f} | {diff} | {row['check']} |"
        )
    return "\n".join(lines)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def shape_label(args: argparse.Namespace, vocab: int) -> str:
    return (
        f"dim={args.dim} layers={args.layers} heads={args.heads} kv_heads={args.kv_heads} "
        f"ffn={args.ffn} seq={args.seq} vocab={vocab}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shape = parser.add_argument_group("model shape (Llama, random init)")
    shape.add_argument("--dim", type=int, default=384)
    shape.add_argument("--layers", type=int, default=8)
    shape.add_argument("--heads", type=int, default=6)
    shape.add_argument("--kv-heads", type=int, default=2)
    shape.add_argument("--ffn", type=int, default=1152)
    shape.add_argument("--seq", type=int, default=512, help="context (max_seq_len)")
    shape.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary trained for the tokenizer")
    parser.add_argument("--batch-size", type=int, default=16, help="of both LMs")
    parser.add_argument("--requests", type=int, default=8, help="multiple-choice questions (x4 requests)")
    parser.add_argument("--documents", type=int, default=3, help="documents of the rolling workload")
    parser.add_argument("--prompts", type=int, default=6, help="prompts of the generation workload")
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and workload")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both sides)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N], for both sides")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--corpus-chars", type=int, default=2_000_000, help="stdlib text for the tokenizer")
    parser.add_argument("--out", type=Path, default=None, help="the exported folder (default: a temp dir)")
    parser.add_argument(
        "--csv", type=Path, default=None, help="default: bench/results/eval_harness_<cpu|cuda>.csv"
    )
    args = parser.parse_args(argv)
    if args.csv is None:
        args.csv = RESULTS / f"eval_harness_{'cpu' if args.device == 'cpu' else 'cuda'}.csv"
    positive = ("dim", "layers", "heads", "kv_heads", "ffn", "seq", "vocab", "batch_size", "requests",
                "documents", "prompts", "max_gen_toks", "repeats", "threads", "corpus_chars")  # fmt: skip
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive")
    if args.max_gen_toks >= args.seq:
        parser.error(f"--max-gen-toks {args.max_gen_toks} must be smaller than --seq {args.seq}")
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    cfg = model_config(args)

    import torch

    torch.set_num_threads(args.threads)  # one process: both sides run under the same setting
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    from orchestra.data.tokenizer import train_bpe
    from orchestra.eval.harness import OrchestraLM
    from orchestra.eval.model import from_hf_folder

    start = time.perf_counter()
    texts = corpus(args.corpus_chars)
    tokenizer = train_bpe(texts, args.vocab, num_documents=len(texts))
    folder, params = write_folder(cfg, tokenizer, args.out or Path(tempfile.mkdtemp(prefix="orchestra-eval-bench-")), args.seed)  # fmt: skip
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    evaluated = from_hf_folder(folder)
    evaluated.model.to(args.device)
    ours = OrchestraLM(evaluated, batch_size=args.batch_size)
    hf = HFLM(pretrained=str(folder), device=args.device, batch_size=args.batch_size, dtype="float32")
    workloads = build_workloads(tokenizer, texts, args.seq, args.requests, args.documents, args.prompts,
                                args.max_gen_toks, args.seed)  # fmt: skip
    print(f"{params / 1e6:.1f} M parameters ({shape_label(args, vocab)}), folder {folder}, "
          f"set up in {time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip

    def count_tokens(s: str) -> int:
        return len(tokenizer.encode(s).ids)

    load_before = os.getloadavg()[0]  # other jobs on the machine: what the wall times shared it with
    results = []
    for name in args.workloads:
        r = measure(workloads[name], ours, hf, args.repeats, count_tokens)
        print(f"{name}: ours {[round(t, 2) for t in r.ours_s]} s, HF {[round(t, 2) for t in r.hf_s]} s "
              f"(CPU: ours {[round(t, 2) for t in r.ours_cpu_s]}, HF {[round(t, 2) for t in r.hf_cpu_s]})", flush=True)  # fmt: skip
        results.append(r)

    device = device_name(args.device)
    date = dt.date.today().isoformat()
    base = {"date": date, "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": getattr(lm_eval, "__version__", ""), "threads": args.threads,
            "shape": shape_label(args, vocab), "params_m": round(params / 1e6, 2), "batch_size": args.batch_size,
            "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2)}  # fmt: skip
    append_csv(args.csv, CSV_FIELDS, [{**base, **r.row()} for r in results])
    print(f"\nDevice: {device}, {args.threads} torch threads — {date} — torch {torch.__version__}, "
          f"transformers {transformers.__version__}, lm_eval {base['lm_eval']}")  # fmt: skip
    print(f"Model: {params / 1e6:.1f} M parameters, {shape_label(args, vocab)}, fp32, batch size {args.batch_size}; "
          f"median of {args.repeats} interleaved repeats; 1-min load average {base['load_1min_before']} before, "
          f"{base['load_1min_after']} after; {time.perf_counter() - start:.0f} s in all\n")  # fmt: skip
    print(markdown(results))
    print(f"\nappended to {args.csv}")
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            print(f"EQUALITY CHECK FAILED: {r.workload}: {r.mismatches} of {r.requests} results differ from HF's "
                  f"(max |Δ| {r.max_abs_diff}, tolerance {r.tolerance})", file=sys.stderr)  # fmt: skip
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
