"""What a Hugging Face base folder says about its tokens: chat template, BOS, every EOS id.

transformers spreads this over several files; fine-tuning (the chat template SFT and DPO render
with, the EOS their turns end with) and generation (every id it stops on) need it in one record,
:class:`TokenizerSpec`, read once by :func:`read_tokenizer_spec`. Each file is optional; where two
say the same thing, the one transformers gives precedence wins:

* the chat template: ``chat_template.jinja`` (what newer transformers writes), else
  tokenizer_config.json's ``chat_template`` -- a string, or a list of ``{"name", "template"}``
  of which ``"default"`` is used;
* ``bos_token`` / ``eos_token`` (a string, or an AddedToken object ``{"content": ...}``; null =
  none): tokenizer_config.json, else special_tokens_map.json;
* ``add_bos_token`` / ``add_eos_token``: tokenizer_config.json, else whether tokenizer.json's
  post-processor adds the token itself;
* EOS / BOS ids: generation_config.json's ``eos_token_id`` / ``bos_token_id`` (an int or a list),
  then config.json's.

The *primary* EOS -- the one fine-tuning data ends an assistant turn with, first in
:attr:`TokenizerSpec.eos_ids` -- is the candidate the chat template closes an assistant turn with
(``<|eot_id|>`` for Llama 3.x Instruct, ``<|im_end|>`` for Qwen, ``<end_of_turn>`` for Gemma):
found by rendering a one-turn conversation and reading which EOS token follows the assistant's
text. Without a template, or when no candidate follows, it is the tokenizer's ``eos_token``, else
the first id of generation_config.json / config.json, else a known end-of-text token.

Every declared token must be one of the tokenizer's: a ``eos_token`` tokenizer.json lacks, or an
id it has no token for, is one :class:`~orchestra.config.ConfigError` naming the file, the key
and the token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from orchestra.config import ConfigError
from orchestra.data.errors import DataError
from orchestra.data.tokenizer import find_eos

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The one-turn conversation rendered to find the token that closes an assistant turn.
_PROBE_USER = "Orchestra probe: which token ends the reply?"
_PROBE_REPLY = "Orchestra-probe-reply-7f3a"


@dataclass(frozen=True)
class TokenizerSpec:
    """A base's tokens as fine-tuning and generation use them (see the module docstring)."""

    # The base's own Jinja2 chat template; None = it has none.
    chat_template: str | None = None
    # Where the template came from, for error messages ("<folder>/tokenizer_config.json chat_template").
    chat_template_source: str = ""
    # The BOS as the template sees it (transformers' tokenizer.bos_token); None = none declared.
    bos_token: str | None = None
    bos_id: int | None = None
    # The EOS as the template sees it (tokenizer_config's eos_token, which may differ from the primary).
    eos_token: str | None = None
    # Every id generation stops on; the first is the primary (fine-tuning turns end with it).
    eos_ids: tuple[int, ...] = ()
    # The tokenizer's own encode adds BOS first / EOS last (add_bos_token / add_eos_token).
    add_bos: bool = False
    add_eos: bool = False

    @property
    def eos_id(self) -> int:
        """The primary EOS id."""
        if not self.eos_ids:
            raise ValueError("TokenizerSpec has no eos id")
        return self.eos_ids[0]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _token_text(value: Any, path: Path, key: str) -> str | None:
    """A special token as a string: a plain string or an AddedToken object's content; null = none."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"]) or None
    raise ConfigError(
        f"{path}: {key} is {value!r}; expected a token string or an AddedToken object with 'content'"
    )


def _token_ids(value: Any, path: Path, key: str, tokenizer: Tokenizer) -> tuple[int, ...]:
    """An int or a list of ints, each an id the tokenizer has a token for."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{path}: {key} is {value!r}; expected a token id or a list of token ids")
    for v in values:
        if v < 0 or tokenizer.id_to_token(v) is None:
            raise ConfigError(
                f"{path}: {key} {v} is not a token id of the base's tokenizer.json "
                f"({tokenizer.get_vocab_size(with_added_tokens=True)} tokens)"
            )
    return tuple(values)


def _chat_template(folder: Path, config: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """(template, where it came from): chat_template.jinja, else tokenizer_config's chat_template."""
    jinja_file = folder / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8") or None, str(jinja_file)
    path, raw = folder / TOKENIZER_CONFIG, (config or {}).get("chat_template")
    where = f"{path} chat_template"
    if raw is None or isinstance(raw, str):
        return raw or None, where
    if isinstance(raw, list) and all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in raw
    ):
        named = {t["name"]: t["template"] for t in raw}
        if "default" not in named:
            raise ConfigError(
                f"{path}: chat_template lists templates {sorted(named)} but none named 'default', the one "
                "fine-tuning uses; name one 'default' (or give task.chat_template and remove the list)"
            )
        return named["default"] or None, f"{where} 'default'"
    raise ConfigError(
        f"{path}: chat_template is {type(raw).__name__}; expected a Jinja2 string or a list of "
        '{"name", "template"} objects'
    )


def _declared_token(
    key: str, sources: list[tuple[Path, dict[str, Any] | None]], tokenizer: Tokenizer
) -> tuple[str | None, int | None]:
    """(text, id) of bos_token / eos_token from the first file that has the key; its token must exist."""
    for path, data in sources:
        if data is None or key not in data:
            continue
        text = _token_text(data[key], path, key)
        if text is None:
            return None, None
        found = tokenizer.token_to_id(text)
        if found is None:
            raise ConfigError(
                f"{path}: {key} {text!r} is not a token of the base's tokenizer.json; the files disagree "
                f"(fix {key} in {path.name}, or give the folder the tokenizer.json it was saved with)"
            )
        return text, int(found)
    return None, None


def _adds(tokenizer: Tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether the tokenizer's own post-processor puts ``token_id`` first (or last) on a plain encode."""
    if token_id is None:
        return False
    try:
        with_special = tokenizer.encode("a", add_special_tokens=True).ids
        plain = tokenizer.encode("a", add_special_tokens=False).ids
    except Exception:  # a post-processor that cannot run on one sequence
        return False
    index = 0 if first else -1
    return bool(with_special) and with_special[index] == token_id and (not plain or plain[index] != token_id)


def turn_end_id(
    template: str, bos_token: str, eos_token: str, candidates: Mapping[str, int], where: str
) -> int | None:
    """The candidate token (text -> id) the template closes an assistant turn with, if any.

    Renders [user, assistant] with ``add_generation_prompt=False`` and reads the token right after
    the assistant's text (leading whitespace skipped). A template that does not render such a
    conversation gives None: it is refused, naming it, when a task renders with it.
    """
    # Imported here: importing orchestra.data.tasks runs its package, whose task files name this module.
    from orchestra.data.tasks.chat import render_template

    probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = render_template(template, probe, False, eos_token=eos_token, bos_token=bos_token, where=where)
    except DataError:
        return None
    at = text.rfind(_PROBE_REPLY)
    if at < 0:
        return None
    rest = text[at + len(_PROBE_REPLY) :].lstrip()
    matches = [token for token in candidates if token and rest.startswith(token)]
    return candidates[max(matches, key=len)] if matches else None


def _unique(ids: list[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ids))


def read_tokenizer_spec(
    folder: str | Path, tokenizer: Tokenizer, config: Mapping[str, Any] | None = None
) -> TokenizerSpec:
    """The :class:`TokenizerSpec` of a Hugging Face folder whose tokenizer.json is ``tokenizer``.

    ``config`` is the folder's config.json (its ``eos_token_id`` / ``bos_token_id`` come last).
    Raises :class:`~orchestra.config.ConfigError` naming the file, key and token for a declared
    token the tokenizer lacks, or when no end-of-sequence token can be found at all.
    """
    folder = Path(folder)
    tok_cfg_path, stm_path, gen_path = (
        folder / TOKENIZER_CONFIG,
        folder / SPECIAL_TOKENS_MAP,
        folder / GENERATION_CONFIG,
    )
    tok_cfg, stm, gen = _read_json(tok_cfg_path), _read_json(stm_path), _read_json(gen_path)
    template, template_source = _chat_template(folder, tok_cfg)
    sources = [(tok_cfg_path, tok_cfg), (stm_path, stm)]
    bos_token, bos_from_text = _declared_token("bos_token", sources, tokenizer)
    eos_token, eos_from_text = _declared_token("eos_token", sources, tokenizer)

    config_path = folder / "config.json"
    gen_eos = _token_ids((gen or {}).get("eos_token_id"), gen_path, "eos_token_id", tokenizer)
    config_eos = _token_ids((config or {}).get("eos_token_id"), config_path, "eos_token_id", tokenizer)
    gen_bos = _token_ids((gen or {}).get("bos_token_id"), gen_path, "bos_token_id", tokenizer)
    config_bos = _token_ids((config or {}).get("bos_token_id"), config_path, "bos_token_id", tokenizer)

    declared_bos = any(data is not None and "bos_token" in data for _, data in sources)
    # An explicit null bos_token (Qwen) means no BOS, whatever config.json's bos_token_id says.
    bos_id = bos_from_text if declared_bos else next(iter(gen_bos or config_bos), None)

    candidates = _unique([*([eos_from_text] if eos_from_text is not None else []), *gen_eos, *config_eos])
    primary: int | None = None
    if template is not None and candidates:
        texts = {str(tokenizer.id_to_token(i)): i for i in candidates}
        probe_eos = eos_token or str(tokenizer.id_to_token(candidates[0]))
        primary = turn_end_id(template, bos_token or "", probe_eos, texts, template_source)
    if primary is None and candidates:
        primary = candidates[0]
    if primary is None:
        try:
            primary = find_eos(tokenizer)[1]
        except DataError:
            raise ConfigError(
                f"{folder} names no eos_token (tokenizer_config.json) or eos_token_id (generation_config.json, "
                "config.json) and its tokenizer has no known end-of-text token; add eos_token_id to config.json"
            ) from None

    def flag(key: str, token_id: int | None, first: bool) -> bool:
        value = (tok_cfg or {}).get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{tok_cfg_path}: {key} is {value!r}; expected true or false")
        return value if isinstance(value, bool) else _adds(tokenizer, token_id, first)

    return TokenizerSpec(
        chat_template=template,
        chat_template_source=template_source if template is not None else "",
        bos_token=bos_token,
        bos_id=bos_id,
        eos_token=eos_token,
        eos_ids=_unique([primary, *candidates]),
        add_bos=flag("add_bos_token", bos_id, first=True) and bos_id is not None,
        add_eos=flag("add_eos_token", eos_from_text if eos_from_text is not None else primary, first=False),
    )
