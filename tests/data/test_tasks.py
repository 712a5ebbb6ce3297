"""Fine-tuning task data: loss masks, packing, chat templates, collates, bad records, the DataModule."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

from orchestra.config import TaskConfig, TaskName
from orchestra.data.errors import DataError
from orchestra.data.tasks import (
    IGNORE_INDEX,
    ClassificationDataset,
    DPODataset,
    SFTDataset,
    TaskDataModule,
    collate_classification,
    collate_dpo,
    dpo_side,
    encode_sft,
    read_classification,
    read_dpo,
    read_sft,
    render_chat,
    resolve_task_paths,
)
from orchestra.data.tokenizer import EOS_TOKEN, train_bpe

WORDS = [
    "to",
    "be",
    "or",
    "not",
    "that",
    "is",
    "the",
    "question",
    "whether",
    "tis",
    "nobler",
    "in",
    "mind",
    "suffer",
    "slings",
    "arrows",
    "outrageous",
    "fortune",
    "sea",
    "troubles",
    "Hamlet",
    "Ophelia",
]
EOS_ID = 0

# A small ChatML-like template in the Hugging Face style (trim_blocks / lstrip_blocks apply).
CHATML = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(60)) + "\n<|user|>\n<|assistant|>\n" for _ in range(40)]
    tok = train_bpe(docs, vocab_size=400)
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID
    return tok


def trained_text(tok: Tokenizer, ids: list[int], labels: list[int]) -> str:
    assert len(ids) == len(labels)
    kept = [i for i, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX]
    assert kept == [y for y in labels if y != IGNORE_INDEX]  # a trained label carries its own id
    return tok.decode(kept, skip_special_tokens=False)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


# --------------------------------------------------------------------------- chat rendering and masks


def test_sft_mask_covers_exactly_the_response(tokenizer: Tokenizer) -> None:
    example = {"prompt": "Is the question to be or not?", "response": "Whether tis nobler in the mind"}
    ids, labels = encode_sft(example, tokenizer, EOS_ID)
    assert trained_text(tokenizer, ids, labels) == example["response"] + "\n" + EOS_TOKEN
    assert ids[-1] == EOS_ID and labels[-1] == EOS_ID
    full = tokenizer.decode(ids, skip_special_tokens=False)
    assert full == f"<|user|>\n{example['prompt']}\n<|assistant|>\n{example['response']}\n{EOS_TOKEN}"
    # The prompt form is the two-message conversation.
    assert encode_sft(
        [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["response"]},
        ],
        tokenizer,
        EOS_ID,
    ) == (ids, labels)


def test_multi_turn_plain_template_trains_every_assistant_turn(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "to be"},
        {"role": "assistant", "content": "or not"},
        {"role": "user", "content": "the question"},
        {"role": "assistant", "content": "tis nobler"},
    ]
    segments = render_chat(messages)
    assert [text for text, trained in segments if trained] == [
        "or not\n",
        EOS_TOKEN,
        "tis nobler\n",
        EOS_TOKEN,
    ]
    ids, labels = encode_sft({"messages": messages}, tokenizer, EOS_ID)
    assert trained_text(tokenizer, ids, labels) == f"or not\n{EOS_TOKEN}tis nobler\n{EOS_TOKEN}"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "".join(text for text, _ in segments)


def test_user_jinja_template_masks_exactly_the_assistant_spans(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Answer in verse."},
        {"role": "user", "content": "to be?"},
        {"role": "assistant", "content": "or not to be"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "that is the question"},
    ]
    segments = render_chat(messages, CHATML)
    full = "".join(text for text, _ in segments)
    assert full == (
        "<|im_start|>system\nAnswer in verse.<|im_end|>\n<|im_start|>user\nto be?<|im_end|>\n"
        "<|im_start|>assistant\nor not to be<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n"
        "<|im_start|>assistant\nthat is the question<|im_end|>\n"
    )
    assert [text for text, trained in segments if trained] == [
        "or not to be<|im_end|>\n",
        "that is the question<|im_end|>\n",
    ]
    ids, labels = encode_sft({"messages": messages}, tokenizer, EOS_ID, CHATML)
    # The template has no EOS of its own: one trained EOS is added after the last response.
    assert trained_text(tokenizer, ids, labels) == (
        "or not to be<|im_end|>\nthat is the question<|im_end|>\n" + EOS_TOKEN
    )
    assert tokenizer.decode(ids, skip_special_tokens=False) == full + EOS_TOKEN
    untrained = tokenizer.decode(
        [i for i, y in zip(ids, labels, strict=True) if y == IGNORE_INDEX], skip_special_tokens=False
    )
    assert "or not" not in untrained and "question" not in untrained and "and then?" in untrained


def test_template_with_its_own_eos_gets_no_second_one(tokenizer: Tokenizer) -> None:
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    ids, labels = encode_sft({"prompt": "to be", "response": "or not"}, tokenizer, EOS_ID, template)
    assert ids.count(EOS_ID) == 1 and ids[-1] == EOS_ID
    assert trained_text(tokenizer, ids, labels) == "or not" + EOS_TOKEN


def test_bad_templates_are_refused(tokenizer: Tokenizer) -> None:
    example = {"prompt": "to be", "response": "or not"}
    with pytest.raises(DataError, match=r"task\.chat_template: not a valid Jinja2 template"):
        encode_sft(example, tokenizer, EOS_ID, "{% for m in messages %}")
    with pytest.raises(DataError, match=r"task\.chat_template: .*cannot be located"):
        # Renders the conversation newest first: a prefix render is not a prefix of the whole.
        encode_sft(
            example, tokenizer, EOS_ID, "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
        )
    with pytest.raises(DataError, match=r"task\.chat_template: rendering failed \(no system\)"):
        encode_sft(example, tokenizer, EOS_ID, "{{ raise_exception('no system') }}")


# --------------------------------------------------------------------------- SFT rows


def synthetic_examples(lengths: list[int], prompt: int = 2) -> list[tuple[list[int], list[int]]]:
    """Example k: ids 10k+1, 10k+2, ... then EOS; the first ``prompt`` ids untrained."""
    out = []
    for k, n in enumerate(lengths):
        ids = [100 * (k + 1) + j for j in range(n - 1)] + [EOS_ID]
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append((ids, labels))
    return out


def test_packed_rows_keep_targets_inside_their_example() -> None:
    lengths = [5, 4, 7, 3, 9, 2, 6, 4]  # shifted: 4, 3, 6, 2, 8, 1, 5, 3 positions
    examples = synthetic_examples(lengths, prompt=1)
    ds = SFTDataset(examples, seq_len=10, pack=True, pad_id=EOS_ID)
    # Greedy next-fit in file order: [4+3] [6+2] [8+1] [5+3]
    assert len(ds) == 4
    recovered = []
    for r in range(len(ds)):
        row = ds[r]
        tokens, labels, seg = row["tokens"], row["labels"], row["segment_ids"]
        assert tokens.shape == labels.shape == seg.shape == (10,) and tokens.dtype == torch.int64
        n_seg = int(seg.max())
        # 1, 1, ..., 2, 2, ..., 0, 0: contiguous, increasing from 1, padding only at the end
        nonzero = seg[seg > 0].tolist()
        assert nonzero == sorted(nonzero) and set(nonzero) == set(range(1, n_seg + 1))
        assert (seg[len(nonzero) :] == 0).all()
        assert (tokens[seg == 0] == EOS_ID).all() and (labels[seg == 0] == IGNORE_INDEX).all()
        for s in range(1, n_seg + 1):
            recovered.append((tokens[seg == s].tolist(), labels[seg == s].tolist()))
        for t in range(9):
            if seg[t] > 0 and seg[t + 1] != seg[t]:
                # The last position of an example predicts its own EOS, never the next example's start.
                assert labels[t] == EOS_ID and (seg[t + 1] == 0 or labels[t] != tokens[t + 1])
    assert recovered == [(ids[:-1], labels[1:]) for ids, labels in examples]


def test_unpacked_rows_are_padded_one_example_each() -> None:
    examples = synthetic_examples([5, 4, 7])
    ds = SFTDataset(examples, seq_len=8, pack=False, pad_id=EOS_ID)
    assert len(ds) == 3
    for (ids, labels), r in zip(examples, range(3), strict=True):
        row, n = ds[r], len(ids) - 1
        assert row["tokens"][:n].tolist() == ids[:-1] and row["labels"][:n].tolist() == labels[1:]
        assert (row["tokens"][n:] == EOS_ID).all() and (row["labels"][n:] == IGNORE_INDEX).all()
        assert row["segment_ids"].tolist() == [1] * n + [0] * (8 - n)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 8)


def test_long_examples_are_cut_and_counted_once(caplog: pytest.LogCaptureFixture) -> None:
    examples = synthetic_examples([30, 4, 20, 3], prompt=2)
    examples.append(([7] * 20 + [8, EOS_ID], [IGNORE_INDEX] * 20 + [8, EOS_ID]))  # response beyond seq_len
    with caplog.at_level(logging.WARNING, logger="orchestra.data.tasks"):
        ds = SFTDataset(examples, seq_len=8, pack=True, pad_id=EOS_ID)
    assert ds.truncated == 3 and ds.dropped == 1 and ds.examples == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 5 examples" in warnings[0].getMessage()
    assert ds[0]["tokens"].tolist() == examples[0][0][:8]  # the start is kept


# --------------------------------------------------------------------------- classification and DPO


def test_classification_collate_pads_right_and_points_at_the_last_token() -> None:
    ds = ClassificationDataset([[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]], [2, 0, 1], seq_len=4, pad_id=EOS_ID)
    assert ds[2]["tokens"].tolist() == [9, 10, 11, 12] and ds.truncated == 1  # the first seq_len tokens
    batch = collate_classification([ds[0], ds[1], ds[2]], pad_id=EOS_ID)
    assert batch["tokens"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]]
    assert batch["last_index"].tolist() == [2, 0, 3]
    assert batch["labels"].tolist() == [2, 0, 1]
    rows = torch.arange(3)
    assert batch["tokens"][rows, batch["last_index"]].tolist() == [7, 8, 12]


def test_dpo_side_truncation_keeps_a_response_token() -> None:
    tokens, labels = dpo_side([1, 2, 3], [4, 5], EOS_ID, seq_len=10)
    assert tokens == [1, 2, 3, 4, 5] and labels == [IGNORE_INDEX, IGNORE_INDEX, 4, 5, EOS_ID]
    tokens, labels = dpo_side([1, 2, 3], [4, 5, 6, 7], EOS_ID, seq_len=4)  # response's end cut
    assert tokens == [1, 2, 3, 4] and labels == [IGNORE_INDEX, IGNORE_INDEX, 4, 5]
    tokens, labels = dpo_side(list(range(1, 9)), [20, 21], EOS_ID, seq_len=4)  # prompt's start cut
    assert tokens == [5, 6, 7, 8] and labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 20]


def test_dpo_collate_stacks_chosen_then_rejected_with_a_shared_prompt_mask() -> None:
    triples = [([1, 2, 3], [4, 5], [6, 7, 8, 9]), ([11, 12], [13, 14, 15], [16])]
    ds = DPODataset(triples, seq_len=16, eos_id=EOS_ID)
    assert set(ds[0]) == {"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}
    batch = collate_dpo([ds[0], ds[1]], pad_id=EOS_ID)
    assert batch["tokens"].shape == batch["labels"].shape == (4, 7)  # longest: 3 + 4 + EOS - 1
    assert batch["tokens"][0, :4].tolist() == [1, 2, 3, 4] and batch["tokens"][2, :6].tolist() == [
        1,
        2,
        3,
        6,
        7,
        8,
    ]
    for i, (prompt, chosen, rejected) in enumerate(triples):
        chosen_labels, rejected_labels = batch["labels"][i], batch["labels"][2 + i]
        p = len(prompt) - 1
        assert (chosen_labels[:p] == IGNORE_INDEX).all() and (rejected_labels[:p] == IGNORE_INDEX).all()
        assert chosen_labels[p:].tolist()[: len(chosen) + 1] == [*chosen, EOS_ID]
        assert rejected_labels[p:].tolist()[: len(rejected) + 1] == [*rejected, EOS_ID]
        assert (chosen_labels[p + len(chosen) + 1 :] == IGNORE_INDEX).all()
        assert torch.equal(batch["tokens"][i, : p + 1], batch["tokens"][2 + i, : p + 1])  # the same prompt


# --------------------------------------------------------------------------- bad records


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = {
    "sft": json.dumps({"prompt": "to be", "response": "or not"}),
    "classification": json.dumps({"text": "to be", "label": "a"}),
    "dpo": json.dumps({"prompt": "to be", "chosen": "or not", "rejected": "the sea"}),
}
BAD = [
    ("sft", '{"prompt": "to be", "response": ', "not valid JSON"),
    ("sft", '["to be", "or not"]', "expected a JSON object, got list"),
    ("sft", json.dumps({"prompt": "to be"}), "missing field 'response'"),
    ("sft", json.dumps({"question": "to be"}), "missing field 'prompt'/'response' or 'messages'"),
    ("sft", json.dumps({"prompt": "to be", "response": 3}), "field 'response' is int, expected a string"),
    ("sft", json.dumps({"prompt": "  ", "response": "or not"}), "field 'prompt' is empty"),
    ("sft", json.dumps({"prompt": "to be", "response": ""}), "field 'response' is empty"),
    (
        "sft",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}),
        r"messages\[1\]: unknown role 'bot'",
    ),
    (
        "sft",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        "must end with an assistant message",
    ),
    ("sft", json.dumps({"messages": []}), "non-empty list"),
    ("classification", json.dumps({"text": "to be"}), "missing field 'label'"),
    ("classification", json.dumps({"text": ["to be"], "label": "a"}), "field 'text' is list"),
    ("classification", json.dumps({"text": "to be", "label": "zzz"}), "unknown label 'zzz'"),
    ("dpo", json.dumps({"prompt": "to be", "chosen": "or not"}), "missing field 'rejected'"),
    ("dpo", json.dumps({"prompt": "to be", "chosen": "", "rejected": "x"}), "field 'chosen' is empty"),
]
READERS: dict[str, Any] = {
    "sft": read_sft,
    "classification": lambda p: read_classification(p, ["a", "b"]),
    "dpo": read_dpo,
}


@pytest.mark.parametrize(
    ("task", "line", "message"), BAD, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(BAD)]
)
def test_a_bad_record_names_file_and_line(tmp_path: Path, task: str, line: str, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [GOOD[task], "", line, GOOD[task]])  # blank line 2
    before = sorted(tmp_path.iterdir())
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: .*{message}"):
        READERS[task](path)
    assert sorted(tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("task", ["sft", "classification", "dpo"])
def test_empty_and_missing_files_are_refused(tmp_path: Path, task: str) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: no examples"):
        READERS[task](empty)
    with pytest.raises(DataError, match="does not exist"):
        READERS[task](tmp_path / "missing.jsonl")


def test_invalid_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        GOOD["sft"].encode() + b"\n" + '{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: invalid UTF-8"):
        read_sft(path)


# --------------------------------------------------------------------------- the DataModule


def write_task_files(root: Path, n_train: int = 48, n_val: int = 16) -> dict[str, tuple[Path, Path]]:
    rng = random.Random(1)
    files = {}
    for task in ("sft", "classification", "dpo"):
        paths = []
        for split, n in (("train", n_train), ("val", n_val)):
            records: list[dict[str, Any]] = []
            for i in range(n):
                if task == "sft":
                    record: dict[str, Any] = {
                        "prompt": sentence(rng, rng.randint(2, 8)),
                        "response": sentence(rng, rng.randint(1, 6)),
                    }
                    if i % 5 == 0:
                        record = {
                            "messages": [
                                {"role": "user", "content": record["prompt"]},
                                {"role": "assistant", "content": record["response"]},
                            ]
                        }
                elif task == "classification":
                    record = {
                        "text": sentence(rng, rng.randint(1, 12)),
                        "label": ["sea", "mind", "fortune"][i % 3],
                    }
                else:
                    record = {
                        "prompt": sentence(rng, 4),
                        "chosen": sentence(rng, 3),
                        "rejected": sentence(rng, 5),
                    }
                records.append(record)
            path = root / f"{task}-{split}.jsonl"
            write_lines(path, [json.dumps(r) for r in records])
            paths.append(path)
        files[task] = (paths[0], paths[1])
    return files


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return write_task_files(tmp_path_factory.mktemp("task-files"))


def datamodule(tokenizer: Tokenizer, task: str, train: Path, val: Path | None, **kw: Any) -> TaskDataModule:
    args: dict[str, Any] = dict(
        seq_len=32,
        micro_batch_size=2,
        global_batch_size=8,
        seed=5,
        max_steps=6,
        val_batches=4,
        loader_workers=0,
    )
    task_cfg = TaskConfig(name=TaskName(task), **kw.pop("cfg", {}))
    args.update(kw)
    return TaskDataModule(task_cfg, train, val, tokenizer.to_str(), EOS_ID, **args)


def batches_at(dm: TaskDataModule, rank: int, world: int, split: str) -> list[dict[str, torch.Tensor]]:
    dm._rank_world = lambda: (rank, world)  # type: ignore[method-assign]
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return list(loader)


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("task", ["sft", "classification", "dpo"])
def test_val_batches_do_not_depend_on_world_size(tokenizer: Tokenizer, task_files: Any, task: str) -> None:
    train, val = task_files[task]
    one = batches_at(datamodule(tokenizer, task, train, val), 0, 1, "val")
    r0, r1 = (batches_at(datamodule(tokenizer, task, train, val), r, 2, "val") for r in (0, 1))
    assert len(one) == 4 and len(r0) == len(r1) == 2
    assert same(one, [r0[0], r1[0], r0[1], r1[1]])  # batch b goes to rank b % world


@pytest.mark.parametrize("task", ["sft", "classification", "dpo"])
def test_train_order_is_deterministic_and_sharded_by_rank(
    tokenizer: Tokenizer, task_files: Any, task: str
) -> None:
    train, val = task_files[task]
    first = batches_at(datamodule(tokenizer, task, train, val), 0, 1, "train")
    assert len(first) == 6 * 4  # max_steps x accumulation
    assert same(first, batches_at(datamodule(tokenizer, task, train, val), 0, 1, "train"))
    assert not same(first, batches_at(datamodule(tokenizer, task, train, val, seed=6), 0, 1, "train"))
    # Two ranks split each step's global batch: rank 0 takes its first half, rank 1 the second.
    r0, r1 = (batches_at(datamodule(tokenizer, task, train, val), r, 2, "train") for r in (0, 1))
    assert same(first[:4], [r0[0], r0[1], r1[0], r1[1]])


def test_batch_formats(tokenizer: Tokenizer, task_files: Any) -> None:
    sft = next(iter(datamodule(tokenizer, "sft", *task_files["sft"]).train_dataloader()))
    assert {k: tuple(v.shape) for k, v in sft.items()} == {
        "tokens": (2, 32),
        "labels": (2, 32),
        "segment_ids": (2, 32),
    }
    packed = datamodule(tokenizer, "sft", *task_files["sft"], seq_len=64).dataset("train")
    assert (packed.segment_ids.max(axis=1) > 1).all() and len(packed) < 48  # several examples per row
    cls_dm = datamodule(tokenizer, "classification", *task_files["classification"])
    cls = next(iter(cls_dm.train_dataloader()))
    assert set(cls) == {"tokens", "last_index", "labels"} and cls["tokens"].shape[0] == 2
    assert cls["labels"].max() < 3 and (cls["last_index"] == cls["last_index"].max()).any()
    dpo = next(iter(datamodule(tokenizer, "dpo", *task_files["dpo"]).train_dataloader()))
    assert set(dpo) == {"tokens", "labels"} and dpo["tokens"].shape[0] == 4
    unpacked = datamodule(tokenizer, "sft", *task_files["sft"], seq_len=64, cfg={"pack": False}).dataset(
        "train"
    )
    assert len(unpacked) == 48 and unpacked.segment_ids.max() == 1


def test_labels_and_class_counts(tokenizer: Tokenizer, task_files: Any, tmp_path: Path) -> None:
    train, val = task_files["classification"]
    dm = datamodule(tokenizer, "classification", train, val)
    assert dm.label_names == ["fortune", "mind", "sea"]  # sorted labels of the train file
    assert dm.class_counts("train") == [16, 16, 16] and sum(dm.class_counts("val")) == 16
    dm = datamodule(tokenizer, "classification", train, val, cfg={"labels": ["sea", "mind", "fortune"]})
    assert dm.label_names == ["sea", "mind", "fortune"]
    assert [dm.dataset("train")[i]["label"] for i in range(3)] == [0, 1, 2]  # config order is class order
    bad_val = write_lines(
        tmp_path / "val.jsonl",
        [json.dumps({"text": "to be", "label": "sea"}), json.dumps({"text": "or not", "label": "storm"})],
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(bad_val))}:2: unknown label 'storm'"):
        datamodule(tokenizer, "classification", train, bad_val)


def test_val_held_out_of_train_when_no_val_file(tokenizer: Tokenizer, task_files: Any) -> None:
    train, _ = task_files["dpo"]
    dm = datamodule(tokenizer, "dpo", train, None, cfg={"val_fraction": 0.25})
    assert dm.num_examples("val") == 12 and dm.num_examples("train") == 36
    again = datamodule(tokenizer, "dpo", train, None, cfg={"val_fraction": 0.25})
    assert dm._records == again._records
    other = datamodule(tokenizer, "dpo", train, None, cfg={"val_fraction": 0.25}, seed=99)
    assert other._records["val"] != dm._records["val"]
    assert not set(dm._records["val"]) & set(dm._records["train"])
    tiny = write_lines(train.parent / "one.jsonl", [GOOD["dpo"]])
    with pytest.raises(DataError, match="cannot be split into train and val"):
        datamodule(tokenizer, "dpo", tiny, None)


def test_resolve_task_paths_names_the_missing_key(tmp_path: Path) -> None:
    present = write_lines(tmp_path / "train.jsonl", [GOOD["sft"]])
    assert resolve_task_paths(TaskConfig(name=TaskName.sft, train_path=str(present)), tmp_path) == (
        present,
        None,
    )
    with pytest.raises(DataError, match=r"task\.train_path: .*nope\.jsonl does not exist"):
        resolve_task_paths(TaskConfig(name=TaskName.sft, train_path=str(tmp_path / "nope.jsonl")), tmp_path)
    with pytest.raises(DataError, match=r"task\.val_path: .*nope\.jsonl does not exist"):
        resolve_task_paths(
            TaskConfig(name=TaskName.sft, train_path=str(present), val_path=str(tmp_path / "nope.jsonl")),
            tmp_path,
        )
    with pytest.raises(DataError, match=r"task\.val_path: set .* without task\.train_path"):
        resolve_task_paths(TaskConfig(name=TaskName.sft, val_path=str(present)), tmp_path)


def test_dpo_pairs_are_rendered_like_sft(tokenizer: Tokenizer, task_files: Any) -> None:
    """Preference pairs go through the chat template SFT used: same prompt text, responses trained + EOS."""
    from orchestra.data.tasks import read_dpo

    train, val = task_files["dpo"]
    dm = datamodule(tokenizer, "dpo", train, val, seq_len=64)
    prompt, chosen, rejected = read_dpo(val)[0]
    item = dm.dataset("val")[0]
    sft_ids, sft_labels = encode_sft({"prompt": prompt, "response": chosen}, tokenizer, EOS_ID)
    assert item["chosen_tokens"].tolist() == sft_ids[:-1] and item["chosen_labels"].tolist() == sft_labels[1:]
    assert trained_text(
        tokenizer, [*item["rejected_tokens"].tolist()[1:], EOS_ID], item["rejected_labels"].tolist()
    ).startswith(rejected)
    decoded = tokenizer.decode(item["chosen_tokens"].tolist(), skip_special_tokens=False)
    assert decoded.startswith("<|user|>\n" + prompt)


def test_too_small_val_split_names_the_task_keys(
    tokenizer: Tokenizer, task_files: Any, tmp_path: Path
) -> None:
    train, _ = task_files["dpo"]
    one = write_lines(tmp_path / "one.jsonl", [GOOD["dpo"]])
    with pytest.raises(
        DataError, match=r"val split has 1 samples, fewer than .*; use a larger task\.val_path"
    ):
        datamodule(tokenizer, "dpo", train, one).val_dataloader()
    held = datamodule(tokenizer, "dpo", train, None, cfg={"val_fraction": 0.01})  # 1 of 48 held out
    with pytest.raises(DataError, match=r"fewer than .*; raise task\.val_fraction \(or set task\.val_path\)"):
        held.val_dataloader()


# --------------------------------------------------------------------------- kto and reward rows


def test_kto_mismatched_rows_pair_each_prompt_with_the_next_chosen_response() -> None:
    from orchestra.data.tasks.dpo import KTODataset, collate_kto

    examples = [([1, 2, 3], [10, 11], [20]), ([4, 5], [12, 13, 14], [21, 22]), ([6], [15], [23, 24, 25])]
    pairs = DPODataset(examples, seq_len=16, eos_id=EOS_ID)
    kto = KTODataset(pairs, seq_len=16)
    for i, (prompt, _, _) in enumerate(examples):
        other_chosen = examples[(i + 1) % len(examples)][1]
        tokens, labels = dpo_side(prompt, other_chosen, EOS_ID, 16)  # the independent rendering
        assert kto[i]["kl_tokens"].tolist() == tokens and kto[i]["kl_labels"].tolist() == labels
        assert torch.equal(kto[i]["chosen_tokens"], pairs[i]["chosen_tokens"])
    batch = collate_kto([kto[0], kto[1]], pad_id=EOS_ID)
    assert batch["tokens"].shape[0] == 6
    assert batch["tokens"][4, :4].tolist() == [1, 2, 3, 12]  # prompt 0 + example 1's chosen response
    # A long prompt loses its start, so the row fits and keeps the mismatched response's first tokens.
    cut = KTODataset(DPODataset([([1] * 10, [2], [3]), ([4, 5], [6, 7, 8], [9])], 8, EOS_ID), 8)
    row_tokens, row_labels = cut[0]["kl_tokens"].tolist(), cut[0]["kl_labels"].tolist()
    assert len(row_tokens) == len(row_labels) == 8 and set(row_tokens[:-1]) == {1}
    assert [y for y in row_labels if y != IGNORE_INDEX] == [6, 7]


def test_reward_rows_are_scored_at_the_token_transformers_pools() -> None:
    """last_index = Hugging Face's sequence-classifier pooling: the rightmost token that is not padding."""
    from orchestra.data.tasks.dpo import last_real_index

    pad = EOS_ID
    tokens = torch.tensor([[5, 6, pad, 7, pad, pad], [5, 6, 7, 8, 9, 9], [pad, 3, pad, pad, pad, pad]])
    # transformers' rule (LlamaForSequenceClassification.forward), written out independently:
    expected = [max(j for j, t in enumerate(row) if t != pad) for row in tokens.tolist()]
    assert last_real_index(tokens, pad).tolist() == expected == [3, 5, 1]


def test_kto_and_reward_batches_from_the_datamodule(tokenizer: Tokenizer, task_files: Any) -> None:
    train, val = task_files["dpo"]
    dpo = next(iter(datamodule(tokenizer, "dpo", train, val).train_dataloader()))
    kto = next(iter(datamodule(tokenizer, "kto", train, val).train_dataloader()))
    assert set(kto) == {"tokens", "labels"} and kto["tokens"].shape[0] == 6
    width = dpo["tokens"].shape[1]
    assert torch.equal(kto["tokens"][:4, :width], dpo["tokens"])  # the same pairs, in the same order
    assert (kto["labels"][4:] != IGNORE_INDEX).any(1).all()  # every mismatched row has a response
    reward = next(iter(datamodule(tokenizer, "reward", train, val).train_dataloader()))
    assert set(reward) == {"tokens", "labels", "last_index"} and torch.equal(reward["tokens"], dpo["tokens"])
    for row, last in zip(reward["tokens"], reward["last_index"], strict=True):
        assert row[last] != EOS_ID and (row[last + 1 :] == EOS_ID).all()
    for task in ("orpo", "simpo"):
        batch = next(iter(datamodule(tokenizer, task, train, val).train_dataloader()))
        assert same([batch], [dpo])
