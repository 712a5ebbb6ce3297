"""orchestra-eval end to end on the session's tiny trained run: results, references, bad input, compare."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from orchestra.cli.eval import run_eval
from orchestra.config import EvalConfig
from orchestra.eval.compare import compare_folders
from orchestra.eval.run import read_results

pytestmark = pytest.mark.slow


def _ckpts(trained_run: Path) -> list[Path]:
    return sorted((trained_run / "checkpoints").glob("step*.ckpt"))


def test_perplexity_equals_lm_eval_rolling_on_the_export(
    trained_run: Path, exported_folder: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """Perplexity of the checkpoint = that of its export = lm-eval HF backend's rolling loglikelihood."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    paths = [str(corpus_dir / "shlex.py.txt"), str(corpus_dir / "glob.py.txt")]
    results = []
    for name, model in (("ckpt", trained_run / "checkpoints" / "last.ckpt"), ("hf", exported_folder)):
        path = run_eval(
            EvalConfig(ckpt=str(model), tasks=["perplexity"], paths=paths, out=str(tmp_path / name))
        )
        assert path is not None
        results.append(read_results(path.parent)[0]["tasks"]["perplexity"]["metrics"])
    assert results[0]["ppl"] == pytest.approx(results[1]["ppl"], rel=1e-5)

    ref = HFLM(pretrained=str(exported_folder), device="cpu", batch_size=4, dtype="float32")
    texts = [Path(p).read_text() for p in paths]
    logprobs = ref.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    )
    tokens = results[0]["tokens"]
    assert results[0]["nll"] == pytest.approx(-sum(logprobs) / tokens, rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert results[0]["bits_per_byte"] == pytest.approx(-sum(logprobs) / math.log(2) / n_bytes, rel=1e-5)


def test_stride_windows_score_every_token_once_with_context(
    trained_run: Path, exported_folder: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """Strided windows: every token once, each after >= context - stride tokens; sums equal transformers'."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestra.eval.model import from_hf_folder
    from orchestra.eval.scoring import rolling_windows

    evaluated = from_hf_folder(exported_folder)
    doc = evaluated.encode((corpus_dir / "shlex.py.txt").read_text(), add_special_tokens=False)[:300]
    max_len, stride = 64, 16
    windows = rolling_windows(doc, evaluated.prefix_id, max_len, stride)
    assert [t for _, cont in windows for t in cont] == doc
    reference = AutoModelForCausalLM.from_pretrained(exported_folder, torch_dtype=torch.float32).eval()
    want = 0.0
    for ctx, cont in windows[1:]:  # after the first: a full context, at most stride new tokens
        assert len(ctx) + len(cont) - 1 == max_len and 0 < len(cont) <= stride
    assert all(len(cont) == stride for _, cont in windows[1:-1])
    for ctx, cont in windows:
        inp = torch.tensor([[*ctx, *cont][-(max_len + 1) :][:-1]])
        logprobs = reference(inp).logits[0].log_softmax(-1)[-len(cont) :]
        want += float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum())
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    doc_file = tmp_path / "doc.jsonl"
    doc_file.write_text(json.dumps({"text": evaluated.decode(doc)}) + "\n")
    assert evaluated.encode(evaluated.decode(doc), add_special_tokens=False) == doc
    path = run_eval(
        EvalConfig(
            ckpt=ckpt, tasks=["perplexity"], paths=[str(doc_file)], stride=stride, out=str(tmp_path / "s")
        )
    )
    assert path is not None
    metrics = read_results(path.parent)[0]["tasks"]["perplexity"]["metrics"]
    assert metrics["tokens"] == len(doc)
    assert metrics["nll"] == pytest.approx(-want / len(doc), rel=1e-5)
    full = run_eval(
        EvalConfig(
            ckpt=ckpt, tasks=["perplexity"], paths=[str(doc_file)], stride=max_len, out=str(tmp_path / "f")
        )
    )
    plain = run_eval(
        EvalConfig(ckpt=ckpt, tasks=["perplexity"], paths=[str(doc_file)], out=str(tmp_path / "p"))
    )
    assert full is not None and plain is not None
    ppl = [read_results(p.parent)[0]["tasks"]["perplexity"]["metrics"]["ppl"] for p in (full, plain)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-9)  # a stride of the whole context = disjoint windows


def test_bad_input_one_error_and_earlier_results_untouched(
    trained_run: Path, corpus_dir: Path, tmp_path: Path, data_cache: Path
) -> None:
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    out = tmp_path / "out"
    good = run_eval(
        EvalConfig(ckpt=ckpt, tasks=["perplexity"], paths=[str(corpus_dir / "glob.py.txt")], out=str(out))
    )
    assert good is not None
    before = good.read_bytes()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_ref = tmp_path / "noref.jsonl"
    no_ref.write_text(json.dumps({"messages": [{"role": "user", "content": "Say hi"}]}) + "\n")
    other = tmp_path / "other-tokenizer"
    cases = {
        "unknown task": (["tasks=[perplexity,vibes]"], "unknown task(s) ['vibes']"),
        "empty set": ([f"paths=[{empty}]", "tasks=[perplexity]"], "no examples (the file is empty)"),
        "no references": ([f"generation_path={no_ref}", "tasks=[generation]"], "needs a reference"),
        "missing ckpt": (["ckpt=/nonexistent/x.ckpt"], "does not exist"),
    }
    for name, (overrides, message) in cases.items():
        args = [f"ckpt={ckpt}", f"out={out}", "overwrite=true", *overrides]
        proc = subprocess.run(
            [sys.executable, "-m", "orchestra.cli.eval", *args], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        text = " ".join((proc.stdout + proc.stderr).split())
        assert message in text, (name, text)
        assert "Traceback" not in text, name
        assert good.read_bytes() == before, name
    # A dataset prepared with another tokenizer is refused by name.
    from orchestra.data.pack import prepare_dataset
    from tests.helpers import tiny_config

    cfg = tiny_config(corpus_dir, other, tmp_path / "unused").data
    cfg.vocab_size = 300
    dataset = prepare_dataset(cfg, seed=1)
    with pytest.raises(ValueError, match="another tokenizer"):
        run_eval(
            EvalConfig(ckpt=ckpt, tasks=["perplexity"], dataset=str(dataset), out=str(out), overwrite=True)
        )
    assert good.read_bytes() == before


def test_compare_longer_training_is_better_and_self_is_not_different(
    trained_run: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    steps = _ckpts(trained_run)
    assert len(steps) >= 2
    early, last = steps[0], trained_run / "checkpoints" / "last.ckpt"
    paths = [str(p) for p in sorted(corpus_dir.glob("*.txt"))]
    folders = {}
    for name, ckpt in (("early", early), ("last", last)):
        path = run_eval(
            EvalConfig(ckpt=str(ckpt), tasks=["perplexity"], paths=paths, out=str(tmp_path / name))
        )
        assert path is not None
        folders[name] = path.parent
    _, better = compare_folders(folders["early"], folders["last"], tmp_path / "cmp", n_resamples=2000)
    (task, c), *_ = better
    assert task == "perplexity" and c.metric == "nll"
    assert c.difference < 0 and c.ci_high < 0 and c.verdict == "b better", c
    _, same = compare_folders(folders["last"], folders["last"], tmp_path / "self", n_resamples=2000)
    assert same[0][1].verdict == "no significant difference" and same[0][1].difference == 0


def test_results_go_to_an_offline_wandb_run(trained_run: Path, corpus_dir: Path, tmp_path: Path) -> None:
    from orchestra.config import LoggerConfig, LoggerName, WandbMode
    from tests.report.wandb_records import finished_records, history

    out = tmp_path / "wb"
    path = run_eval(
        EvalConfig(
            ckpt=str(trained_run / "checkpoints" / "last.ckpt"),
            tasks=["perplexity"],
            paths=[str(corpus_dir / "glob.py.txt")],
            out=str(out),
            logger=LoggerConfig(name=LoggerName.wandb, wandb_mode=WandbMode.offline),
        )
    )
    assert path is not None
    metrics = read_results(out)[0]["tasks"]["perplexity"]["metrics"]
    files = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    rows = history(finished_records(files[0]))
    logged = {k: v for row in rows for k, v in row.items() if k.startswith("perplexity/")}
    assert logged["perplexity/ppl"] == pytest.approx(metrics["ppl"])
