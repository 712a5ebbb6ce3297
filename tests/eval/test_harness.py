"""Our lm-eval LM against lm-eval's own Hugging Face backend on the same exported folder.

The reference is independent of our model code: HFLM runs transformers' LlamaForCausalLM from
the folder orchestra-export wrote, with lm-eval's own tokenization and batching.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from orchestra.eval.harness import OrchestraLM
from orchestra.eval.model import from_hf_folder


@pytest.fixture(scope="module")
def both(exported_folder: Path) -> tuple[OrchestraLM, HFLM]:
    ours = OrchestraLM(from_hf_folder(exported_folder), batch_size=3)
    ref = HFLM(pretrained=str(exported_folder), device="cpu", batch_size=3, dtype="float32")
    return ours, ref


def _requests(kind: str, args: list[tuple[object, ...]]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _pairs(texts: list[str], seed: int) -> list[tuple[str, str]]:
    """Context/continuation splits at random characters: spaces at the split, empty contexts, long contexts."""
    rng = random.Random(seed)
    pairs = []
    for text in texts:
        cut = rng.randrange(1, len(text) - 5)
        end = min(len(text), cut + rng.randrange(3, 60))
        pairs.append((text[:cut], text[cut:end]))
    pairs.append(("", texts[0][:30]))  # empty context: conditioned on the prefix token
    pairs.append((texts[1][:50] + " ", "trailing space moves to the continuation"))
    pairs.append((texts[2] * 3, texts[3][:20]))  # longer than the context: left-truncated
    return pairs


def test_loglikelihood_equals_lm_eval_hf_backend(
    both: tuple[OrchestraLM, HFLM], corpus_texts: list[str]
) -> None:
    ours, ref = both
    pairs = _pairs(corpus_texts, seed=7)
    got = ours.loglikelihood(_requests("loglikelihood", pairs))
    want = ref.loglikelihood(_requests("loglikelihood", pairs))
    assert len(got) == len(want) == len(pairs)
    for (lp, greedy), (ref_lp, ref_greedy), pair in zip(got, want, pairs, strict=True):
        assert lp == pytest.approx(ref_lp, abs=1e-4), pair
        assert greedy == ref_greedy, pair
    assert len({round(lp, 3) for lp, _ in got}) > len(pairs) // 2  # the requests really differ


def test_rolling_loglikelihood_equals_lm_eval_hf_backend(
    both: tuple[OrchestraLM, HFLM], corpus_texts: list[str]
) -> None:
    ours, ref = both
    docs = [(t,) for t in corpus_texts[:6]] + [("".join(corpus_texts[6:9]),)]  # several windows each
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", docs))
    want = ref.loglikelihood_rolling(_requests("loglikelihood_rolling", docs))
    for lp, ref_lp in zip(got, want, strict=True):
        assert lp == pytest.approx(ref_lp, abs=1e-4 * max(1.0, abs(ref_lp) / 100))


def test_greedy_generation_equals_lm_eval_hf_backend(
    both: tuple[OrchestraLM, HFLM], corpus_texts: list[str]
) -> None:
    ours, ref = both
    args = [(t[:80], {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}) for t in corpus_texts[:5]]
    torch.manual_seed(0)
    assert ours.generate_until(_requests("generate_until", args)) == ref.generate_until(
        _requests("generate_until", args)
    )
