"""A Hugging Face base's tokenizer metadata: what is read, and SFT/DPO encodings equal to transformers'.

The folders (tests/data/hf_tokenizers.py) carry the published chat templates and special-token
conventions of Llama 3.1 Instruct, Qwen2.5 Instruct, Gemma 2 it and Mistral Instruct; the
independent reference is transformers' own ``AutoTokenizer.from_pretrained(folder)`` and its
``apply_chat_template(tokenize=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models

from orchestra.config import ConfigError, TaskConfig, TaskName
from orchestra.data.errors import DataError
from orchestra.data.hf_tokenizer import TokenizerSpec, read_tokenizer_spec
from orchestra.data.tasks import IGNORE_INDEX, encode_sft
from orchestra.data.tasks.dpo import DPOTask
from tests.data.hf_tokenizers import FAMILIES, QWEN25_TEMPLATE, config_ids, write_tokenizer_files

transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue is a colour, and so are red and green."},
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
# (primary EOS = the token closing an assistant turn, every EOS id's token, BOS, add_bos) as published.
EXPECTED: dict[str, tuple[str, list[str], str | None, bool]] = {
    "llama3": ("<|eot_id|>", ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"], "<|begin_of_text|>", True),
    "qwen2.5": ("<|im_end|>", ["<|im_end|>", "<|endoftext|>"], None, False),
    "gemma2": ("<end_of_turn>", ["<end_of_turn>", "<eos>"], "<bos>", True),
    "mistral": ("</s>", ["</s>"], "<s>", True),
}
WITH_SYSTEM = ["llama3", "qwen2.5"]  # Gemma and Mistral templates refuse a system message


def folder_of(tmp_path: Path, family: str, **kw: Any) -> tuple[Path, Tokenizer, TokenizerSpec]:
    folder = tmp_path / family
    tokenizer = write_tokenizer_files(folder, family, **kw)
    (folder / "config.json").write_text(json.dumps(config_ids(family, tokenizer)))
    return folder, tokenizer, read_tokenizer_spec(folder, tokenizer, config_ids(family, tokenizer))


def names(tokenizer: Tokenizer, ids: tuple[int, ...] | list[int]) -> list[str | None]:
    return [tokenizer.id_to_token(i) for i in ids]


def reference_ids(folder: Path, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """transformers' own encoding of the conversation with the folder's chat template."""
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    return list(
        hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_reads_as_published(family: str, tmp_path: Path) -> None:
    _, tokenizer, spec = folder_of(tmp_path, family)
    primary, eos, bos, add_bos = EXPECTED[family]
    assert names(tokenizer, spec.eos_ids) == eos and tokenizer.id_to_token(spec.eos_id) == primary
    assert spec.bos_token == bos and spec.add_bos is add_bos and spec.add_eos is False
    assert spec.bos_id == (tokenizer.token_to_id(bos) if bos else None)
    assert spec.chat_template == FAMILIES[family]["tokenizer_config"]["chat_template"]
    assert spec.chat_template_source.endswith("tokenizer_config.json chat_template")


@pytest.mark.parametrize(
    ("family", "system"),
    [(family, False) for family in FAMILIES] + [(family, True) for family in WITH_SYSTEM],
    ids=lambda v: {True: "system", False: "user-first"}.get(v, v) if isinstance(v, bool) else v,
)
def test_sft_encoding_equals_transformers_apply_chat_template(
    family: str, system: bool, tmp_path: Path
) -> None:
    folder, tokenizer, spec = folder_of(tmp_path, family)
    messages = [SYSTEM, *CHAT] if system else CHAT
    ids, labels = encode_sft(messages, tokenizer, spec.eos_id, None, spec)
    assert ids == reference_ids(folder, messages, add_generation_prompt=False)
    first_trained = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    assert ids[:first_trained] == reference_ids(folder, messages[:-3], add_generation_prompt=True)
    if spec.bos_id is not None:  # one BOS, written by the template or prepended, never two
        assert ids[0] == spec.bos_id and ids.count(spec.bos_id) == 1
    # Trained: each assistant reply and the marker that closes its turn (the primary EOS).
    primary = EXPECTED[family][0]
    trained = tokenizer.decode([y for y in labels if y != IGNORE_INDEX], skip_special_tokens=False)
    newline = "" if family in ("llama3", "mistral") else "\n"
    assert trained == "".join(f"{m['content']}{primary}{newline}" for m in CHAT if m["role"] == "assistant")


def test_a_conversation_the_bases_template_refuses_names_the_template(tmp_path: Path) -> None:
    _, tokenizer, spec = folder_of(tmp_path, "gemma2")
    with pytest.raises(
        DataError,
        match=r"gemma2/tokenizer_config\.json chat_template: rendering failed \(System role not supported\)",
    ):
        encode_sft([SYSTEM, *CHAT], tokenizer, spec.eos_id, None, spec)


def test_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path: Path) -> None:
    folder, tokenizer, _ = folder_of(tmp_path, "qwen2.5", template_file=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('the stale template in tokenizer_config.json') }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    spec = read_tokenizer_spec(folder, tokenizer, config_ids("qwen2.5", tokenizer))
    assert spec.chat_template == QWEN25_TEMPLATE and spec.chat_template_source.endswith("chat_template.jinja")
    ids, _ = encode_sft(CHAT, tokenizer, spec.eos_id, None, spec)
    assert ids == reference_ids(folder, CHAT, add_generation_prompt=False)  # transformers reads the file too


def test_a_list_of_templates_uses_default_and_without_one_is_refused(tmp_path: Path) -> None:
    folder, tokenizer, _ = folder_of(tmp_path, "qwen2.5")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    tool_use = {"name": "tool_use", "template": "{{ raise_exception('tools') }}"}
    config["chat_template"] = [tool_use, {"name": "default", "template": QWEN25_TEMPLATE}]
    config_file.write_text(json.dumps(config))
    spec = read_tokenizer_spec(folder, tokenizer)
    assert spec.chat_template == QWEN25_TEMPLATE and spec.chat_template_source.endswith("'default'")
    assert encode_sft(CHAT, tokenizer, spec.eos_id, None, spec)[0] == reference_ids(folder, CHAT, False)
    config["chat_template"] = [tool_use]
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match=r"tokenizer_config\.json: chat_template lists templates \['tool_use'\]"
    ):
        read_tokenizer_spec(folder, tokenizer)


def test_special_tokens_map_fills_in_and_a_null_bos_means_none(tmp_path: Path) -> None:
    folder, tokenizer, _ = folder_of(tmp_path, "gemma2")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["bos_token"], config["eos_token"]
    config_file.write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<bos>", "special": True}, "eos_token": "<eos>"})
    )
    spec = read_tokenizer_spec(folder, tokenizer, config_ids("gemma2", tokenizer))
    assert (spec.bos_token, spec.eos_token) == ("<bos>", "<eos>")
    assert names(tokenizer, spec.eos_ids) == ["<end_of_turn>", "<eos>"]
    # Qwen declares bos_token null: no BOS, although its config.json names a bos_token_id.
    _, qwen_tokenizer, qwen = folder_of(tmp_path, "qwen2.5")
    assert config_ids("qwen2.5", qwen_tokenizer)["bos_token_id"] is not None
    assert qwen.bos_id is None and qwen.bos_token is None


def test_a_turn_marker_that_is_no_eos_gets_the_eos_appended(tmp_path: Path) -> None:
    """A Qwen2.5 *base*: its template closes turns with <|im_end|>, but its only EOS is <|endoftext|>."""
    folder, tokenizer, _ = folder_of(tmp_path, "qwen2.5")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token"] = "<|endoftext|>"
    config_file.write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": tokenizer.token_to_id("<|endoftext|>")})
    )
    spec = read_tokenizer_spec(folder, tokenizer)
    assert names(tokenizer, spec.eos_ids) == ["<|endoftext|>"]
    ids, labels = encode_sft(CHAT[:2], tokenizer, spec.eos_id, None, spec)
    assert ids[:-1] == reference_ids(folder, CHAT[:2], False)  # the template's render, then the EOS
    assert names(tokenizer, ids[-3:]) == ["<|im_end|>", "Ċ", "<|endoftext|>"] and labels[-1] == ids[-1]


def test_without_a_template_the_plain_one_is_used_with_the_bos_the_tokenizer_adds(tmp_path: Path) -> None:
    folder, tokenizer, _ = folder_of(tmp_path, "gemma2")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["chat_template"]
    config_file.write_text(json.dumps(config))
    spec = read_tokenizer_spec(folder, tokenizer, config_ids("gemma2", tokenizer))
    assert spec.chat_template is None and names(tokenizer, spec.eos_ids) == ["<eos>", "<end_of_turn>"]
    ids, labels = encode_sft(CHAT[:2], tokenizer, spec.eos_id, None, spec)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == f"<bos><|user|>\n{CHAT[0]['content']}\n<|assistant|>\n{CHAT[1]['content']}\n<eos>"
    assert labels[0] == IGNORE_INDEX and labels[-1] == spec.eos_id


def test_task_chat_template_wins_over_the_bases(tmp_path: Path) -> None:
    _, tokenizer, spec = folder_of(tmp_path, "llama3")
    mine = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    mine += "{% if add_generation_prompt %}assistant: {% endif %}"
    ids, _ = encode_sft(CHAT[:2], tokenizer, spec.eos_id, mine, spec)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    # The base's BOS (its tokenizer adds one) and its primary EOS, around the task's own format.
    assert text == f"<|begin_of_text|>user: {CHAT[0]['content']}\nassistant: {CHAT[1]['content']}\n<|eot_id|>"


def test_dpo_renders_both_sides_through_the_bases_template(tmp_path: Path) -> None:
    folder, tokenizer, spec = folder_of(tmp_path, "llama3")
    task = DPOTask(TaskConfig(name=TaskName.dpo), spec)
    prompt, chosen, rejected = CHAT[0]["content"], CHAT[1]["content"], "Lyon, I think."
    dataset = task.dataset([(prompt, chosen, rejected)], tokenizer, spec.eos_id, 256, "dpo")
    row = dataset[0]
    user = [{"role": "user", "content": prompt}]
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        full = reference_ids(folder, [*user, {"role": "assistant", "content": answer}], False)
        assert row[f"{side}_tokens"].tolist() == full[:-1]  # inputs; targets are shifted by one
        n_prompt = len(reference_ids(folder, user, add_generation_prompt=True))
        labels = row[f"{side}_labels"].tolist()
        assert (
            labels[: n_prompt - 1] == [IGNORE_INDEX] * (n_prompt - 1)
            and labels[n_prompt - 1 :] == full[n_prompt:]
        )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda folder, tok: _edit(folder / "tokenizer_config.json", eos_token="<|im_end|>"),
            r"tokenizer_config\.json: eos_token '<\|im_end\|>' is not a token of the base's tokenizer\.json",
        ),
        (
            lambda folder, tok: _edit(folder / "tokenizer_config.json", bos_token={"content": "<s>"}),
            r"tokenizer_config\.json: bos_token '<s>' is not a token",
        ),
        (
            lambda folder, tok: _edit(folder / "generation_config.json", eos_token_id=[5, 99999]),
            r"generation_config\.json: eos_token_id 99999 is not a token id of the base's tokenizer\.json",
        ),
        (
            lambda folder, tok: _edit(folder / "generation_config.json", eos_token_id="<|eot_id|>"),
            r"generation_config\.json: eos_token_id is '<\|eot_id\|>'; expected a token id",
        ),
        (
            lambda folder, tok: (folder / "tokenizer_config.json").write_text("{"),
            r"tokenizer_config\.json: not valid JSON",
        ),
        (
            lambda folder, tok: _edit(folder / "tokenizer_config.json", add_bos_token="yes"),
            r"tokenizer_config\.json: add_bos_token is 'yes'; expected true or false",
        ),
    ],
    ids=["eos-token", "bos-token", "eos-id", "eos-id-type", "json", "add-bos"],
)
def test_declarations_the_tokenizer_contradicts_are_one_error_naming_file_key_token(
    change: Any, expected: str, tmp_path: Path
) -> None:
    folder, tokenizer, _ = folder_of(tmp_path, "llama3")
    change(folder, tokenizer)
    with pytest.raises(ConfigError, match=expected):
        read_tokenizer_spec(folder, tokenizer, config_ids("llama3", tokenizer))


def test_no_eos_anywhere_falls_back_to_a_known_token_else_is_refused(tmp_path: Path) -> None:
    folder, tokenizer, _ = folder_of(tmp_path, "gemma2")
    for name in ("tokenizer_config.json", "generation_config.json"):
        (folder / name).unlink()
    spec = read_tokenizer_spec(folder, tokenizer, {})
    assert names(tokenizer, spec.eos_ids) == ["<eos>"] and spec.bos_id is None and spec.chat_template is None
    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    with pytest.raises(ConfigError, match=r"names no eos_token .* add eos_token_id to config\.json"):
        read_tokenizer_spec(tmp_path / "empty", bare, {})


def _edit(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
