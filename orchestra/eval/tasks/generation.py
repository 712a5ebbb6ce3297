"""generation: exact match, token F1, ROUGE-1/2/L and BLEU of generated answers against references.

Records are sft examples (``{"prompt", "response"}`` or ``{"messages"}``): the prompt is the
conversation up to its last assistant turn, rendered as training renders it (the model's own
chat template, else Orchestra's plain one), and the reference is that turn's content (plus any
``"references"`` list in the record). Generation is greedy unless temperature > 0, batched
through the KV cache, and stops at the model's EOS ids.
"""

from __future__ import annotations

from typing import Any

from orchestra.config import IGNORE_INDEX, EvalConfig
from orchestra.data.hf_tokenizer import TokenizerSpec
from orchestra.data.tasks.chat import conversation
from orchestra.data.tasks.formats import read_records
from orchestra.data.tasks.sft import encode_sft_batch
from orchestra.eval.model import EvalModel
from orchestra.eval.scoring import generate_batched
from orchestra.eval.tasks.spec import EvalDataError, EvalTask, Paired, Ranks, TaskResult, limited


def generation_path(cfg: EvalConfig) -> str:
    if cfg.generation_path:
        return cfg.generation_path
    from orchestra.data.examples import example_paths

    return str(example_paths(cfg.data_cache, "sft")[1])


def read_generation(path: str) -> list[tuple[list[dict[str, str]], list[str]]]:
    """(conversation ending in the assistant turn to predict, its references) of every record."""
    out = []
    for where, record in read_records(path):
        turns = record.get("messages")
        last = turns[-1] if isinstance(turns, list) and turns and isinstance(turns[-1], dict) else {}
        reference = last.get("content") if last.get("role") == "assistant" else record.get("response")
        if not isinstance(reference, str) or not reference.strip():
            raise EvalDataError(
                f"{where}: a generation example needs a reference: a non-empty last assistant message "
                "(or a response)"
            )
        messages = conversation(record, where)
        if not messages[-1]["content"].strip():
            raise EvalDataError(
                f"{where}: a generation example needs a reference: a non-empty last assistant message "
                "(or a response)"
            )
        refs = [messages[-1]["content"]]
        extra = record.get("references")
        if extra is not None:
            if not (isinstance(extra, list) and all(isinstance(r, str) for r in extra)):
                raise EvalDataError(f"{where}: references must be a list of strings")
            refs += extra
        out.append((messages, refs))
    return out


def prompt_ids(evaluated: EvalModel, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    """Each conversation's tokens before its last assistant turn, rendered as fine-tuning renders it."""
    tokens = TokenizerSpec(
        chat_template=evaluated.chat_template,
        bos_id=evaluated.bos_id,
        bos_token=evaluated.tokenizer.id_to_token(evaluated.bos_id) if evaluated.bos_id is not None else None,
        eos_ids=evaluated.eos_ids,
        add_bos=evaluated.add_bos,
    )
    encoded = encode_sft_batch(conversations, evaluated.tokenizer, evaluated.eos_ids[0], tokens=tokens)
    prompts = []
    for ids, labels in encoded:
        end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        prompts.append(ids[:start])
    return prompts


def continue_conversations(
    evaluated: EvalModel, cfg: EvalConfig, conversations: list[list[dict[str, str]]]
) -> list[list[int]]:
    """The model's answer ids to each conversation's last turn, with the config's decoding settings."""
    return generate_batched(
        evaluated.model,
        prompt_ids(evaluated, conversations),
        max_new_tokens=cfg.max_new_tokens,
        stop_ids=evaluated.eos_ids,
        batch_size=cfg.batch_size,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )


def score(prediction: str, references: list[str]) -> dict[str, Any]:
    from orchestra.eval.metrics import exact_match, rouge_scores, sentence_bleu, token_f1

    rouge = rouge_scores([prediction], [references])
    return {
        "exact_match": exact_match(prediction, references),
        "token_f1": token_f1(prediction, references),
        "rouge1": rouge["rouge1"][0],
        "rouge2": rouge["rouge2"][0],
        "rougeL": rouge["rougeL"][0],
        "bleu": sentence_bleu(prediction, references),
    }


def run(evaluated: EvalModel, cfg: EvalConfig, ranks: Ranks) -> TaskResult:
    from orchestra.eval.metrics import bleu_score

    path = generation_path(cfg)
    examples = limited(read_generation(path), cfg.limit)
    if not examples:
        raise EvalDataError(f"generation: {path} holds no example")
    mine = ranks.shard(examples)
    generated = continue_conversations(evaluated, cfg, [m for _, (m, _) in mine])
    records = []
    for (i, (_, refs)), ids in zip(mine, generated, strict=True):
        text = evaluated.decode(ids).strip()
        records.append((i, {"example": i, "prediction": text, "references": refs, **score(text, refs)}))
    samples = ranks.gather(records)
    keys = ("exact_match", "token_f1", "rouge1", "rouge2", "rougeL")
    metrics = {k: sum(r[k] for r in samples) / len(samples) for k in keys}
    metrics["bleu"] = bleu_score([r["prediction"] for r in samples], [r["references"] for r in samples])
    return TaskResult(
        metrics,
        samples,
        paired={
            "exact_match": Paired("exact_match", higher_is_better=True),
            "token_f1": Paired("token_f1", higher_is_better=True),
            "rougeL": Paired("rougeL", higher_is_better=True),
            "bleu": Paired("bleu", higher_is_better=True),
        },
        details={
            "path": path,
            "decoding": "greedy" if cfg.temperature == 0 else f"sampled T={cfg.temperature}",
        },
    )


TASK = EvalTask(name="generation", run=run)
