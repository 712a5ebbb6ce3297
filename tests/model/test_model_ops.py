"""The ops table: selection by model.kernels, ops that follow the tensors' device, the reference numerics."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from orchestra.config import ConfigError, KernelBackend, ModelConfig
from orchestra.model import Transformer
from orchestra.model.ops import TORCH_OPS, VARIANTS, Ops, get_ops


class FakeKernels(SimpleNamespace):
    """Stands in for orchestra.kernels: its public functions, PyTorch's math, each call counted."""

    def __init__(self, interpret: bool) -> None:
        calls: list[str] = []

        def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                return fn(*args, **kwargs)

            return call

        super().__init__(
            INTERPRET=interpret,
            calls=calls,
            rms_norm=SimpleNamespace(rms_norm=counted("rms_norm", TORCH_OPS.rms_norm)),
            rope=SimpleNamespace(apply_rope=counted("apply_rope", TORCH_OPS.apply_rope)),
            swiglu=SimpleNamespace(swiglu=counted("swiglu", TORCH_OPS.swiglu)),
            add_rms_norm=SimpleNamespace(add_rms_norm=counted("add_rms_norm", TORCH_OPS.add_rms_norm)),
            linear_cross_entropy=SimpleNamespace(
                linear_cross_entropy=counted("linear_cross_entropy", TORCH_OPS.linear_cross_entropy)
            ),
        )

    def table(self) -> Ops:
        """The Triton table ops.py should build from these functions."""
        return Ops(
            "triton",
            rms_norm=self.rms_norm.rms_norm,
            apply_rope=self.rope.apply_rope,
            swiglu=self.swiglu.swiglu,
            add_rms_norm=self.add_rms_norm.add_rms_norm,
            linear_cross_entropy=self.linear_cross_entropy.linear_cross_entropy,
            unsupported=frozenset(VARIANTS),
        )


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA (propagated through every op), to fake a GPU input."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


@pytest.fixture
def no_triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `from orchestra.kernels import ...` fail, whatever this build contains."""
    monkeypatch.setitem(sys.modules, "orchestra.kernels", None)


@pytest.fixture
def fake_kernels(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeKernels]:
    """Install a FakeKernels as orchestra.kernels; ``cuda`` fakes whether this process has a GPU."""

    def install(interpret: bool = False, cuda: bool | None = None) -> FakeKernels:
        fake = FakeKernels(interpret)
        monkeypatch.setitem(sys.modules, "orchestra.kernels", fake)
        if cuda is not None:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        return fake

    return install


def _twins(make_cfg: Callable[..., ModelConfig], kernels: KernelBackend) -> tuple[Transformer, Transformer]:
    """A model with ``kernels`` and a kernels=torch one with the same weights."""
    torch.manual_seed(0)
    model = Transformer(make_cfg(kernels=kernels), 64)
    torch.manual_seed(0)
    return model, Transformer(make_cfg(kernels=KernelBackend.torch), 64)


def test_torch_and_auto_on_cpu_are_the_reference(make_cfg: Callable[..., ModelConfig]) -> None:
    assert get_ops(KernelBackend.torch, "cpu") is TORCH_OPS
    assert get_ops("torch", "cuda") is TORCH_OPS
    assert get_ops(KernelBackend.auto, "cpu") is TORCH_OPS
    # On any machine (with a GPU too), an auto model fed CPU tensors computes exactly the reference.
    model, ref = _twins(make_cfg, KernelBackend.auto)
    tokens = torch.randint(0, 64, (2, 9))
    assert model.ops.table(tokens) is TORCH_OPS
    assert torch.equal(model(tokens), ref(tokens))
    assert torch.equal(model(tokens, tokens), ref(tokens, tokens))


def test_auto_on_cuda_falls_back_without_kernels(no_triton_kernels: None) -> None:
    assert get_ops("auto", "cuda") is TORCH_OPS


def test_triton_without_kernels_is_a_config_error(no_triton_kernels: None) -> None:
    with pytest.raises(ConfigError, match=r"model.kernels=triton.*not available in this build.*torch or"):
        get_ops(KernelBackend.triton, "cuda")


@pytest.mark.parametrize("cuda", [False, True])
def test_triton_without_kernels_on_cpu_is_a_config_error(
    no_triton_kernels: None,
    monkeypatch: pytest.MonkeyPatch,
    make_cfg: Callable[..., ModelConfig],
    cuda: bool,
) -> None:
    with pytest.raises(ConfigError, match=r"model.kernels=triton.*not available in this build"):
        get_ops("triton", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(ConfigError, match=r"model.kernels=triton.*not available in this build"):
        Transformer(make_cfg(kernels=KernelBackend.triton), 64)


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"'cuda'.*\['auto', 'torch', 'triton'\]"):
        get_ops("cuda", "cpu")


def test_triton_picks_the_kernels_table_when_present(fake_kernels: Callable[..., FakeKernels]) -> None:
    fake = fake_kernels(interpret=False)
    assert get_ops("triton", "cuda") == fake.table()
    assert get_ops("auto", "cuda") == fake.table()
    assert get_ops("auto", "cpu") is TORCH_OPS
    with pytest.raises(ConfigError, match=r"model.kernels=triton.*CUDA.*'cpu'.*torch.*TRITON_INTERPRET=1"):
        get_ops("triton", "cpu")


def test_triton_on_cpu_in_interpreter_mode(fake_kernels: Callable[..., FakeKernels]) -> None:
    """Kernels built for Triton's CPU interpreter are accepted off CUDA, but only when asked for."""
    fake = fake_kernels(interpret=True)
    assert get_ops("triton", "cpu") == fake.table()
    assert get_ops("auto", "cpu") is TORCH_OPS  # auto never picks the ~2000x slower interpreter
    assert get_ops("auto", "cuda") == fake.table()


def test_model_built_on_a_gpu_machine_follows_the_tensors(
    fake_kernels: Callable[..., FakeKernels], make_cfg: Callable[..., ModelConfig]
) -> None:
    """kernels=auto built where CUDA is available: CPU tensors take torch's ops, CUDA tensors Triton's."""
    fake = fake_kernels(interpret=False, cuda=True)
    model, ref = _twins(make_cfg, KernelBackend.auto)
    tokens = torch.randint(0, 64, (2, 9))
    assert model.ops.table(tokens) is TORCH_OPS
    assert torch.equal(model(tokens, tokens), ref(tokens, tokens))
    assert fake.calls == []  # a CPU forward never entered the (fake) Triton kernels

    on_cuda = tokens.as_subclass(OnCuda)
    assert model.ops.table(on_cuda) == fake.table()
    assert torch.equal(model(on_cuda, on_cuda), ref(tokens, tokens))  # the fakes compute torch's math
    per_layer = ["rms_norm", "apply_rope", "add_rms_norm", "swiglu"]
    assert fake.calls == per_layer * 2 + ["rms_norm", "linear_cross_entropy"]


def test_triton_model_built_on_a_gpu_machine_refuses_cpu_tensors(
    fake_kernels: Callable[..., FakeKernels], make_cfg: Callable[..., ModelConfig]
) -> None:
    """kernels=triton never falls back: a CPU forward is a ConfigError, a CUDA one runs Triton."""
    fake = fake_kernels(interpret=False, cuda=True)
    model = Transformer(make_cfg(kernels=KernelBackend.triton), 64)
    tokens = torch.randint(0, 64, (2, 9))
    with pytest.raises(ConfigError, match=r"model.kernels=triton.*CUDA.*'cpu'.*torch.*TRITON_INTERPRET=1"):
        model(tokens)
    assert fake.calls == []
    model(tokens.as_subclass(OnCuda))
    assert fake.calls[:2] == ["rms_norm", "apply_rope"]


def test_triton_model_without_cuda_or_interpreter_is_refused_when_built(
    fake_kernels: Callable[..., FakeKernels], make_cfg: Callable[..., ModelConfig]
) -> None:
    fake_kernels(interpret=False, cuda=False)
    with pytest.raises(ConfigError, match=r"model.kernels=triton.*CUDA.*'cpu'"):
        Transformer(make_cfg(kernels=KernelBackend.triton), 64)


def test_triton_model_in_interpreter_mode_runs_cpu_tensors_in_triton(
    fake_kernels: Callable[..., FakeKernels], make_cfg: Callable[..., ModelConfig]
) -> None:
    fake = fake_kernels(interpret=True, cuda=False)
    model, ref = _twins(make_cfg, KernelBackend.triton)
    tokens = torch.randint(0, 64, (2, 9))
    assert model.ops.table(tokens) == fake.table()
    assert torch.equal(model(tokens, tokens), ref(tokens, tokens))
    assert fake.calls[-1] == "linear_cross_entropy"
    auto = Transformer(make_cfg(kernels=KernelBackend.auto), 64)
    assert auto.ops.table(tokens) is TORCH_OPS  # auto never picks the interpreter


def test_rms_norm_fp32_math_and_dtype():
    x = torch.randn(3, 5, 64)
    w = torch.randn(64)
    out = TORCH_OPS.rms_norm(x, w, 1e-5)
    ref = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, ref)
    xb = x.to(torch.bfloat16)
    ob = TORCH_OPS.rms_norm(xb, w.to(torch.bfloat16), 1e-5)
    assert ob.dtype == torch.bfloat16
    torch.testing.assert_close(ob.float(), ref, rtol=2e-2, atol=2e-2)


def _rotate_pairs_reference(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE written independently: dim i pairs with i + d/2, rotated by angle pos * theta^(-2i/d)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None, :]
    c = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(
        torch.ones_like(ang), ang
    )
    return torch.cat([c.real, c.imag], dim=-1).float()


def test_apply_rope_matches_complex_rotation():
    from orchestra.model.transformer import rope_cache

    T, hd, theta = 12, 16, 10000.0
    cos, sin = rope_cache(hd, T, theta)
    q, k = torch.randn(2, 4, T, hd), torch.randn(2, 2, T, hd)
    qr, kr = TORCH_OPS.apply_rope(q, k, cos, sin)
    pos = torch.arange(T)
    torch.testing.assert_close(qr, _rotate_pairs_reference(q, pos, theta), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kr, _rotate_pairs_reference(k, pos, theta), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    from orchestra.model.transformer import rope_cache

    hd = 16
    cos, sin = rope_cache(hd, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(m: int, n: int) -> torch.Tensor:
        qm, _ = TORCH_OPS.apply_rope(q, q, cos[m : m + 1], sin[m : m + 1])
        kn, _ = TORCH_OPS.apply_rope(k, k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17), rtol=1e-5, atol=1e-5)


def test_swiglu():
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(TORCH_OPS.swiglu(g, u), g * torch.sigmoid(g) * u)


def test_linear_cross_entropy_reference_and_ignore_index():
    h, w = torch.randn(10, 32), torch.randn(37, 32)
    t = torch.randint(0, 37, (10,))
    t[[1, 4]] = -100
    loss = TORCH_OPS.linear_cross_entropy(h, w, t)
    logits = h @ w.T
    keep = t != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], t[keep]))
    t2 = t.clone()
    t2[t2 == -100] = 7
    t2[[1, 4]] = -1
    torch.testing.assert_close(TORCH_OPS.linear_cross_entropy(h, w, t2, ignore_index=-1), loss)
    hb = h.to(torch.bfloat16)
    lb = TORCH_OPS.linear_cross_entropy(hb, w.to(torch.bfloat16), t)
    assert lb.dtype == torch.float32
