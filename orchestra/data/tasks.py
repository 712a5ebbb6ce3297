"""The data of the fine-tuning tasks: jsonl readers, chat rendering, SFT packing, datasets, DataModule.

Three jsonl formats, one record per line (blank lines skipped):

* sft: ``{"prompt": str, "response": str}`` or ``{"messages": [{"role": "system"|"user"|"assistant",
  "content": str}, ...]}`` ending with an assistant message. A prompt/response pair is the
  conversation [user: prompt, assistant: response].
* classification: ``{"text": str, "label": str}``.
* dpo: ``{"prompt": str, "chosen": str, "rejected": str}``.

A bad record is refused with one :class:`DataError` naming ``file:line`` and what is wrong;
nothing is ever written next to the user's files. Labels in ``labels`` are ``-100``
(:data:`IGNORE_INDEX`) where no loss is taken: the prompt, system and user turns, padding. No BOS
token is used; every trained response ends with the EOS token, which is trained, so the model
learns to stop.

Batches (what the LightningModule receives):

* sft: ``{"tokens", "labels", "segment_ids"}``, each ``[B, seq_len]`` int64. ``labels[t]`` is the
  target of position t (already shifted). Packed rows hold several examples; ``segment_ids`` is
  1, 2, 3... per example and 0 on the padding at the end of a row, for the attention mask.
* classification: ``{"tokens": [B, T], "last_index": [B], "labels": [B]}``, right-padded to the
  longest text of the batch; ``last_index`` is the position of each row's last real token.
* dpo: ``{"tokens": [2B, T], "labels": [2B, T]}``: the B chosen rows, then the B rejected rows,
  padded to one common length so both halves go through the model in one forward.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, default_collate

from orchestra.config import ConfigError, TaskConfig, TaskName
from orchestra.data.datamodule import TokenDataModule, _ResumableDataLoader
from orchestra.data.errors import DataError
from orchestra.data.sources import jsonl_records
from orchestra.data.tokenizer import EOS_TOKEN, vocab_size_of

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

Messages = list[dict[str, str]]
Segments = list[tuple[str, bool]]


# --------------------------------------------------------------------------- reading


def _records(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, record) for every non-blank line; a file with none is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: does not exist (expected a jsonl file of examples)")
    count = 0
    for where, record in jsonl_records(path):
        count += 1
        yield where, record
    if count == 0:
        raise DataError(f"{path}: no examples (the file is empty)")


def _text_field(record: Mapping[str, Any], key: str, where: str, expected: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (found {sorted(record)}; expected {expected})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


_SFT_FORMS = '{"prompt", "response"} or {"messages": [...]}'


def _messages(record: Mapping[str, Any], where: str) -> Messages:
    """A record of either sft form as a validated conversation."""
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(
                f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects"
            )
        messages: Messages = []
        for i, message in enumerate(raw):
            at = f"{where}: messages[{i}]"
            if not isinstance(message, dict):
                raise DataError(
                    f"{at} is {type(message).__name__}, expected an object with 'role' and 'content'"
                )
            role = message.get("role")
            if role not in ROLES:
                raise DataError(f"{at}: unknown role {role!r} (accepted: {', '.join(ROLES)})")
            content = _text_field(message, "content", at, "'role' and 'content'")
            messages.append({"role": role, "content": content})
        if messages[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: the last message is from {messages[-1]['role']!r}; a conversation must end with an "
                "assistant message (the part that is trained)"
            )
        return messages
    if "prompt" not in record and "response" not in record:
        raise DataError(
            f"{where}: missing field 'prompt'/'response' or 'messages' (found {sorted(record)}; "
            f"expected {_SFT_FORMS})"
        )
    prompt = _text_field(record, "prompt", where, _SFT_FORMS)
    response = _text_field(record, "response", where, _SFT_FORMS)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def read_sft(path: str | os.PathLike[str]) -> list[Messages]:
    """The conversations of an sft jsonl file (prompt/response pairs turned into two messages)."""
    return [_messages(record, where) for where, record in _records(path)]


def read_classification(
    path: str | os.PathLike[str], labels: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """(texts, labels) of a classification jsonl file; with ``labels`` given, any other label is refused."""
    known = set(labels) if labels is not None else None
    texts, found = [], []
    for where, record in _records(path):
        texts.append(_text_field(record, "text", where, '{"text", "label"}'))
        label = _text_field(record, "label", where, '{"text", "label"}')
        if known is not None and label not in known:
            raise DataError(
                f"{where}: unknown label {label!r} (known labels: {list(labels or [])}; set task.labels "
                "to list every class)"
            )
        found.append(label)
    return texts, found


def read_dpo(path: str | os.PathLike[str]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples of a dpo jsonl file."""
    expected = '{"prompt", "chosen", "rejected"}'
    triples = []
    for where, record in _records(path):
        prompt, chosen, rejected = (
            _text_field(record, key, where, expected) for key in ("prompt", "chosen", "rejected")
        )
        triples.append((prompt, chosen, rejected))
    return triples


# --------------------------------------------------------------------------- chat rendering


def as_messages(example: Mapping[str, Any] | Sequence[Mapping[str, str]]) -> Messages:
    """A record of either sft form, or an already built conversation, as a list of messages."""
    if isinstance(example, Mapping):
        return _messages(example, "example")
    return [{"role": m["role"], "content": m["content"]} for m in example]


def render_chat(
    messages: Sequence[Mapping[str, str]], template: str | None = None, eos_token: str = EOS_TOKEN
) -> Segments:
    """The conversation as text segments, each with whether it is trained on.

    Trained: the content of every assistant message and the marker that ends it; everything
    else (system and user turns, role headers) is context only.

    ``template=None`` is Orchestra's plain template: every message is ``"<|role|>\\n" + content +
    "\\n"``, and an assistant message is followed by ``eos_token``. Two turns read::

        <|user|>
        What is 2+2?
        <|assistant|>
        4
        <|endoftext|>

    Otherwise ``template`` is a Hugging Face style Jinja2 chat template over ``messages`` and
    ``add_generation_prompt`` (``eos_token`` and an empty ``bos_token`` are also defined). The
    assistant spans are found the standard way: the prompt before assistant message i is the
    render of ``messages[:i]`` with ``add_generation_prompt=True``, the turn ends where the render
    of ``messages[:i+1]`` ends, and both must be prefixes of the full render.
    """
    if template is None:
        segments: Segments = []
        for message in messages:
            header = f"<|{message['role']}|>\n"
            if message["role"] == "assistant":
                segments += [(header, False), (message["content"] + "\n", True), (eos_token, True)]
            else:
                segments.append((header + message["content"] + "\n", False))
        return _merge(segments)

    render = functools.partial(_render_template, _compile_template(template), eos_token=eos_token)
    full = render(messages, add_generation_prompt=False)
    segments, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        turn = render(messages[: i + 1], add_generation_prompt=False)
        if not (turn.startswith(prompt) and full.startswith(turn) and len(prompt) >= pos):
            raise DataError(
                f"task.chat_template: the render of the first {i} messages (with add_generation_prompt=true) "
                f"is not a prefix of the render with message {i}, so the assistant's text cannot be located; "
                "the template must render a conversation as its turns one after another"
            )
        segments += [(full[pos : len(prompt)], False), (full[len(prompt) : len(turn)], True)]
        pos = len(turn)
    segments.append((full[pos:], False))
    return _merge(segments)


def _merge(segments: Segments) -> Segments:
    """Drop empty segments and join neighbours with the same flag (fewer, longer tokenizer calls)."""
    out: Segments = []
    for text, trained in segments:
        if not text:
            continue
        if out and out[-1][1] == trained and not trained:
            out[-1] = (out[-1][0] + text, trained)
        else:
            out.append((text, trained))
    return out


@functools.lru_cache(maxsize=8)
def _compile_template(template: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    # The environment Hugging Face's apply_chat_template uses, so their templates render the same.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise DataError(
            f"task.chat_template: not a valid Jinja2 template (line {err.lineno}: {err.message})"
        ) from None


def _render_template(
    compiled: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, eos_token: str
) -> str:
    import jinja2

    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            eos_token=eos_token,
            bos_token="",
        )
    except jinja2.exceptions.TemplateError as err:
        raise DataError(f"task.chat_template: rendering failed ({err})") from None


# --------------------------------------------------------------------------- tokenizing


def _encode_texts(
    tokenizer: Tokenizer, texts: list[str], eos_id: int, eos_token: str | None
) -> list[list[int]]:
    """Token ids of each text; the EOS token's own text is always exactly [eos_id]."""
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    return [[eos_id] if text == eos_token else enc.ids for text, enc in zip(texts, encoded, strict=True)]


def encode_sft_batch(
    examples: Sequence[Mapping[str, Any] | Sequence[Mapping[str, str]]],
    tokenizer: Tokenizer,
    eos_id: int,
    template: str | None = None,
) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_sft` of many examples, with one batched tokenizer call."""
    eos_token = tokenizer.id_to_token(eos_id)
    rendered = [render_chat(as_messages(ex), template, eos_token or EOS_TOKEN) for ex in examples]
    pieces = _encode_texts(tokenizer, [text for segs in rendered for text, _ in segs], eos_id, eos_token)
    out, k = [], 0
    for segs in rendered:
        ids: list[int] = []
        labels: list[int] = []
        last_trained = 0  # one past the last trained token
        for _, trained in segs:
            piece = pieces[k]
            k += 1
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
            if trained and piece:
                last_trained = len(ids)
        if last_trained == 0:
            raise DataError(
                "an sft example renders to no trained (assistant) tokens; check task.chat_template"
            )
        if ids[last_trained - 1] != eos_id:
            # A custom template ends turns with its own marker; the model must still learn to stop.
            ids.insert(last_trained, eos_id)
            labels.insert(last_trained, eos_id)
        out.append((ids, labels))
    return out


def encode_sft(
    example: Mapping[str, Any] | Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    eos_id: int,
    template: str | None = None,
) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one sft example, labels ``-100`` wherever the text is not trained.

    Tokenized segment by segment (see :func:`render_chat`), so the mask boundary falls exactly
    between tokens of the prompt and of the response. The response always ends with a trained EOS.
    """
    return encode_sft_batch([example], tokenizer, eos_id, template)[0]


def encode_texts(texts: Sequence[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Plain token ids of texts (no special tokens added)."""
    return [enc.ids for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False)] if texts else []


# --------------------------------------------------------------------------- datasets


class SFTDataset(Dataset[dict[str, torch.Tensor]]):
    """Rows of exactly seq_len positions, one example each or several packed.

    Each example is shifted on its own (inputs ``ids[:-1]``, targets ``labels[1:]``), so no
    target ever crosses from one example into the next. ``pack=True`` fills rows greedily with
    whole examples in file order; the tail of a row is padding (``pad_id``, target -100, segment
    0). An example longer than seq_len keeps its start; one left with no trained target is dropped.
    """

    def __init__(
        self,
        examples_ids: Sequence[tuple[Sequence[int], Sequence[int]]],
        seq_len: int,
        pack: bool,
        pad_id: int,
        where: str = "sft",
    ) -> None:
        if seq_len <= 0:
            raise ConfigError(f"seq_len: must be positive, got {seq_len}")
        self.seq_len, self.pack = seq_len, pack
        examples: list[tuple[np.ndarray, np.ndarray]] = []
        self.truncated = self.dropped = 0
        for ids, labels in examples_ids:
            inputs = np.asarray(ids[:-1], dtype=np.int32)
            targets = np.asarray(labels[1:], dtype=np.int32)
            if len(inputs) > seq_len:
                self.truncated += 1
                inputs, targets = inputs[:seq_len], targets[:seq_len]
            if not (targets != IGNORE_INDEX).any():
                self.dropped += 1
                continue
            examples.append((inputs, targets))
        if self.truncated or self.dropped:
            log.warning(
                "%s: %d of %d examples are longer than seq_len=%d and were cut (their ends dropped); "
                "%d example(s) left with no trained token were left out",
                where,
                self.truncated,
                len(examples_ids),
                seq_len,
                self.dropped,
            )
        if not examples:
            raise DataError(f"{where}: no example has a trained token within seq_len={seq_len}")
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        used = seq_len + 1  # forces a new row for the first example
        for example in examples:
            if not pack or used + len(example[0]) > seq_len:
                rows.append([])
                used = 0
            rows[-1].append(example)
            used += len(example[0])
        self.examples = len(examples)
        self.tokens = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
        self.labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int32)
        self.segment_ids = np.zeros((len(rows), seq_len), dtype=np.int32)
        for r, row in enumerate(rows):
            pos = 0
            for s, (inputs, targets) in enumerate(row, start=1):
                end = pos + len(inputs)
                self.tokens[r, pos:end], self.labels[r, pos:end], self.segment_ids[r, pos:end] = (
                    inputs,
                    targets,
                    s,
                )
                pos = end

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": torch.from_numpy(self.tokens[index].astype(np.int64)),
            "labels": torch.from_numpy(self.labels[index].astype(np.int64)),
            "segment_ids": torch.from_numpy(self.segment_ids[index].astype(np.int64)),
        }


class ClassificationDataset(Dataset[dict[str, Any]]):
    """Texts as token ids (their first seq_len tokens) and class indices; padding is the collate's job."""

    def __init__(
        self,
        texts_ids: Sequence[Sequence[int]],
        label_ids: Sequence[int],
        seq_len: int,
        pad_id: int,
        where: str = "classification",
    ) -> None:
        if len(texts_ids) != len(label_ids):
            raise ValueError(f"{len(texts_ids)} texts but {len(label_ids)} labels")
        self.pad_id = pad_id
        self.texts = [np.asarray(ids[:seq_len], dtype=np.int32) for ids in texts_ids]
        self.labels = [int(y) for y in label_ids]
        if any(len(t) == 0 for t in self.texts):
            raise DataError(f"{where}: a text tokenizes to no tokens")
        self.truncated = sum(len(ids) > seq_len for ids in texts_ids)
        if self.truncated:
            log.warning(
                "%s: %d of %d texts are longer than seq_len=%d tokens; only their first %d tokens are read",
                where,
                self.truncated,
                len(texts_ids),
                seq_len,
                seq_len,
            )

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": torch.from_numpy(self.texts[index].astype(np.int64)), "label": self.labels[index]}


def collate_classification(batch: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest text; ``last_index`` points at each row's last real token."""
    lengths = [len(item["tokens"]) for item in batch]
    tokens = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    for i, item in enumerate(batch):
        tokens[i, : lengths[i]] = item["tokens"]
    return {
        "tokens": tokens,
        "last_index": torch.tensor(lengths, dtype=torch.long) - 1,
        "labels": torch.tensor([int(item["label"]) for item in batch], dtype=torch.long),
    }


def dpo_side(
    prompt: Sequence[int], response: Sequence[int], eos_id: int, seq_len: int
) -> tuple[list[int], list[int]]:
    """(inputs, targets) of prompt + response + EOS, shifted as in SFT, the prompt masked.

    At most seq_len positions: the prompt is kept whole and the response's end is cut; a prompt
    of seq_len tokens or more loses its start instead, so one response token always remains.
    """
    prompt = list(prompt)[-seq_len:]
    answer = [*response, eos_id][: seq_len + 1 - len(prompt)]
    ids = prompt + answer
    labels = [IGNORE_INDEX] * len(prompt) + answer
    return ids[:-1], labels[1:]


def dpo_row(ids: Sequence[int], labels: Sequence[int], seq_len: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one rendered side (ids + labels, prompt masked), cut as :func:`dpo_side` cuts."""
    ids, labels = list(ids), list(labels)
    n_prompt = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    if n_prompt >= seq_len:  # keep at least one response token: drop the prompt's start
        cut = n_prompt - seq_len + 1
        ids, labels = ids[cut:], labels[cut:]
    ids, labels = ids[: seq_len + 1], labels[: seq_len + 1]
    return ids[:-1], labels[1:]


class DPODataset(Dataset[dict[str, torch.Tensor]]):
    """(prompt, chosen, rejected) as two unpadded (tokens, labels) sequences sharing the prompt."""

    def __init__(
        self,
        examples_ids: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
        seq_len: int,
        eos_id: int,
        where: str = "dpo",
    ) -> None:
        if seq_len <= 0:
            raise ConfigError(f"seq_len: must be positive, got {seq_len}")
        self.pairs: list[tuple[np.ndarray, ...]] = []
        self.truncated = 0
        for prompt, chosen, rejected in examples_ids:
            longest = len(prompt) + max(len(chosen), len(rejected)) + 1
            self.truncated += longest > seq_len + 1
            sides = (dpo_side(prompt, chosen, eos_id, seq_len), dpo_side(prompt, rejected, eos_id, seq_len))
            self.pairs.append(tuple(np.asarray(x, dtype=np.int32) for side in sides for x in side))
        if self.truncated:
            log.warning(
                "%s: %d of %d examples are longer than seq_len=%d and were cut (the response's end, or "
                "the prompt's start for a very long prompt)",
                where,
                self.truncated,
                len(self.pairs),
                seq_len,
            )

    @classmethod
    def from_rendered(
        cls,
        sides: Sequence[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]],
        seq_len: int,
        where: str = "dpo",
    ) -> DPODataset:
        """Pairs already rendered through the chat template (as SFT renders them): ((ids, labels) x 2)."""
        self = cls([], seq_len, 0, where=where)
        for chosen, rejected in sides:
            self.truncated += max(len(chosen[0]), len(rejected[0])) > seq_len + 1
            rows = (dpo_row(*chosen, seq_len), dpo_row(*rejected, seq_len))
            self.pairs.append(tuple(np.asarray(x, dtype=np.int32) for side in rows for x in side))
        if self.truncated:
            log.warning(
                "%s: %d of %d examples are longer than seq_len=%d and were cut",
                where,
                self.truncated,
                len(self.pairs),
                seq_len,
            )
        return self

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        keys = ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels")
        return {k: torch.from_numpy(v.astype(np.int64)) for k, v in zip(keys, self.pairs[index], strict=True)}


def collate_dpo(batch: Sequence[Mapping[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one common length: ``[2B, T]``."""
    rows = [(item["chosen_tokens"], item["chosen_labels"]) for item in batch]
    rows += [(item["rejected_tokens"], item["rejected_labels"]) for item in batch]
    width = max(len(tokens) for tokens, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (t, y) in enumerate(rows):
        tokens[i, : len(t)], labels[i, : len(y)] = t, y
    return {"tokens": tokens, "labels": labels}


# --------------------------------------------------------------------------- paths and the DataModule


def resolve_task_paths(task: TaskConfig, cache_dir: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """(train, val) jsonl: the user's files when task.train_path is set, else the bundled examples."""
    name = TaskName(task.name)
    if name == TaskName.pretrain:
        raise ConfigError("task.name: pretrain reads the data group's packed corpus, not task jsonl files")
    if task.train_path is None:
        if task.val_path is not None:
            raise DataError(
                f"task.val_path: set ({task.val_path}) without task.train_path; set both, or neither "
                "to use the bundled examples"
            )
        from orchestra.data.examples import example_paths

        return example_paths(cache_dir, name.value)
    paths: list[Path | None] = []
    for key, value in (("task.train_path", task.train_path), ("task.val_path", task.val_path)):
        if value is None:
            paths.append(None)
            continue
        path = Path(os.path.expanduser(value))
        if not path.is_file():
            raise DataError(f"{key}: {value} does not exist (relative paths are resolved from {os.getcwd()})")
        paths.append(path)
    assert paths[0] is not None
    return paths[0], paths[1]


def hold_out(n: int, fraction: float, seed: int, where: str) -> tuple[list[int], list[int]]:
    """(train, val) indices, both in file order: a seeded ``fraction`` of n (at least one) for val."""
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise DataError(
            f"{where}: {n} example(s) cannot be split into train and val; add examples or set task.val_path"
        )
    val = np.random.default_rng(seed).permutation(n)[:n_val]
    mask = np.zeros(n, dtype=bool)
    mask[val] = True
    return np.flatnonzero(~mask).tolist(), np.flatnonzero(mask).tolist()


class TaskDataModule(TokenDataModule):
    """Train/val loaders of one fine-tuning task over jsonl files, resumable like pretraining.

    The records are read and checked at construction (a bad file fails before any model is
    built); tokenization happens once per split on first use, on every rank alike. Sampling,
    resume and the world-size-independent validation set are TokenDataModule's.
    """

    def __init__(
        self,
        task: TaskConfig,
        train_path: str | os.PathLike[str],
        val_path: str | os.PathLike[str] | None,
        tokenizer_json: str,
        eos_id: int,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        max_steps: int,
        val_batches: int,
        loader_workers: int = 1,
    ) -> None:
        L.LightningDataModule.__init__(self)  # not TokenDataModule's: there is no packed-corpus manifest
        self.task = task
        self.task_name = TaskName(task.name)
        if self.task_name == TaskName.pretrain:
            raise ConfigError(
                "task.name: TaskDataModule serves sft, classification and dpo; pretrain uses TokenDataModule"
            )
        self.train_path, self.val_path = Path(train_path), Path(val_path) if val_path is not None else None
        self._set_batching(
            seq_len, micro_batch_size, global_batch_size, seed, max_steps, val_batches, loader_workers
        )
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # tokenizers raises a bare Exception for parse errors
            raise DataError(f"tokenizer: not a valid Hugging Face tokenizer.json ({err})") from None
        self._eos_id = int(eos_id)
        self.label_names: list[str] = []
        self._records = self._read()

    # ------------------------------------------------------------------ records

    def _read(self) -> dict[str, list[Any]]:
        """Both splits' records, checked; the val split held out of train when there is no val file."""
        train_path, val_path = self.train_path, self.val_path
        if self.task_name == TaskName.classification:
            configured = list(self.task.labels) or None
            texts, labels = read_classification(train_path, configured)
            self.label_names = configured or sorted(set(labels))
            train: list[Any] = list(zip(texts, labels, strict=True))
            val: list[Any] | None = None
            if val_path is not None:
                val = list(zip(*read_classification(val_path, self.label_names), strict=True))
        elif self.task_name == TaskName.sft:
            train, val = read_sft(train_path), read_sft(val_path) if val_path is not None else None
        else:
            train, val = read_dpo(train_path), read_dpo(val_path) if val_path is not None else None
        if val is None:
            keep, held = hold_out(len(train), self.task.val_fraction, self.seed, str(train_path))
            train, val = [train[i] for i in keep], [train[i] for i in held]
            log.info(
                "%s: held out %d of %d examples for validation (task.val_fraction=%s)",
                train_path,
                len(val),
                len(train) + len(val),
                self.task.val_fraction,
            )
        return {"train": train, "val": val}

    def num_examples(self, split: str) -> int:
        return len(self._records[split])

    def class_counts(self, split: str) -> list[int]:
        """Examples per class (in label_names order), e.g. for the majority-class baseline."""
        if self.task_name != TaskName.classification:
            raise ConfigError(f"class_counts: task {self.task_name.value} has no classes")
        index = {name: i for i, name in enumerate(self.label_names)}
        counts = [0] * len(self.label_names)
        for _, label in self._records[split]:
            counts[index[label]] += 1
        return counts

    # ------------------------------------------------------------------ TokenDataModule overrides

    @property
    def vocab_size(self) -> int:
        return vocab_size_of(self.tokenizer)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def dataset(self, split: str) -> Dataset[Any]:
        """Tokenized on first use (deterministic, so every rank builds the same rows)."""
        if split not in self._records:
            raise ConfigError(f"split: {split!r} is not one of {sorted(self._records)}")
        if split not in self._datasets:
            self._datasets[split] = self._build(split)
        return self._datasets[split]

    def _build(self, split: str) -> Dataset[Any]:
        records, where = self._records[split], f"task={self.task_name.value} {split} split"
        if self.task_name == TaskName.sft:
            encoded = encode_sft_batch(records, self.tokenizer, self.eos_id, self.task.chat_template)
            return SFTDataset(encoded, self.seq_len, self.task.pack, self.eos_id, where=where)
        if self.task_name == TaskName.classification:
            index = {name: i for i, name in enumerate(self.label_names)}
            texts = encode_texts([text for text, _ in records], self.tokenizer)
            return ClassificationDataset(
                texts, [index[label] for _, label in records], self.seq_len, self.eos_id, where=where
            )
        # Rendered as SFT renders a prompt/response pair (same chat template), so preference tuning
        # sees the format supervised fine-tuning taught.
        conversations = [
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            for prompt, chosen, rejected in records
            for answer in (chosen, rejected)
        ]
        encoded = encode_sft_batch(conversations, self.tokenizer, self.eos_id, self.task.chat_template)
        pairs = [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]
        return DPODataset.from_rendered(pairs, self.seq_len, where=where)

    @property
    def collate_fn(self) -> Callable[[Any], dict[str, torch.Tensor]]:
        """A picklable collate for the task (loader workers receive it)."""
        if self.task_name == TaskName.classification:
            return functools.partial(collate_classification, pad_id=self.eos_id)
        if self.task_name == TaskName.dpo:
            return functools.partial(collate_dpo, pad_id=self.eos_id)
        return default_collate

    def _loader(self, dataset: Any, batch_sampler: Any, stateful: bool = False) -> DataLoader:
        workers = self.loader_workers
        cls = _ResumableDataLoader if stateful else DataLoader
        loader = cls(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=self.collate_fn,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )
        if isinstance(loader, _ResumableDataLoader):
            loader.datamodule = self
        return loader
