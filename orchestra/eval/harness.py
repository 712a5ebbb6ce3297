"""lm-evaluation-harness over our model: an ``lm_eval`` LM run in-process with ``simple_evaluate``.

lm-eval's own request handling is reused (TemplateLM splits a context from its continuation
the way its Hugging Face backend does, and its rolling windows score documents), so its tasks
give the numbers its HF backend gives on the exported folder; scoring and generation are ours
(:mod:`orchestra.eval.scoring`: length-sorted batches, the output projection only where a token
is scored, generation through the KV cache). Under torch.distributed each rank takes its share
of the requests and lm-eval gathers the results through the hooks below.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM

from orchestra.eval.model import EvalModel
from orchestra.eval.scoring import generate_batched, score_continuations, score_documents

# Task YAMLs shipped for the bundled example sets (multiple choice, generation); see docs/evaluation.md.
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class OrchestraLM(TemplateLM):
    """An lm_eval language model over an :class:`EvalModel` (checkpoint, PEFT checkpoint or HF folder)."""

    def __init__(self, evaluated: EvalModel, batch_size: int = 16, max_gen_toks: int = 256) -> None:
        super().__init__()
        self.evaluated = evaluated
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        dist = _dist()
        if dist is not None:
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self._device = evaluated.device

    # --- tokens -------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.evaluated.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return self.evaluated.prefix_id

    @property
    def max_length(self) -> int:
        from orchestra.model.generate import context_length

        return context_length(self.evaluated.model)  # type: ignore[arg-type]

    @property
    def tokenizer_name(self) -> str:
        return self.evaluated.tokenizer_sha256 or self.evaluated.source

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As the HF backend encodes: the tokenizer's own special tokens unless told otherwise,
        and none when the string already starts with the prefix token's text."""
        if add_special_tokens is None:
            bos = self.evaluated.bos_id
            starts_with_bos = bos is not None and string.startswith(self.evaluated.decode([bos]) or "\0")
            add_special_tokens = not starts_with_bos
        return self.evaluated.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.evaluated.decode(list(tokens))

    # --- requests -----------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        scored = score_continuations(
            self.evaluated.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size
        )
        results = [(s.logprob, s.greedy) for s in scored]
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        documents = [self.tok_encode(req.args[0]) for req in requests]
        scored = score_documents(self.evaluated.model, documents, self.prefix_token_id, self.batch_size)
        results = [s.logprob for s in scored]
        for req, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), result)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations cut at the first ``until`` string."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            max_new = min(max_new, self.max_length - 1)
            prompts = [self.tok_encode(requests[i].args[0]) for i in members]
            generated = generate_batched(
                self.evaluated.model,
                prompts,
                max_new_tokens=max_new,
                stop_ids=self.evaluated.eos_ids,
                batch_size=self.batch_size,
                temperature=temperature,
                top_p=kwargs.pop("top_p", None),
                top_k=kwargs.pop("top_k", None),
            )
            for i, ids in zip(members, generated, strict=True):
                text = self.tok_decode(ids)
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The model's own chat template (an HF base's, recorded in checkpoints and exports)."""
        template = self.evaluated.chat_template
        if template is None:
            raise ValueError(
                f"{self.evaluated.source} has no chat template; run lm-eval without apply_chat_template"
            )
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text: str = env.from_string(template).render(
            messages=chat_history, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
        )
        return text

    # --- distributed hooks lm-eval calls when world_size > 1 ----------------------------------

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        dist = _dist()
        if dist is None:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        dist = _dist()
        if dist is None:
            return [obj]
        parts: list[Any] | None = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, parts, dst=dst)
        return parts

    def barrier(self) -> None:
        dist = _dist()
        if dist is not None:
            dist.barrier()


def run_harness(
    evaluated: EvalModel,
    tasks: Sequence[str],
    *,
    batch_size: int = 16,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    seed: int = 1234,
    log_samples: bool = True,
    examples_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on our model for ``tasks`` (shipped YAMLs + any in ``include_path``).

    Returns lm-eval's results dict (rank 0; other ranks get an empty dict). Tasks whose data
    are not cached locally fail in lm-eval's loader, which names the dataset.
    """
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="orchestra-lm-eval-") as shipped:
        # The shipped YAMLs name the bundled examples' folder only once it is known.
        for yaml in TASKS_DIR.glob("*.yaml"):
            text = yaml.read_text()
            if "__EXAMPLES__" in text:
                if examples_dir is None:
                    continue
                text = text.replace("__EXAMPLES__", str(Path(examples_dir).resolve()))
            (Path(shipped) / yaml.name).write_text(text)
        paths = [shipped] + ([str(include_path)] if include_path else [])
        return _evaluate(simple_evaluate, TaskManager(include_path=paths), evaluated, tasks, batch_size=batch_size,
                         limit=limit, num_fewshot=num_fewshot, seed=seed, log_samples=log_samples)  # fmt: skip


def _evaluate(
    simple_evaluate: Any,
    manager: Any,
    evaluated: EvalModel,
    tasks: Sequence[str],
    *,
    batch_size: int,
    limit: int | float | None,
    num_fewshot: int | None,
    seed: int,
    log_samples: bool,
) -> dict[str, Any]:
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"lm-eval task(s) {unknown} are neither shipped ({sorted(p.stem for p in TASKS_DIR.glob('*.yaml'))}) "
            "nor lm-eval's own; give an include_path with their YAML"
        )
    results = simple_evaluate(
        model=OrchestraLM(evaluated, batch_size=batch_size),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=0,
    )
    return results or {}
