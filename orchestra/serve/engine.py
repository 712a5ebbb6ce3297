"""Continuous batching over the KV cache: requests join and leave a running batch.

One engine thread owns the model. Each turn of its loop admits waiting sequences into free
cache rows (one right-padded prefill call for all newcomers, written after the running rows),
then runs one decode step for every running row at its own position (per-row start positions,
see :class:`~orchestra.model.transformer.RowPositions`), and hands each row's new token to its
request. A row leaves as soon as it stops (a stop id, max_tokens, the context is full, or its
request is cancelled); the last row moves into its place, so the running rows are always the
cache's first rows and a decode step reads no empty row.

Why by hand: the serving engines that do this (vLLM, SGLang, TGI) run their own model code on
GPUs; this one runs our model, on CPU as well, so a checkpoint is served exactly as it was
trained and evaluated. For production traffic on GPUs, ``engine=vllm`` serves the exported folder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestra.model.generate import next_token
from orchestra.model.peft import PromptTunedModel
from orchestra.model.rope import length_dependent, original_length
from orchestra.model.transformer import KVCache, Transformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded (the OpenAI request's settings, validated by the server)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    # Also return the model's mean negative log-likelihood of the prompt (a drift signal).
    score_prompt: bool = False


@dataclass(frozen=True)
class Event:
    """What the engine tells a sequence's owner: a token, the end, or a failure."""

    kind: str  # "token" | "done" | "error"
    token: int | None = None
    finish_reason: str | None = None  # done: "stop" (a stop id) | "length" | "cancelled"
    prompt_nll: float | None = None  # with the first token, when score_prompt
    message: str = ""


class QueueFull(Exception):
    """More sequences than the waiting queue holds (the server answers 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new sequence (the server answers 503)."""


@dataclass(eq=False)
class GenerationSequence:
    """One sequence to generate: a prompt, its settings and where its events go.

    ``on_event`` is called from the engine thread; the server's hands each event to its event
    loop (``loop.call_soon_threadsafe``). ``cancel`` may be called from any thread.
    """

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """The model, its KV cache and the thread that decodes every running sequence together."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_batch_size: int,
        max_queue: int,
        metrics: Any | None = None,
        version: str = "",
        model_name: str = "",
    ) -> None:
        if isinstance(model, PromptTunedModel):
            self.base: Transformer = model.model
            self.soft_prompt: torch.nn.Module | None = model.soft_prompt
            self.virtual = model.num_virtual_tokens
        elif isinstance(model, Transformer):
            self.base, self.soft_prompt, self.virtual = model, None, 0
        else:
            raise TypeError(f"the engine serves an Orchestra Transformer, got {type(model).__name__}")
        cfg = self.base.cfg
        positions = cfg.max_seq_len
        if length_dependent(cfg):
            # Dynamic NTK / LongRoPE tables depend on the sequence length past the original
            # context, which rows of one batch do not share: serve the original context.
            positions = original_length(cfg)
        self.context = positions - self.virtual  # real tokens (prompt + generated) per sequence
        if self.context < 2:
            raise ValueError(
                f"the model's context ({positions} positions, {self.virtual} virtual) is too short"
            )
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.labels = {"version": version, "model": model_name}
        param = next(self.base.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache(max_batch_size, cfg, positions, device=self.device, dtype=self.dtype)
        self.rows: list[GenerationSequence] = []  # running sequences; row i is cache row i
        self.positions: list[int] = []  # next cache position of each row (virtual tokens included)
        self.waiting: deque[GenerationSequence] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="orchestra-engine", daemon=True)

    # -- the owner's side -------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit(self, sequences: Sequence[GenerationSequence]) -> None:
        """Queue sequences (all or none); QueueFull when the waiting queue would overflow."""
        for seq in sequences:
            if not seq.prompt or len(seq.prompt) + seq.params.max_tokens > self.context:
                raise ValueError(
                    f"prompt of {len(seq.prompt)} tokens + max_tokens {seq.params.max_tokens} does not fit "
                    f"the context of {self.context} tokens"
                )
        with self.cond:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            free = self.max_batch_size - len(self.rows)
            if len(self.waiting) + len(sequences) - max(free, 0) > self.max_queue:
                raise QueueFull(
                    f"the queue is full ({len(self.waiting)} waiting, {len(self.rows)} running); retry later"
                )
            for seq in sequences:
                if seq.params.seed is not None:
                    seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
                self.waiting.append(seq)
            self._gauges()
            self.cond.notify()

    def stop(self, timeout: float | None = None) -> bool:
        """Take no new sequence, finish those queued and running, then end the thread.

        Returns whether the thread ended within ``timeout``; sequences still running then are
        cancelled.
        """
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)
        if self.thread.is_alive():
            with self.cond:
                for seq in [*self.rows, *self.waiting]:
                    seq.cancel()
                self.cond.notify()
            self.thread.join(5.0)
        return not self.thread.is_alive()

    def load(self) -> tuple[int, int]:
        """(waiting, running) sequences."""
        with self.cond:
            return len(self.waiting), len(self.rows)

    # -- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.rows and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.waiting and not self.rows:
                    return
                joiners: list[GenerationSequence] = []
                while self.waiting and len(self.rows) + len(joiners) < self.max_batch_size:
                    seq = self.waiting.popleft()
                    if seq.cancelled:
                        seq.on_event(Event("done", finish_reason="cancelled"))
                    else:
                        joiners.append(seq)
            try:
                with torch.inference_mode():
                    if joiners:
                        self._prefill(joiners)
                    self._leave()
                    if self.rows:
                        self._decode()
                    self._leave()
            except Exception as err:  # a failed step fails its sequences, never the server
                log.exception("engine step failed")
                for seq in dict.fromkeys([*self.rows, *joiners]):
                    if not seq.cancelled:
                        seq.cancel()
                        seq.on_event(Event("error", message=f"{type(err).__name__}: {err}"))
                self.rows.clear()
                self.positions.clear()
            with self.cond:
                self._gauges()

    def _prefill(self, joiners: list[GenerationSequence]) -> None:
        """Prompts of the newcomers, right-padded into rows len(rows).., and their first tokens.

        The padding writes keys past a row's prompt; its decode steps overwrite each such
        position before any of its queries can see it (a query sees keys up to its own position).
        """
        k = len(joiners)
        lengths = [len(s.prompt) for s in joiners]
        width = max(lengths)
        batch = torch.zeros(k, width, dtype=torch.long)
        for i, seq in enumerate(joiners):
            batch[i, : lengths[i]] = torch.tensor(seq.prompt)
        batch = batch.to(self.device)
        prefix = self.soft_prompt(k) if self.soft_prompt is not None else None
        self.cache.first_row = len(self.rows)
        try:
            h = self.base.hidden_states(
                batch,
                kv_cache=self.cache,
                start_pos=torch.zeros(k, dtype=torch.long, device=self.device),
                prefix_embeds=prefix,
            )
        finally:
            self.cache.first_row = 0
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.base.logits(h[torch.arange(k, device=self.device), last])
        for i, seq in enumerate(joiners):
            nll = self._prompt_nll(h[i, : lengths[i]], seq.prompt) if seq.params.score_prompt else None
            self.rows.append(seq)
            self.positions.append(self.virtual + lengths[i])
            if self.metrics is not None:
                self.metrics.observe_first_token(**self.labels, seconds=time.monotonic() - seq.submitted)
            self._emit(seq, self._sample(logits[i : i + 1], seq), nll)

    def _prompt_nll(self, h: torch.Tensor, prompt: list[int]) -> float | None:
        """Mean negative log-likelihood of the prompt's tokens after its first (None for one token)."""
        if len(prompt) < 2:
            return None
        targets = torch.tensor(prompt[1:], device=h.device)
        total = 0.0
        for lo in range(0, len(prompt) - 1, 256):  # [256, V] logits at a time, whatever the vocabulary
            logprobs = torch.log_softmax(self.base.logits(h[lo : min(lo + 256, len(prompt) - 1)]), dim=-1)
            total -= float(logprobs.gather(1, targets[lo : lo + 256, None]).sum())
        return total / (len(prompt) - 1)

    def _decode(self) -> None:
        """One token for every running row, each at its own position."""
        started = time.monotonic()
        tokens = torch.tensor([[s.generated[-1]] for s in self.rows], device=self.device)
        start = torch.tensor(self.positions, device=self.device)
        h = self.base.hidden_states(tokens, kv_cache=self.cache, start_pos=start)
        logits = self.base.logits(h[:, -1])
        B = len(self.rows)
        greedy = [i for i, s in enumerate(self.rows) if s.params.temperature == 0.0]
        picked: dict[int, int] = {}
        if greedy:
            best = logits[greedy].argmax(dim=-1).tolist()
            picked = dict(zip(greedy, best, strict=True))
        for i, seq in enumerate(self.rows):
            self.positions[i] += 1
            token = picked[i] if i in picked else self._sample(logits[i : i + 1], seq)
            self._emit(seq, token, None)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.observe_batch(**self.labels, size=B)
            self.metrics.observe_decode(**self.labels, tokens=B, seconds=time.monotonic() - started)

    def _sample(self, logits: torch.Tensor, seq: GenerationSequence) -> int:
        p = seq.params
        return int(next_token(logits, p.temperature, p.top_k, p.top_p, seq.generator)[0, 0])

    def _emit(self, seq: GenerationSequence, token: int, prompt_nll: float | None) -> None:
        """Hand a new token over, or the end when it is a stop id (which is not part of the text)."""
        if seq.cancelled:
            return
        if token in seq.params.stop_ids:
            seq.cancelled = True  # leaves at the next _leave
            seq.on_event(Event("done", finish_reason="stop", prompt_nll=prompt_nll))
            return
        seq.generated.append(token)
        seq.on_event(Event("token", token=token, prompt_nll=prompt_nll))
        if (
            len(seq.generated) >= seq.params.max_tokens
            or len(seq.prompt) + len(seq.generated) >= self.context
        ):
            seq.cancelled = True
            seq.on_event(Event("done", finish_reason="length"))

    def _leave(self) -> None:
        """Drop finished or cancelled rows; the last running row moves into each freed row."""
        i = 0
        while i < len(self.rows):
            seq = self.rows[i]
            if not seq.cancelled:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                end = self.positions[last]
                for layer in range(len(self.cache.k)):
                    self.cache.k[layer][i, :, :end] = self.cache.k[layer][last, :, :end]
                    self.cache.v[layer][i, :, :end] = self.cache.v[layer][last, :, :end]
                self.rows[i], self.positions[i] = self.rows[last], self.positions[last]
            self.rows.pop()
            self.positions.pop()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(**self.labels, depth=len(self.waiting))
            self.metrics.set_running(**self.labels, running=len(self.rows))


def prompt_ids_for_chat(evaluated: Any, messages: list[dict[str, str]]) -> list[int]:
    """The tokens of a chat up to the assistant's answer, rendered as fine-tuning renders it.

    Rendered with an empty assistant turn appended: the prompt is what precedes that turn's
    trained span, so the chat template (the model's own, or Orchestra's plain one) frames it
    exactly as in training and evaluation.
    """
    from orchestra.eval.tasks.generation import prompt_ids

    return prompt_ids(evaluated, [[*messages, {"role": "assistant", "content": ""}]])[0]
