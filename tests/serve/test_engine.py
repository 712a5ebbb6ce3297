"""The continuous-batching engine against one-at-a-time generation (orchestra.model.generate)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from orchestra.model import build_model, generate
from orchestra.model.config import KernelBackend, ModelConfig
from orchestra.model.peft import PromptTunedModel
from orchestra.serve.engine import Engine, Event, GenerationSequence, QueueFull, SamplingParams

V = 97


def _model(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=48, kernels=KernelBackend.torch
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return build_model(cfg, V).eval()


class Collector:
    """Events of one sequence, and a flag once it is done."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.kind != "token":
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if e.kind == "token" and e.token is not None]

    @property
    def finish(self) -> str | None:
        return next((e.finish_reason for e in self.events if e.kind == "done"), None)


def _alone(model: torch.nn.Module, prompt: list[int], n: int, stop: tuple[int, ...] = ()) -> list[int]:
    out = generate(model, torch.tensor(prompt), n, temperature=0.0)[len(prompt) :].tolist()  # type: ignore[arg-type]
    return out[: next((i for i, t in enumerate(out) if t in stop), len(out))]


@pytest.mark.parametrize(
    "variant", ["plain", "window_softcap", "soft_prompt"], ids=["llama", "gemma2_like", "prompt_tuned"]
)
def test_staggered_requests_get_their_own_greedy_continuations(variant: str) -> None:
    """Requests arriving while others run (joining and leaving the batch, rows moved when one
    leaves) each get exactly what generate() gives them alone."""
    if variant == "window_softcap":
        model = _model(sliding_window=4, global_every=2, attn_softcap=30.0, final_softcap=20.0)
    else:
        model = _model()
    if variant == "soft_prompt":
        model = PromptTunedModel(model, num_virtual_tokens=5).eval()  # type: ignore[arg-type]
    engine = Engine(model, max_batch_size=3, max_queue=16)
    engine.start()
    gen = torch.Generator().manual_seed(1)
    jobs = []
    for i, (length, n) in enumerate([(5, 12), (1, 3), (17, 9), (8, 20), (3, 6), (11, 1), (2, 15)]):
        prompt = torch.randint(0, V, (length,), generator=gen).tolist()
        collector = Collector()
        engine.submit([GenerationSequence(prompt, SamplingParams(max_tokens=n, temperature=0.0), collector)])
        jobs.append((prompt, n, collector))
        if i % 2:
            time.sleep(0.01)  # let some join a running batch
    for prompt, n, collector in jobs:
        assert collector.done.wait(30)
        assert collector.finish == "length"
        assert collector.tokens == _alone(model, prompt, n), (len(prompt), n)
    assert engine.stop(10)
    assert engine.steps > 0


def test_stop_ids_end_a_sequence_and_are_not_returned() -> None:
    model = _model()
    prompt = [3, 1, 4, 1, 5]
    free = _alone(model, prompt, 10)
    stop = (free[3],)
    engine = Engine(model, max_batch_size=2, max_queue=4)
    engine.start()
    c = Collector()
    engine.submit([GenerationSequence(prompt, SamplingParams(10, temperature=0.0, stop_ids=stop), c)])
    assert c.done.wait(30)
    assert c.finish == "stop" and c.tokens == free[: free.index(stop[0])]
    engine.stop(5)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch() -> None:
    model = _model()
    engine = Engine(model, max_batch_size=4, max_queue=8)
    engine.start()
    params = SamplingParams(12, temperature=0.8, top_p=0.9, seed=42)
    alone = Collector()
    engine.submit([GenerationSequence([5, 6, 7], params, alone)])
    assert alone.done.wait(30)
    crowd = [Collector() for _ in range(4)]
    engine.submit([GenerationSequence([5, 6, 7], params, crowd[0])])
    for i, c in enumerate(crowd[1:]):
        engine.submit(
            [GenerationSequence([9, 8, 7, 6][: i + 1], SamplingParams(12, temperature=1.0, seed=i), c)]
        )
    for c in crowd:
        assert c.done.wait(30)
    assert crowd[0].tokens == alone.tokens
    engine.stop(5)


def test_cancel_frees_the_row_and_the_queue_is_bounded() -> None:
    model = _model()
    engine = Engine(model, max_batch_size=1, max_queue=1)
    first = Collector()
    seq = GenerationSequence([1, 2], SamplingParams(40, temperature=0.0), first)

    def cancel_after_three(event: Event) -> None:  # the client goes away after three tokens
        first(event)
        if len(first.tokens) == 3:
            seq.cancel()

    seq.on_event = cancel_after_three
    engine.submit([seq])
    second = Collector()
    engine.submit([GenerationSequence([1, 2, 3], SamplingParams(4, temperature=0.0), second)])
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([GenerationSequence([4], SamplingParams(2, temperature=0.0), Collector())])
    engine.start()
    assert second.done.wait(30) and second.finish == "length"  # it got the freed row
    assert len(first.tokens) == 3 and not first.done.is_set()
    with pytest.raises(ValueError, match="does not fit the context of 48 tokens"):
        engine.submit([GenerationSequence(list(range(40)), SamplingParams(9), Collector())])
    assert engine.stop(5)


def test_prompt_nll_is_the_models_own() -> None:
    model = _model()
    engine = Engine(model, max_batch_size=2, max_queue=2)
    engine.start()
    prompt = [7, 3, 9, 27, 1, 8]
    c = Collector()
    engine.submit([GenerationSequence(prompt, SamplingParams(2, temperature=0.0, score_prompt=True), c)])
    assert c.done.wait(30)
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt]))[0, :-1].log_softmax(-1)
    want = -logprobs.gather(1, torch.tensor(prompt[1:])[:, None]).mean().item()
    assert c.events[0].prompt_nll == pytest.approx(want, rel=1e-5)
    engine.stop(5)
