"""task=grpo: Group Relative Policy Optimization (Shao et al. 2024) with verifiable rewards.

Data: jsonl ``{"prompt": str, "answer": str}`` (orchestra/data/tasks/grpo.py; the bundled set is
arithmetic). Every step, each prompt of the batch is continued task.group_size times by the policy
itself (model/generate.py's KV-cache sampling, seeded by step and example so a resumed run, or
one at another world size, samples the same), each completion is scored by task.reward against
the answer (plus a reward model's score of prompt + completion with task.reward_model), and the
advantages are the rewards normalised within their prompt's group. The loss is the clipped
surrogate with the k3 KL to the reference (train/metrics.py:grpo_loss); one optimizer step per
sample batch, so the ratio is 1 and the clip guards only the numerics. The reference is the
base (LoRA's with the adapters off, as for DPO); task.beta=0 drops it.

The training forward re-scores the sampled tokens; its log-probabilities must equal the
sampler's, and their largest difference is logged as train/logprob_mismatch. Validation
decodes greedily, one completion per prompt: val/reward is the mean reward and val/loss its
negation (what checkpoint selection and early stopping minimise).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer

from orchestra.config import ConfigError, StrategyName, TrainConfig, require
from orchestra.model import Transformer
from orchestra.model.generate import generate
from orchestra.train.metrics import group_advantages, grpo_loss
from orchestra.train.plan import TaskSpec
from orchestra.train.rewards import RewardFn, reward_function
from orchestra.train.tasks.preference import PreferenceModule, validate_reference
from orchestra.train.tasks.sft import task_datamodule


def _validate(cfg: TrainConfig) -> None:
    t = cfg.task
    require(
        t.group_size >= 2,
        "task.group_size",
        f"must be >= 2 (advantages compare a group's samples), got {t.group_size}",
    )
    require(t.max_new_tokens >= 1, "task.max_new_tokens", f"must be >= 1, got {t.max_new_tokens}")
    require(t.temperature > 0, "task.temperature", f"must be positive (GRPO samples), got {t.temperature}")
    require(0 < t.clip_eps < 1, "task.clip_eps", f"must be in (0, 1), got {t.clip_eps}")
    require(t.beta >= 0, "task.beta", f"must be >= 0 (0: no KL penalty, no reference), got {t.beta}")
    reward_function(t.reward, t.reward_pattern)  # a ConfigError naming task.reward if it cannot be used
    require(
        not cfg.strategy.name.is_deepspeed,
        "strategy",
        "task=grpo samples with the policy inside each step, which DeepSpeed's engine does not support "
        "here; use strategy=single, ddp or fsdp",
    )
    if t.reward_model is not None:
        require(Path(t.reward_model).exists(), "task.reward_model", f"{t.reward_model} does not exist")
    else:
        require(t.reward != "none", "task.reward", "is none and no task.reward_model is set: nothing scores")
    if t.beta > 0:
        validate_reference(cfg)


def load_reward_model(path: str, tokenizer_json: str, device: torch.device) -> torch.nn.Module:
    """A task=reward checkpoint as a frozen scorer; it must read the policy's tokens."""
    from orchestra.train.checkpoint import CheckpointError, load_model_from_checkpoint
    from orchestra.train.tasks.reward import REWARD_LABEL

    try:
        loaded = load_model_from_checkpoint(path, map_location=device, allow_classifier=True)
    except CheckpointError as err:
        raise ConfigError(f"task.reward_model: {err}") from None
    if loaded.meta.labels != (REWARD_LABEL,):
        raise ConfigError(f"task.reward_model: {path} is not a reward model (train one with task=reward)")
    if loaded.meta.tokenizer_json != tokenizer_json:
        raise ConfigError(
            f"task.reward_model: {path} has another tokenizer than the policy; train the reward model from "
            "the same base"
        )
    return loaded.model.requires_grad_(False).eval()


class GRPOModule(PreferenceModule):
    """GRPO over batches of left-padded prompts (see the module docstring)."""

    def __init__(self, plan: Any, datamodule: Any = None) -> None:
        super().__init__(plan, datamodule)
        # Where the answers are: each split's dataset, in the order of the batches' example indices.
        self.datamodule = datamodule
        self.reward: RewardFn = reward_function(self.cfg.task.reward, self.cfg.task.reward_pattern)
        self._tokenizer: Tokenizer | None = None
        # Outside the module tree (not checkpointed, not wrapped): the frozen reward model, if any.
        self._reward_model: list[torch.nn.Module] = []
        # Per micro-batch: reward, reward std within groups, KL, clip fraction, completion tokens, mismatch.
        self._step_stats: list[torch.Tensor] = []

    @property
    def uses_reference(self) -> bool:  # type: ignore[override]
        return self.cfg.task.beta > 0

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        return self._tokenizer

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.cfg.task.reward_model is not None and not self._reward_model:
            self._reward_model.append(
                load_reward_model(self.cfg.task.reward_model, self.tokenizer_json, self.device)
            )

    def _generator(self, batch: dict[str, torch.Tensor], tag: str) -> torch.Generator:
        """Seeded by (seed, step, the batch's first example): the same samples after a resume, and
        at any world size (a rank's micro-batch holds the examples one process's would)."""
        key = f"{self.cfg.seed}/{tag}/{self.global_step}/{int(batch['index'][0])}"
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    def sample(
        self, batch: dict[str, torch.Tensor], copies: int, temperature: float, tag: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [N, T + n], completion mask [N, n], sampler log-probs [N, n], segment ids [N, T + n]), N = B * copies."""
        prompts = batch["tokens"].repeat_interleave(copies, dim=0)
        lengths = batch["prompt_lengths"].repeat_interleave(copies).tolist()
        n = self.cfg.task.max_new_tokens
        sampler_logps = torch.zeros(prompts.shape[0], n, device=self.device)
        # A sharded model runs one forward per step on every rank: no rank may stop early.
        sharded = self.cfg.strategy.name == StrategyName.fsdp
        rows = generate(
            cast(Transformer, self.net),
            prompts,
            n,
            temperature=temperature,
            eos_id=list(self.eos_ids),
            generator=self._generator(batch, tag),
            prompt_lengths=lengths,
            stop_early=not sharded,
            logprobs=sampler_logps,
        )
        T = prompts.shape[1]
        completion = rows[:, T:]
        stops = torch.isin(completion, torch.tensor(list(self.eos_ids), device=rows.device))
        after_stop = (stops.cumsum(1) - stops.long()) > 0
        mask = ~after_stop  # the completion up to and including its first stop token
        positions = torch.arange(rows.shape[1], device=rows.device)
        segments = (positions[None, :] >= (T - torch.tensor(lengths, device=rows.device))[:, None]).long()
        return rows, mask, sampler_logps[:, : completion.shape[1]], segments

    def token_logps(
        self, model: torch.nn.Module, rows: torch.Tensor, segments: torch.Tensor, n: int, temperature: float
    ) -> torch.Tensor:
        """Log-probabilities [N, n] of each row's last n tokens, as the sampler computed them."""
        logits = model(rows, segment_ids=segments)[:, -n - 1 : -1].float()
        if temperature > 0:
            logits = logits / temperature
        return torch.log_softmax(logits, dim=-1).gather(2, rows[:, -n:, None])[..., 0]

    def rewards(
        self,
        rows: torch.Tensor,
        mask: torch.Tensor,
        lengths: torch.Tensor,
        indices: torch.Tensor,
        split: str,
        copies: int,
    ) -> torch.Tensor:
        """Each completion's reward: task.reward of its text (up to its first stop token) against the
        example's answer, plus the reward model's score of prompt + completion when one is set."""
        answers = self.datamodule.dataset(split).answers
        n = mask.shape[1]
        T = rows.shape[1] - n
        stop_ids = set(self.eos_ids)
        scores, sequences = [], []
        examples = indices.repeat_interleave(copies).tolist()
        for b, (row, keep, example) in enumerate(zip(rows.tolist(), mask.tolist(), examples, strict=True)):
            # The mask runs to the first stop token, included: the text is what comes before it.
            completion = [
                tok for tok, kept in zip(row[T:], keep, strict=True) if kept and tok not in stop_ids
            ]
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            scores.append(float(self.reward(text, answers[example])))
            sequences.append(row[T - int(lengths[b]) : T] + completion)
        total = torch.tensor(scores, device=self.device)
        if self._reward_model:
            total = total + self.reward_model_scores(sequences)
        return total

    @torch.no_grad()
    def reward_model_scores(self, sequences: list[list[int]]) -> torch.Tensor:
        """The reward model's scores of unpadded token rows, right-padded with EOS as it was trained."""
        from orchestra.data.tasks.dpo import last_real_index

        pad = self.eos_id
        width = max(len(s) for s in sequences)
        tokens = torch.full((len(sequences), width), pad, dtype=torch.long, device=self.device)
        for i, seq in enumerate(sequences):
            tokens[i, : len(seq)] = torch.tensor(seq, device=self.device)
        scores: torch.Tensor = self._reward_model[0](tokens, last_real_index(tokens, pad))
        return scores.squeeze(-1).float()

    def task_loss(self, batch: Any) -> torch.Tensor:
        task = self.cfg.task
        rows, mask, sampler_logps, segments = self.sample(batch, task.group_size, task.temperature, "train")
        n = mask.shape[1]
        lengths = batch["prompt_lengths"].repeat_interleave(task.group_size)
        rewards = self.rewards(rows, mask, lengths, batch["index"], "train", task.group_size)
        advantages = group_advantages(rewards, task.group_size)
        logps = self.token_logps(self.net, rows, segments, n, task.temperature)
        reference = None
        if self.uses_reference:
            with self.reference() as model:
                reference = self.token_logps(model, rows, segments, n, task.temperature)
        loss, kl, clipped = grpo_loss(
            logps, logps.detach(), reference, advantages, mask, task.beta, task.clip_eps
        )
        mismatch = ((logps.detach() - sampler_logps).abs() * mask).max()
        spread = rewards.view(-1, task.group_size).std(1).mean()
        self._step_stats.append(
            torch.stack([rewards.mean(), spread, kl, clipped, mask.sum(1).float().mean(), mismatch]).detach()
        )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = super().training_step(batch, batch_idx)
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            # One row per optimizer step, over all its micro-batches (as train/loss): the same
            # numbers at any world size. The logprob mismatch is the step's largest.
            stats = torch.stack(self._step_stats)
            self._step_stats.clear()
            means = stats.mean(0)
            keys = ("reward", "reward_std", "kl", "clip_fraction", "completion_tokens")
            for i, key in enumerate(keys):
                self.log(f"train/{key}", means[i], on_step=True, on_epoch=False, sync_dist=True)
            self.log(
                "train/logprob_mismatch", stats[:, 5].max(), on_step=True, on_epoch=False, sync_dist=True,
                reduce_fx="max",
            )  # fmt: skip
        return loss

    def on_validation_epoch_start(self) -> None:
        # reward sum, completions, completion tokens
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        rows, mask, _, _ = self.sample(batch, 1, 0.0, "val")
        rewards = self.rewards(rows, mask, batch["prompt_lengths"], batch["index"], "val", 1)
        self._val_sums += torch.stack(
            [
                rewards.double().sum(),
                torch.tensor(float(rewards.numel()), device=self.device, dtype=torch.float64),
                mask.sum().double(),
            ]
        )

    def on_validation_epoch_end(self) -> None:
        s = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        reward = float(s[0]) / float(s[1])
        self.log("val/reward", reward, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/loss", -reward, on_step=False, on_epoch=True)
        self.log("val/completion_tokens", float(s[2]) / float(s[1]), on_step=False, on_epoch=True)


SPEC = TaskSpec(name="grpo", module=GRPOModule, build_datamodule=task_datamodule, validate=_validate)
