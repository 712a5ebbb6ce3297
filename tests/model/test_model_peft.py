"""PEFT building blocks (LoRA, adapters, prompt tuning, freezing) and the fine-tuning optimiser tools.

L2-SP and layer-wise lr decay live in orchestra/train/optim.py but are tested here, on PEFT models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestra.model import IGNORE_INDEX, build_model
from orchestra.model.peft import (
    AdaptedModule,
    LoraConfig,
    LoRALinear,
    PromptTunedModel,
    apply_adapters,
    apply_lora,
    merge_lora,
    set_trainable_layers,
    trainable_parameter_names,
    unfreeze_schedule,
)
from orchestra.train.optim import L2SP, layerwise_lr_groups

V = 101


def _batch(b: int = 2, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, V, (b, t))
    targets = torch.randint(0, V, (b, t))
    targets[0, :3] = IGNORE_INDEX
    return tokens, targets


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(model: nn.Module, steps: int = 5, lr: float = 1e-2, extra_loss=None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay on: it must not touch frozen parameters either.
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    for _ in range(steps):
        tokens, targets = _batch()
        loss = model(tokens, targets)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _assert_only_changed(before: dict[str, torch.Tensor], model: nn.Module, trainable: set[str]) -> None:
    after = dict(model.named_parameters())
    for name, p in after.items():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


# ---------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("tie", [False, True])
def test_lora_starts_identical_trains_only_lora_and_merges(make_cfg, tie):
    model = build_model(make_cfg(tie_embeddings=tie), V)
    tokens, _ = _batch()
    with torch.no_grad():
        ref_logits = model(tokens)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert names == [f"layers.{i}.attention.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref_logits, rtol=0, atol=0)

    trainable = set(trainable_parameter_names(model))
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    before = _snapshot(model)
    _train(model)
    _assert_only_changed(before, model, trainable)

    model.eval()
    with torch.no_grad():
        unmerged = model(tokens)
        assert not torch.allclose(unmerged, ref_logits)  # training did something
        merged_names = merge_lora(model)
        assert merged_names == names
        merged = model(tokens)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers[0].attention.q_proj) is nn.Linear
    assert set(model.state_dict()) == set(build_model(make_cfg(tie_embeddings=tie), V).state_dict())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_lora_linear_formula_and_init():
    torch.manual_seed(1)
    base = nn.Linear(12, 7, bias=True)
    lora = LoRALinear(base, rank=3, alpha=6.0, dropout=0.0)
    x = torch.randn(5, 12)
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=0)  # B is zero
    assert lora.lora_A.weight.abs().max() <= 1 / math.sqrt(12) + 1e-6  # kaiming_uniform(a=sqrt 5) bound
    nn.init.normal_(lora.lora_B.weight)
    expected = x @ base.weight.T + base.bias + (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T) * 2.0
    torch.testing.assert_close(lora(x), expected)
    assert not base.weight.requires_grad and lora.lora_A.weight.requires_grad
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1.0)


def test_lora_dropout_only_in_training():
    lora = LoRALinear(nn.Linear(8, 8), rank=2, alpha=2.0, dropout=0.5)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(64, 8)
    lora.eval()
    torch.testing.assert_close(lora(x), lora(x))
    lora.train()
    assert not torch.equal(lora(x), lora(x))


def test_apply_lora_target_selection(make_cfg):
    model = build_model(make_cfg(), V)
    names = apply_lora(model, LoraConfig(target_modules=["all-linear"]))
    projections = [
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    assert sorted(names) == sorted(f"layers.{i}.{p}" for i in range(2) for p in projections)
    assert type(model.lm_head) is nn.Linear

    model = build_model(make_cfg(), V)
    assert apply_lora(model, LoraConfig(target_modules=["down_proj"])) == [
        "layers.0.mlp.down_proj",
        "layers.1.mlp.down_proj",
    ]
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig())
    for bad, msg in (
        (["lm_head"], "lm_head"),
        (["qproj"], "match no nn.Linear"),
        ([], "empty"),
        (["all-linear", "q_proj"], "only LoRA target"),
    ):
        with pytest.raises(ValueError, match=msg):
            apply_lora(build_model(make_cfg(), V), LoraConfig(target_modules=bad))


def test_lora_matches_hf_peft():
    peft = pytest.importorskip("peft", reason="peft is not installed; parity with HF peft not checked")
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    torch.manual_seed(3)
    base = nn.Linear(16, 24, bias=False)
    ours = LoRALinear(nn.Linear(16, 24, bias=False), rank=4, alpha=8.0)
    ours.base.weight.data.copy_(base.weight)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    theirs = PeftLoraLinear(base, "default", config=cfg, r=4, lora_alpha=8, lora_dropout=0.0)
    nn.init.normal_(ours.lora_B.weight)
    theirs.lora_A["default"].weight.data.copy_(ours.lora_A.weight)
    theirs.lora_B["default"].weight.data.copy_(ours.lora_B.weight)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.scale == theirs.scaling["default"]
    # Both merges give the same dense weight.
    theirs.merge()
    torch.testing.assert_close(ours.merge().weight, theirs.get_base_layer().weight)


@pytest.mark.parametrize("bias", [False, True])
def test_dora_matches_hf_peft_in_output_gradients_and_merge(bias: bool) -> None:
    """DoRA against peft's own DoRA layer: outputs, every trainable gradient, and the merged weight."""
    peft = pytest.importorskip("peft", reason="peft is not installed; parity with HF peft not checked")
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from orchestra.model.peft import DoRALinear

    torch.manual_seed(5)
    base = nn.Linear(16, 24, bias=bias)
    copy = nn.Linear(16, 24, bias=bias)
    copy.load_state_dict(base.state_dict())
    ours = DoRALinear(copy, rank=4, alpha=8.0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True)
    theirs = PeftLoraLinear(base, "default", config=cfg, r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ours(x), base(x), rtol=1e-6, atol=1e-6)  # starts at the base output
    magnitude = theirs.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(ours.lora_magnitude_vector.detach(), magnitude.detach())
    with torch.no_grad():  # a trained state: B, and the magnitudes, away from their initial values
        nn.init.normal_(ours.lora_B.weight, std=0.3)
        ours.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 24))
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        magnitude.copy_(ours.lora_magnitude_vector)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    (y_ours**2).sum().backward()
    (y_theirs**2).sum().backward()
    for mine, peft_param in (
        (ours.lora_A.weight, theirs.lora_A["default"].weight),
        (ours.lora_B.weight, theirs.lora_B["default"].weight),
        (ours.lora_magnitude_vector, magnitude),
    ):
        assert mine.grad is not None and peft_param.grad is not None
        torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        theirs.merge()
        merged = ours.merge()
    torch.testing.assert_close(merged.weight, theirs.get_base_layer().weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged(x), y_theirs.detach(), rtol=1e-5, atol=1e-5)


def test_dora_turned_off_is_the_base() -> None:
    from orchestra.model.peft import DoRALinear
    from orchestra.train.finetune import peft_disabled

    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(8, 6), rank=2, alpha=4.0)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B.weight)
        layer.lora_magnitude_vector.mul_(2.0)
    x = torch.randn(4, 8)
    with peft_disabled(layer):
        torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    assert layer.enabled and not torch.allclose(layer(x), layer.base(x))


# ---------------------------------------------------------------------------------- adapters


def test_adapters_start_identical_and_only_adapters_train(make_cfg):
    model = build_model(make_cfg(), V)
    tokens, _ = _batch()
    with torch.no_grad():
        ref = model(tokens)
    names = apply_adapters(model, bottleneck=8)
    assert len(names) == 4
    assert isinstance(model.layers[0].attention, AdaptedModule)
    assert model.layers[1].attention.layer_idx == 1  # attributes fall through to the wrapped module
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref, rtol=0, atol=0)

    trainable = set(trainable_parameter_names(model))
    assert trainable and all(".adapter." in n for n in trainable)
    assert len(trainable) == 4 * 4  # down/up weight and bias per adapter
    before = _snapshot(model)
    _train(model)
    _assert_only_changed(before, model, trainable)
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, 8)

    for block in model.layers:  # unwrapped, the adapters are gone and the base is untouched
        block.attention, block.mlp = block.attention.inner, block.mlp.inner
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref, rtol=0, atol=0)


def test_lora_and_adapters_combine(make_cfg):
    model = build_model(make_cfg(), V)
    apply_adapters(model, bottleneck=4)
    names = apply_lora(model, LoraConfig(target_modules="all-linear"), freeze_base=False)
    assert len(names) == 14 and not any("adapter" in n for n in names)
    trainable = set(trainable_parameter_names(model))
    assert any("lora_A" in n for n in trainable) and any(".adapter." in n for n in trainable)
    assert not any(n.endswith("base.weight") for n in trainable)


# ---------------------------------------------------------------------------------- prompt tuning


@pytest.mark.parametrize("tie", [False, True])
def test_prompt_tuning_loss_and_training(make_cfg, tie):
    model = build_model(make_cfg(tie_embeddings=tie), V)
    pt = PromptTunedModel(model, num_virtual_tokens=5, seed=7)
    tokens, targets = _batch()
    P = 5
    ids = pt.init_token_ids
    torch.testing.assert_close(pt.soft_prompt.weight, model.tok_embeddings.weight[ids])

    with torch.no_grad():
        # At init the soft prompt is real token embeddings: the base model on [ids, tokens].
        full_tokens = torch.cat([ids.expand(2, -1), tokens], dim=1)
        full_targets = torch.cat([torch.full((2, P), IGNORE_INDEX), targets], dim=1)
        torch.testing.assert_close(pt(tokens, targets), model(full_tokens, full_targets))
        logits = pt(tokens)
        assert logits.shape == (2, 16, V)
        torch.testing.assert_close(logits, model(full_tokens)[:, P:])
        # Hand computation: mean cross-entropy over the real, non-ignored positions.
        hand = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(pt(tokens, targets), hand)

    assert trainable_parameter_names(pt) == ["soft_prompt.weight"]
    before = _snapshot(pt)
    _train(pt)
    _assert_only_changed(before, pt, {"soft_prompt.weight"})
    with pytest.raises(ValueError, match="leaves 59 for real tokens"):
        pt(torch.zeros(1, 60, dtype=torch.long))


def test_prompt_init_is_seeded(make_cfg):
    model = build_model(make_cfg(), V)
    a = PromptTunedModel(model, 4, seed=1).init_token_ids
    b = PromptTunedModel(model, 4, seed=1).init_token_ids
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- freezing


def test_trainable_names_and_state(make_cfg):
    model = build_model(make_cfg(tie_embeddings=True), V)
    for n, p in model.named_parameters():
        p.requires_grad_("norm" in n)
    names = trainable_parameter_names(model)
    assert names == [
        "layers.0.attention_norm.weight",
        "layers.0.mlp_norm.weight",
        "layers.1.attention_norm.weight",
        "layers.1.mlp_norm.weight",
        "norm.weight",
    ]

    apply_lora(model, LoraConfig(rank=2), freeze_base=False)
    sd = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(sd) == expected
    assert all(not t.requires_grad for t in sd.values())
    assert sum(t.numel() for t in sd.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_unfreeze_schedule_top_down(make_cfg):
    sched = unfreeze_schedule(n_layers=4, every_steps=10)
    assert [sched(s) for s in (0, 9, 10, 25, 30, 1000)] == [
        {3},
        {3},
        {2, 3},
        {1, 2, 3},
        {0, 1, 2, 3},
        {0, 1, 2, 3},
    ]
    with pytest.raises(ValueError):
        unfreeze_schedule(4, 0)

    model = build_model(make_cfg(n_layers=3), V)
    set_trainable_layers(model, unfreeze_schedule(3, 5)(0))
    trainable = trainable_parameter_names(model)
    assert all(n.startswith(("layers.2.", "norm.", "lm_head.")) for n in trainable)
    assert "tok_embeddings.weight" not in trainable
    set_trainable_layers(model, unfreeze_schedule(3, 5)(10))
    assert "tok_embeddings.weight" in trainable_parameter_names(model)
    assert len(trainable_parameter_names(model)) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------- L2-SP


def test_l2sp_penalty(make_cfg):
    model = build_model(make_cfg(), V)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("layers.1.mlp."))
    apply_lora(model, LoraConfig(target_modules=["q_proj"]), freeze_base=False)
    reg = L2SP(model, strength=0.3)
    assert set(reg.reference) == {f"layers.1.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert reg.penalty(model).item() == 0.0

    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[0, 0] += 2.0
        model.layers[1].mlp.down_proj.weight[1, :3] -= 1.0
        model.layers[0].attention.q_proj.lora_B.weight.fill_(5.0)  # excluded: no pretrained value
    hand = 0.3 / 2 * (2.0**2 + 3 * 1.0**2)
    assert reg.penalty(model).item() == pytest.approx(hand, rel=1e-5)

    # Differentiable, and it pulls toward w0; frozen params still untouched under training.
    before = _snapshot(model)
    trainable = set(trainable_parameter_names(model))
    _train(model, steps=3, extra_loss=reg.penalty)
    _assert_only_changed(before, model, trainable)


# ---------------------------------------------------------------------------------- layer-wise lr


@pytest.mark.parametrize("tie", [False, True])
def test_layerwise_lr_groups(make_cfg, tie):
    L = 3
    model = build_model(make_cfg(n_layers=L, tie_embeddings=tie), V)
    base_lr, decay = 1e-3, 0.5
    groups = layerwise_lr_groups(model, base_lr, decay, weight_decay=0.1)

    by_name = {g["name"]: g for g in groups}
    assert len(by_name) == len(groups)
    for i in range(L):
        assert by_name[f"layer{i}.decay"]["lr"] == pytest.approx(base_lr * decay ** (L - i))
        assert by_name[f"layer{i}.no_decay"]["weight_decay"] == 0.0  # norms
        assert by_name[f"layer{i}.decay"]["weight_decay"] == 0.1
    assert by_name["head.no_decay"]["lr"] == base_lr  # final norm
    if tie:
        assert "embeddings.no_decay" not in by_name  # the tied matrix is the head
    else:
        assert by_name["embeddings.no_decay"]["lr"] == pytest.approx(base_lr * decay ** (L + 1))
        assert by_name["head.decay"]["lr"] == base_lr

    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    torch.optim.AdamW(groups)  # valid param groups

    # With LoRA only the LoRA matrices reach the optimizer, at their layer's rate.
    apply_lora(model, LoraConfig(rank=2))
    groups = layerwise_lr_groups(model, base_lr, decay, weight_decay=0.1)
    assert sorted(g["name"] for g in groups) == [f"layer{i}.decay" for i in range(L)]
    assert sum(len(g["params"]) for g in groups) == len(trainable_parameter_names(model))


def test_layerwise_lr_groups_with_soft_prompt(make_cfg):
    pt = PromptTunedModel(build_model(make_cfg(), V), 3)
    groups = layerwise_lr_groups(pt, 1e-3, 0.8, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("head.no_decay", 1e-3, 0.0)]
    with pytest.raises(ValueError, match="decay"):
        layerwise_lr_groups(pt, 1e-3, 0.0, 0.1)


def _trained_prompt(make_cfg, P: int = 5, seed: int = 7) -> PromptTunedModel:
    """A PromptTunedModel whose soft prompt is no longer token embeddings (as after training)."""
    pt = PromptTunedModel(build_model(make_cfg(), V), num_virtual_tokens=P, seed=seed).eval()
    with torch.no_grad():
        pt.soft_prompt.weight.add_(torch.randn_like(pt.soft_prompt.weight))
    return pt


def test_prompt_kv_cache_generation_equals_full_recompute(make_cfg):
    from orchestra.model.generate import context_length, generate
    from orchestra.model.transformer import KVCache

    pt = _trained_prompt(make_cfg)
    prompt = torch.randint(0, V, (2, 7))
    out = generate(pt, prompt, max_new_tokens=12, temperature=0.0)
    ref = prompt
    with torch.no_grad():  # reference: the whole sequence through the full forward at every step
        for _ in range(12):
            ref = torch.cat([ref, pt(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, ref)
        # The cached logits themselves, step by step, match the full forward's.
        cache = KVCache(2, pt.model.cfg, 5 + ref.shape[1])
        full = pt(ref)
        torch.testing.assert_close(pt(ref[:, :7], kv_cache=cache), full[:, :7], atol=1e-5, rtol=0)
        for i in range(7, ref.shape[1]):
            step = pt(ref[:, i : i + 1], kv_cache=cache, start_pos=i)
            torch.testing.assert_close(step[:, 0], full[:, i], atol=1e-5, rtol=0)

    assert context_length(pt) == 64 - 5
    generate(pt, prompt, max_new_tokens=context_length(pt) - 7, temperature=0.0)  # fills it exactly
    with pytest.raises(ValueError, match="less 5 virtual tokens of the soft prompt = 59"):
        generate(pt, prompt, max_new_tokens=context_length(pt) - 6)
    with pytest.raises(ValueError, match="pass kv_cache"):
        pt(prompt, start_pos=3)
    with pytest.raises(ValueError, match=r"prefill needs batch 2 x 12 \(5 virtual \+ 7 real"):
        pt(prompt, kv_cache=KVCache(2, pt.model.cfg, 11))


def test_prompt_of_token_embeddings_equals_base_on_those_tokens(make_cfg):
    """A soft prompt set to the embeddings of ids X gives the base model's logits on X + tokens."""
    from orchestra.model.transformer import KVCache

    pt = _trained_prompt(make_cfg, P=4)
    model = pt.model
    X = torch.tensor([3, 50, 7, 99])
    assert not torch.equal(X, pt.init_token_ids)
    with torch.no_grad():
        pt.soft_prompt.weight.copy_(model.tok_embeddings.weight[X])
        tokens = torch.randint(0, V, (2, 10))
        base = model(torch.cat([X.expand(2, -1), tokens], dim=1))[:, 4:]
        torch.testing.assert_close(pt(tokens), base, atol=1e-5, rtol=0)
        cache = KVCache(2, model.cfg, 4 + 10)
        prefill = pt(tokens[:, :6], kv_cache=cache)
        steps = [pt(tokens[:, i : i + 1], kv_cache=cache, start_pos=i) for i in range(6, 10)]
        torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), base, atol=1e-5, rtol=0)
