"""Conversations and their rendering to text segments, each marked trained or not.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``; only the
assistant's turns are trained. Shared by sft and dpo, so preference tuning sees the format
supervised fine-tuning taught.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from orchestra.data.errors import DataError
from orchestra.data.tasks.formats import text_field
from orchestra.data.tokenizer import EOS_TOKEN

ROLES = ("system", "user", "assistant")

Messages = list[dict[str, str]]
Segments = list[tuple[str, bool]]

SFT_FORMS = '{"prompt", "response"} or {"messages": [...]}'


def conversation(record: Mapping[str, Any], where: str) -> Messages:
    """A record of either sft form as a validated conversation (a prompt/response pair is two turns)."""
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
            content = text_field(message, "content", at, "'role' and 'content'")
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
            f"expected {SFT_FORMS})"
        )
    prompt = text_field(record, "prompt", where, SFT_FORMS)
    response = text_field(record, "response", where, SFT_FORMS)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def as_messages(example: Mapping[str, Any] | Sequence[Mapping[str, str]]) -> Messages:
    """A record of either sft form, or an already built conversation, as a list of messages."""
    if isinstance(example, Mapping):
        return conversation(example, "example")
    return [{"role": m["role"], "content": m["content"]} for m in example]


def render_chat(
    messages: Sequence[Mapping[str, str]],
    template: str | None = None,
    eos_token: str = EOS_TOKEN,
    bos_token: str = "",
    where: str = "task.chat_template",
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
    ``add_generation_prompt``, with ``bos_token``, ``eos_token`` and ``tools=None`` defined, as
    transformers' ``apply_chat_template`` calls it (:func:`render_template`). The assistant spans
    are found the standard way: the prompt before assistant message i is the render of
    ``messages[:i]`` with ``add_generation_prompt=True``, the turn ends where the render of
    ``messages[:i+1]`` ends, and both must be prefixes of the full render. ``where`` names the
    template in errors (the config key, or the base's file).
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

    render = functools.partial(
        render_template, template, eos_token=eos_token, bos_token=bos_token, where=where
    )
    full = render(messages, add_generation_prompt=False)
    segments, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        turn = render(messages[: i + 1], add_generation_prompt=False)
        if not (turn.startswith(prompt) and full.startswith(turn) and len(prompt) >= pos):
            raise DataError(
                f"{where}: the render of the first {i} messages (with add_generation_prompt=true) "
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


def render_template(
    template: str,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool,
    eos_token: str,
    bos_token: str = "",
    where: str = "task.chat_template",
) -> str:
    """One render of a Hugging Face style chat template, as ``apply_chat_template(tokenize=False)``.

    The variables are the ones transformers passes without tools or documents. ``strftime_now``
    is left undefined on purpose: templates that use it for "today's date" (Llama 3.2/3.3) fall
    back to their fixed date, so training data does not depend on the day it is tokenized.
    """
    import jinja2

    try:
        return _compile_template(template, where).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            eos_token=eos_token,
            bos_token=bos_token,
            tools=None,
            documents=None,
        )
    except jinja2.exceptions.TemplateError as err:
        raise DataError(f"{where}: rendering failed ({err})") from None


@functools.lru_cache(maxsize=8)
def _compile_template(template: str, where: str = "task.chat_template") -> Any:
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # transformers' override: jinja's own tojson escapes HTML characters.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    # The environment Hugging Face's apply_chat_template uses, so their templates render the same.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise DataError(f"{where}: not a valid Jinja2 template (line {err.lineno}: {err.message})") from None
