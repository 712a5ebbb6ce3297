"""Sampling with the KV cache: greedy parity with full forwards, filters, stops and errors."""

from __future__ import annotations

import pytest
import torch

from orchestra.model import Transformer, build_model, generate
from orchestra.model.config import RopeScaling, RopeType
from orchestra.model.generate import _filter_logits

V = 97


@pytest.fixture
def model(make_cfg) -> Transformer:
    return build_model(make_cfg(max_seq_len=32), V)


def _greedy_by_full_forwards(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def test_greedy_equals_step_by_step_argmax(model):
    model.eval()
    prompt = torch.randint(0, V, (2, 5))
    out = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    assert out.shape == (2, 17)
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, _greedy_by_full_forwards(model, prompt, 12))


def test_one_dimensional_prompt_and_zero_new_tokens(model):
    prompt = torch.randint(0, V, (4,))
    out = generate(model, prompt, max_new_tokens=3, temperature=0)
    assert out.shape == (7,) and torch.equal(out[:4], prompt)
    assert torch.equal(generate(model, prompt, max_new_tokens=0), prompt)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompt = torch.randint(0, V, (1, 4))
    greedy = generate(model, prompt, 8, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, top_p=1e-6, generator=g), greedy)


def test_sampling_is_reproducible_with_a_generator(model):
    prompt = torch.randint(0, V, (2, 3))
    a = generate(
        model, prompt, 10, temperature=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1)
    )
    b = generate(
        model, prompt, 10, temperature=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(a, b)
    assert ((a >= 0) & (a < V)).all()


def test_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(_filter_logits(logits, 2, None)).tolist() == [[True, False, False, True]]
    # probs ~ [0.03, 0.64, 0.24, 0.09]: 0.64 < 0.8, so the top two survive
    assert torch.isinf(_filter_logits(logits, None, 0.8)).tolist() == [[True, False, False, True]]
    assert not torch.isinf(_filter_logits(logits, 10, 1.0)).any()


def test_stops_at_eos(model):
    prompt = torch.randint(0, V, (1, 4))
    greedy = generate(model, prompt, 10, temperature=0)
    eos = int(greedy[0, 6])  # the third generated token
    first = (greedy[0, 4:] == eos).nonzero()[0].item()
    out = generate(model, prompt, 10, temperature=0, eos_id=eos)
    assert out.shape[1] == 4 + first + 1
    assert out[0, -1].item() == eos
    assert torch.equal(out, greedy[:, : out.shape[1]])


def test_finished_rows_keep_emitting_eos(model):
    prompt = torch.randint(0, V, (2, 4))
    greedy = generate(model, prompt, 6, temperature=0)
    eos = int(greedy[0, 4])  # row 0 finishes at once
    out = generate(model, prompt, 6, temperature=0, eos_id=eos)
    assert (out[0, 4:] == eos).all()


def test_eval_mode_is_restored(model):
    model.train()
    generate(model, torch.zeros(1, 2, dtype=torch.long), 2)
    assert model.training
    model.eval()
    generate(model, torch.zeros(1, 2, dtype=torch.long), 2)
    assert not model.training


def test_errors(model):
    with pytest.raises(
        ValueError, match=r"prompt length 30 \+ max_new_tokens 5 = 35 exceeds model.max_seq_len=32"
    ):
        generate(model, torch.zeros(1, 30, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, torch.zeros(0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2, top_p=1.5)


def test_stops_at_any_of_several_eos_ids(model):
    """Llama 3.x Instruct stops on any of three ids: the continuation hitting the second one ends there."""
    prompt = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(3))
    greedy = generate(model, prompt, 10, temperature=0)
    new = greedy[0, 4:].tolist()
    second = new[2]  # a token of the greedy continuation is the second eos id; the first never comes
    first = next(t for t in range(V) if t not in new)
    out = generate(model, prompt, 10, temperature=0, eos_id=[first, second])
    assert out.shape[1] == 4 + new.index(second) + 1 and out[0, -1].item() == second
    assert torch.equal(out, greedy[:, : out.shape[1]])
    assert torch.equal(generate(model, prompt, 10, temperature=0, eos_id=(second,)), out)
    assert torch.equal(generate(model, prompt, 10, temperature=0, eos_id=[]), greedy)  # none: no stop


def test_a_row_finished_on_a_later_eos_id_keeps_emitting_the_first(model):
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, prompt, 6, temperature=0)
    second = int(greedy[0, 4])  # row 0 finishes at once, on the second id
    first = next(t for t in range(V) if t not in set(greedy[:, 4:].flatten().tolist()))
    out = generate(model, prompt, 6, temperature=0, eos_id=[first, second])
    assert out[0, 4].item() == second and (out[0, 5:] == first).all()


PADDED_SHAPES = {
    "llama_gqa": {},
    "mistral_window": {"sliding_window": 3},
    "gemma2_softcap_window": {
        "sliding_window": 4,
        "global_every": 2,
        "attn_softcap": 50.0,
        "final_softcap": 30.0,
        "sandwich_norm": True,
    },
    "qwen3_qk_norm_bias": {"qk_norm": True, "qkv_bias": True},
}


@pytest.mark.parametrize("shape", sorted(PADDED_SHAPES))
def test_left_padded_batch_equals_each_prompt_alone(make_cfg, shape):
    """Prompts of lengths 2..9 in one left-padded batch: the tokens and last logits each prompt
    gets on its own, with garbage in the padding (it must never be attended to)."""
    model = build_model(make_cfg(max_seq_len=32, **PADDED_SHAPES[shape]), V).eval()
    lengths = [2, 9, 5, 3, 9, 1]
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, V, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    batch = torch.randint(0, V, (len(lengths), width), generator=gen)  # random padding ids
    for b, p in enumerate(prompts):
        batch[b, width - len(p) :] = p
    out = generate(model, batch, max_new_tokens=8, temperature=0.0, prompt_lengths=lengths)
    assert out.shape == (len(lengths), width + 8)
    for b, p in enumerate(prompts):
        alone = generate(model, p, max_new_tokens=8, temperature=0.0)
        assert out[b, width:].tolist() == alone[len(p) :].tolist(), f"row {b} (length {len(p)})"

    # The cached prefill's last-position logits match each prompt's own forward pass.
    from orchestra.model import KVCache

    cache = KVCache(len(lengths), model.cfg, width)
    cache.set_left_padding(torch.tensor([width - n for n in lengths]))
    with torch.no_grad():
        logits = model(batch, kv_cache=cache)[:, -1]
        assert torch.isfinite(model(batch, kv_cache=cache)).all()  # padding rows stay finite too
        for b, p in enumerate(prompts):
            torch.testing.assert_close(logits[b], model(p[None])[0, -1], atol=2e-5, rtol=1e-5)


def test_left_padded_sampling_matches_alone_rows_for_one_row(model):
    """A seeded sample of a padded batch of one row equals the same prompt unpadded: padding
    changes neither the distribution nor the random stream."""
    prompt = torch.randint(0, V, (4,))
    padded = torch.cat([torch.zeros(3, dtype=torch.long), prompt])[None]
    out = generate(
        model, padded, 6, temperature=0.9, generator=torch.Generator().manual_seed(5), prompt_lengths=[4]
    )
    alone = generate(model, prompt[None], 6, temperature=0.9, generator=torch.Generator().manual_seed(5))
    assert out[0, 7:].tolist() == alone[0, 4:].tolist()


def test_prompt_lengths_errors(model, make_cfg):
    batch = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"prompt_lengths must be 2 lengths in \[1, 4\]"):
        generate(model, batch, 2, prompt_lengths=[4])
    with pytest.raises(ValueError, match=r"prompt_lengths must be 2 lengths in \[1, 4\]"):
        generate(model, batch, 2, prompt_lengths=[0, 4])
    with pytest.raises(ValueError, match=r"prompt_lengths must be 2 lengths in \[1, 4\]"):
        generate(model, batch, 2, prompt_lengths=[5, 4])
    assert generate(model, batch, 2, temperature=0, prompt_lengths=[4, 4]).shape == (2, 6)  # no padding

    from orchestra.model.peft import PromptTunedModel

    tuned = PromptTunedModel(model, num_virtual_tokens=3)
    with pytest.raises(ValueError, match="cannot share a batch with a soft prompt"):
        generate(tuned, batch, 2, prompt_lengths=[2, 4])
    dynamic = build_model(
        make_cfg(max_seq_len=32, rope=RopeScaling(type=RopeType.dynamic, factor=2.0, original_max_seq_len=8)),
        V,
    )
    with pytest.raises(ValueError, match=r"cannot share a batch with rope\.type=dynamic"):
        generate(dynamic, batch, 6, prompt_lengths=[2, 4])
    # Within the original context the tables are the static ones: padding is allowed.
    assert generate(dynamic, batch, 2, temperature=0, prompt_lengths=[2, 4]).shape == (2, 6)


@pytest.mark.parametrize("shape", sorted(PADDED_SHAPES))
def test_per_row_positions_decode_each_row_as_alone(make_cfg, shape):
    """Continuous batching's cached path: rows at different lengths in one call, each at its own
    positions (a right-padded prefill, then one token per row per step) give every row the
    logits of a full forward over its own sequence."""
    from orchestra.model import KVCache

    model = build_model(make_cfg(max_seq_len=32, **PADDED_SHAPES[shape]), V).eval()
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 9, 1, 6]
    seqs = [torch.randint(0, V, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    batch = torch.randint(0, V, (4, width), generator=gen)  # the padding on the right is garbage
    for b, s in enumerate(seqs):
        batch[b, : len(s)] = s
    cache = KVCache(6, model.cfg, 32)  # more slots than rows: the batch is the first rows
    with torch.no_grad():
        h = model.hidden_states(batch, kv_cache=cache, start_pos=torch.zeros(4, dtype=torch.long))
        last = model.logits(h[torch.arange(4), torch.tensor(lengths) - 1])
        for b, s in enumerate(seqs):
            torch.testing.assert_close(last[b], model(s[None])[0, -1], atol=2e-5, rtol=1e-5)
        pos = torch.tensor(lengths)
        for _ in range(5):
            nxt = torch.randint(0, V, (4, 1), generator=gen)
            step = model(nxt, kv_cache=cache, start_pos=pos)[:, -1]
            for b in range(4):
                seqs[b] = torch.cat([seqs[b], nxt[b]])
                torch.testing.assert_close(step[b], model(seqs[b][None])[0, -1], atol=2e-5, rtol=1e-5)
            pos = pos + 1


def test_per_row_positions_errors(model):
    from orchestra.model import KVCache

    cache = KVCache(2, model.cfg, 16)
    tok = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="come with a KV cache"):
        model(tok, start_pos=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reaching position 16"):
        model(tok, kv_cache=cache, start_pos=torch.tensor([3, 16]))
    with pytest.raises(ValueError, match="batch 3"):
        model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache, start_pos=torch.tensor([0, 1, 2]))
