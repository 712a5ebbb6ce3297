"""The Transformer itself: shapes, causality, loss, KV cache, limits and bookkeeping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestra.model import IGNORE_INDEX, KVCache, Transformer, build_model

V = 101  # odd on purpose: nothing may assume a padded vocabulary


def test_logits_shape_and_dtype(make_cfg):
    model = build_model(make_cfg(), V)
    tokens = torch.randint(0, V, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, V)
    assert logits.dtype == torch.float32


def test_causal_future_tokens_do_not_change_past_logits(make_cfg):
    model = build_model(make_cfg(), V).eval()
    a = torch.randint(0, V, (2, 20))
    b = a.clone()
    b[:, 12:] = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12], rtol=0, atol=0)
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


def test_loss_matches_cross_entropy_on_logits(make_cfg):
    for tie in (False, True):
        model = build_model(make_cfg(tie_embeddings=tie), V)
        tokens = torch.randint(0, V, (2, 16))
        targets = torch.randint(0, V, (2, 16))
        targets[0, :5] = IGNORE_INDEX
        targets[1, -3:] = IGNORE_INDEX
        loss = model(tokens, targets)
        assert loss.dim() == 0
        ref = F.cross_entropy(model(tokens).reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        # ignore_index: the ignored positions have no say in the loss
        kept = targets != IGNORE_INDEX
        ref_kept = F.cross_entropy(model(tokens)[kept], targets[kept])
        torch.testing.assert_close(loss, ref_kept, rtol=1e-6, atol=1e-6)


def test_backward_reaches_every_parameter(make_cfg):
    model = build_model(make_cfg(), V)
    tokens = torch.randint(0, V, (2, 8))
    model(tokens, tokens).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_too_long_input_is_a_clear_error(make_cfg):
    model = build_model(make_cfg(max_seq_len=16), V)
    with pytest.raises(ValueError, match=r"17 positions.*max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=13)
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly the limit is fine


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_decoding_matches_full_forward(make_cfg, n_kv_heads):
    cfg = make_cfg(n_kv_heads=n_kv_heads)
    model = build_model(cfg, V).eval()
    tokens = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(2, cfg, 24, device="cpu", dtype=torch.float32)
        parts = [model(tokens[:, :10], kv_cache=cache, start_pos=0)]
        # a multi-token chunk after a cached prefix exercises the explicit causal mask
        parts.append(model(tokens[:, 10:15], kv_cache=cache, start_pos=10))
        parts += [model(tokens[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(15, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_limits(make_cfg):
    cfg = make_cfg()
    model = build_model(cfg, V)
    cache = KVCache(1, cfg, 8)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(2, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(1, cfg, cfg.max_seq_len + 1)


def test_tied_embeddings_share_one_parameter(make_cfg):
    tied = build_model(make_cfg(tie_embeddings=True), V)
    untied = build_model(make_cfg(tie_embeddings=False), V)
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    assert untied.lm_head.weight is not untied.tok_embeddings.weight
    emb = 64 * V
    assert untied.num_parameters() - tied.num_parameters() == emb
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters()
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - emb


def test_num_parameters_by_hand(make_cfg):
    cfg = make_cfg(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160)
    model = build_model(cfg, V)
    D, L, F_, kv = 64, 2, 160, 2 * 16
    attn = D * D + 2 * D * kv + D * D  # q, k, v, o
    mlp = 3 * D * F_
    norms = 2 * D
    per_layer = attn + mlp + norms
    n_matmul = L * per_layer + D + V * D  # layers + final norm + lm_head
    assert model.num_parameters(exclude_embeddings=True) == n_matmul
    assert model.num_parameters() == n_matmul + V * D


def test_rope_buffers_are_not_saved_and_rebuild_after_meta(make_cfg):
    cfg = make_cfg(rope_theta=5e5)
    ref = Transformer(cfg, V)
    assert not any("rope" in k for k in ref.state_dict())
    with torch.device("meta"):
        model = Transformer(cfg, V)
    assert model.rope_cos.is_meta
    model.to_empty(device="cpu")
    model.reset_rope_cache()
    torch.testing.assert_close(model.rope_cos, ref.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, ref.rope_sin, rtol=0, atol=0)
    assert model.rope_cos.shape == (cfg.max_seq_len, cfg.head_size)
    assert model.rope_cos.dtype == torch.float32


def test_bf16_forward_runs_and_logits_are_fp32(make_cfg):
    model = build_model(make_cfg(), V).to(torch.bfloat16)
    tokens = torch.randint(0, V, (1, 8))
    logits = model(tokens)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    loss = model(tokens, tokens)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_packed_segments_equal_separate_examples(make_cfg):
    """Two examples in one row with segment ids give each example's own logits (RoPE is relative)."""
    model = build_model(make_cfg(), V).eval()
    a, b = torch.randint(0, V, (1, 11)), torch.randint(0, V, (1, 9))
    packed = torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1] * 11 + [2] * 9 + [0] * 4])
    with torch.no_grad():
        out = model(packed, segment_ids=segments)
        alone_a, alone_b = model(a), model(b)
        unmasked = model(packed)
    torch.testing.assert_close(out[:, :11], alone_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 11:20], alone_b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmasked[:, 11:20], alone_b, atol=1e-3)  # without the mask b sees a


def test_packed_segments_loss_and_gradients_stay_inside_examples(make_cfg):
    model = build_model(make_cfg(), V)
    tokens = torch.randint(0, V, (1, 16))
    segments = torch.tensor([[1] * 8 + [2] * 8])
    emb = model.tok_embeddings.weight
    targets = torch.full((1, 16), IGNORE_INDEX)
    targets[0, 8:] = torch.randint(0, V, (8,))  # only the second example is trained
    loss = model(tokens, targets, segment_ids=segments)
    (grad,) = torch.autograd.grad(loss, emb)
    first_only = set(tokens[0, :8].tolist()) - set(tokens[0, 8:].tolist())
    assert first_only and all(grad[t].abs().max() == 0 for t in first_only)
    with pytest.raises(ValueError, match="segment_ids must be"):
        model(tokens, segment_ids=segments[:, :4])


def test_per_sequence_loss_is_each_rows_summed_nll(make_cfg):
    model = build_model(make_cfg(), V)
    tokens = torch.randint(0, V, (3, 12))
    targets = torch.randint(0, V, (3, 12))
    targets[0, :6] = IGNORE_INDEX
    targets[2, :] = IGNORE_INDEX
    per_row = model(tokens, targets, per_sequence=True)
    logits = model(tokens)
    expected = torch.stack(
        [F.cross_entropy(logits[i], targets[i], ignore_index=IGNORE_INDEX, reduction="sum") for i in range(3)]
    )
    assert per_row.shape == (3,)
    torch.testing.assert_close(per_row, expected, rtol=1e-5, atol=1e-5)
    assert per_row[2].item() == 0.0


def test_constructor_keeps_torch_init_and_build_model_applies_the_scheme(make_cfg):
    """Transformer() only builds modules (PyTorch's default init); build_model applies model.init."""
    cfg = make_cfg(init_std=0.02)
    plain, built = Transformer(cfg, V), build_model(cfg, V)
    assert plain.tok_embeddings.weight.std().item() > 0.5  # nn.Embedding's N(0, 1)
    assert built.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.1)
    tokens = torch.randint(0, V, (1, 8))
    assert torch.isfinite(plain(tokens, tokens))  # a plain construction is still a usable model


@pytest.mark.parametrize("tie", [False, True])
def test_build_model_without_init_draws_nothing_and_loads_strictly(make_cfg, monkeypatch, tie):
    """init=False (weights about to be loaded) never initialises, randomly or by scheme."""
    cfg = make_cfg(tie_embeddings=tie, rope_theta=5e5)
    ref = build_model(cfg, V).eval()

    def refuse(*args, **kwargs):
        raise AssertionError("init_weights called for a model whose weights will be loaded")

    monkeypatch.setattr("orchestra.model.build.init_weights", refuse)
    rng = torch.random.get_rng_state()
    model = build_model(cfg, V, device="cpu", init=False)
    assert torch.equal(torch.random.get_rng_state(), rng)  # not even PyTorch's default init ran
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert (model.lm_head.weight is model.tok_embeddings.weight) is tie
    torch.testing.assert_close(model.rope_cos, ref.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, ref.rope_sin, rtol=0, atol=0)
    model.load_state_dict(ref.state_dict(), strict=True)
    tokens = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), ref(tokens))


def test_prefix_embeds_equal_the_tokens_they_embed(make_cfg):
    """Prefix embeddings of ids X give the model's outputs on X + tokens, for the tokens only."""
    cfg = make_cfg()
    model = build_model(cfg, V).eval()
    X, tokens = torch.randint(0, V, (2, 4)), torch.randint(0, V, (2, 10))
    targets = torch.randint(0, V, (2, 10))
    targets[1, :3] = IGNORE_INDEX
    whole = torch.cat([X, tokens], dim=1)
    with torch.no_grad():
        prefix = model.tok_embeddings(X)
        torch.testing.assert_close(
            model(tokens, prefix_embeds=prefix), model(whole)[:, 4:], rtol=0, atol=1e-6
        )
        loss = model(tokens, targets, prefix_embeds=prefix)
        ref = model(whole, torch.cat([torch.full((2, 4), IGNORE_INDEX), targets], dim=1))
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        # The prefix is written to a KV cache like tokens: later steps start after it.
        cache = KVCache(2, cfg, 14)
        parts = [model(tokens[:, :6], kv_cache=cache, prefix_embeds=prefix)]
        parts += [model(tokens[:, i : i + 1], kv_cache=cache, start_pos=4 + i) for i in range(6, 10)]
        torch.testing.assert_close(torch.cat(parts, dim=1), model(whole)[:, 4:], rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match=r"4 prefix embeddings \+ 61 tokens.*65 positions.*max_seq_len=64"):
        model(torch.zeros(2, 61, dtype=torch.long), prefix_embeds=prefix)
    with pytest.raises(ValueError, match="KV cache"):
        model(tokens, kv_cache=KVCache(2, cfg, 12), prefix_embeds=prefix)
    with pytest.raises(ValueError, match=r"prefix_embeds must be \[B, P, dim\]"):
        model(tokens, prefix_embeds=prefix[:1])
    with pytest.raises(ValueError, match="segment_ids"):
        model(tokens, segment_ids=torch.ones_like(tokens), prefix_embeds=prefix)
