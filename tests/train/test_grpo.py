"""task=grpo end to end on CPU, from the tiny pretrained run, on the bundled arithmetic prompts.

The tiny code-pretrained base never produces the right sum (its arithmetic reward stays 0, which
the first test checks teaches nothing), so the demonstration that GRPO raises the reward uses a
reward the base earns sometimes: the regex reward for a digit in the answer, on the same prompts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from orchestra.config import ConfigError, FinetuneMethod, StrategyName, TrainConfig
from orchestra.train.run import train
from orchestra.train.run import validate_run as validate
from tests.train.test_run import column, read_metrics
from tests.train.test_tasks_train import task_config


def grpo_config(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, run: Path, steps: int, **task: object
) -> TrainConfig:
    cfg = task_config(
        corpus_dir,
        examples_cache,
        trained_run,
        run,
        "grpo",
        "lora",
        max_steps=steps,
        val_every_n_steps=steps,
        val_batches=2,
        micro_batch_size=2,
        global_batch_size=4,
        ckpt_every_n_steps=max(1, steps // 2),
    )
    cfg.task.reward, cfg.task.reward_pattern = "regex", r"\d"
    cfg.task.group_size, cfg.task.max_new_tokens, cfg.task.beta = 8, 8, 0.04
    for key, value in task.items():
        setattr(cfg.task, key, value)
    cfg.optim.lr = 1e-2
    cfg.finetune.lora_targets = ["all-linear"]
    return cfg


def test_grpo_raises_the_mean_reward(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    result = train(grpo_config(corpus_dir, examples_cache, trained_run, tmp_path / "run", 30))
    rows = read_metrics(tmp_path / "run")
    reward = column(rows, "train/reward")
    assert sorted(reward) == list(range(30))
    before = sum(float(reward[s]) for s in range(5)) / 5
    after = sum(float(reward[s]) for s in range(15, 30)) / 15
    assert after > max(2 * before, before + 0.1), (before, after)  # measured: 0.11 -> 0.28
    assert result.summary["val_metrics"]["loss"] == -result.summary["val_metrics"]["reward"]
    # The training forward re-scores the sampled tokens as the sampler scored them.
    assert max(float(v) for v in column(rows, "train/logprob_mismatch").values()) < 1e-4
    assert all(float(v) >= 0 for v in column(rows, "train/kl").values())


def test_a_reward_the_base_never_earns_teaches_nothing(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    """Arithmetic on the tiny base: every group scores 0, so every advantage is 0 and LoRA stays at the base."""
    cfg = grpo_config(
        corpus_dir, examples_cache, trained_run, tmp_path / "run", 3, reward="arithmetic", beta=0.0
    )
    result = train(cfg)
    assert result.module is not None
    assert {float(v) for v in column(read_metrics(tmp_path / "run"), "train/reward").values()} == {0.0}
    lora_b = [p for n, p in result.module.model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)


def test_grpo_resume_continues_exactly(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    """Killed after step 3, resumed: the same samples, rewards and losses, bit for bit on CPU."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(grpo_config(corpus_dir, examples_cache, trained_run, straight, 6))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step0000003.ckpt", resumed / "checkpoints")
    result = train(grpo_config(corpus_dir, examples_cache, trained_run, resumed, 6))
    assert result.summary["resumed_from"] is not None
    for key in ("train/loss", "train/reward", "train/kl"):
        ref, res = column(read_metrics(straight), key), column(read_metrics(resumed), key)
        assert sorted(res) == [3, 4, 5] and res == {s: ref[s] for s in res}, key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"group_size": 1}, r"^task.group_size: must be >= 2"),
        ({"temperature": 0.0}, r"^task.temperature: must be positive"),
        ({"clip_eps": 1.5}, r"^task.clip_eps: must be in \(0, 1\)"),
        ({"reward": "regex", "reward_pattern": None}, r"^task.reward: regex needs a pattern"),
        ({"reward": "nowhere:fn"}, r"^task.reward: cannot import 'nowhere:fn'"),
        ({"beta": -0.1}, r"^task.beta: must be >= 0"),
    ],
)
def test_grpo_refusals_name_the_key(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path, change: dict, message: str
) -> None:
    cfg = grpo_config(corpus_dir, examples_cache, trained_run, tmp_path / "run", 2, **change)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    assert not (tmp_path / "run").exists()


def test_grpo_refuses_deepspeed_and_soft_prompts(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    cfg = grpo_config(corpus_dir, examples_cache, trained_run, tmp_path / "run", 2)
    cfg.strategy.name = StrategyName.deepspeed_zero2
    with pytest.raises(ConfigError, match=r"^strategy: task=grpo samples with the policy"):
        validate(cfg)
    prompt = grpo_config(corpus_dir, examples_cache, trained_run, tmp_path / "run2", 2)
    prompt.finetune.method = FinetuneMethod.prompt
    # The prompt-tuning spec refuses every task but pretrain and sft (its soft prompt conditions generation).
    with pytest.raises(ConfigError, match=r"^finetune: finetune=prompt .* does not apply to task=grpo"):
        validate(prompt)


def test_grpo_prompts_are_the_sft_rendering_of_a_user_turn(tmp_path: Path) -> None:
    """A grpo prompt = the tokens SFT puts before an assistant response to the same user turn, left-padded."""
    from orchestra.config import TaskConfig, TaskName
    from orchestra.data.tasks import encode_sft_batch
    from orchestra.data.tasks.formats import IGNORE_INDEX
    from orchestra.data.tasks.grpo import GRPOTask, collate_grpo
    from orchestra.data.tokenizer import train_bpe

    tok = train_bpe(["what is one plus two? three. <|user|>\n<|assistant|>\n" * 20], vocab_size=300)
    eos = tok.token_to_id("<|endoftext|>")
    task = GRPOTask(TaskConfig(name=TaskName.grpo, max_new_tokens=8))
    records = [("what is one plus two?", "3"), ("two?", "2")]
    data = task.dataset(records, tok, eos, 64, "grpo")
    for i, (prompt, _) in enumerate(records):
        ids, labels = encode_sft_batch([{"prompt": prompt, "response": "three"}], tok, eos)[0]
        first = next(j for j, y in enumerate(labels) if y != IGNORE_INDEX)
        assert data[i]["prompt"].tolist() == ids[:first]
    batch = collate_grpo([data[0], data[1]], pad_id=eos)
    lengths = batch["prompt_lengths"].tolist()
    assert batch["tokens"].shape == (2, max(lengths)) and batch["index"].tolist() == [0, 1]
    short = batch["tokens"][1]
    assert (short[: max(lengths) - lengths[1]] == eos).all()  # left padding
    assert data.answers == ["3", "2"]


def test_a_reward_model_scores_the_completions(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    """task.reward_model: a task=reward checkpoint scores prompt + completion, as it scores a pair's side."""
    from orchestra.data.tasks.dpo import last_real_index
    from orchestra.train.checkpoint import load_model_from_checkpoint

    reward_run = tmp_path / "reward"
    rm_cfg = task_config(corpus_dir, examples_cache, trained_run, reward_run, "reward", "full", max_steps=2)
    train(rm_cfg)
    reward_ckpt = reward_run / "checkpoints" / "last.ckpt"
    cfg = grpo_config(
        corpus_dir,
        examples_cache,
        trained_run,
        tmp_path / "run",
        2,
        reward="none",
        reward_model=str(reward_ckpt),
    )
    result = train(cfg)
    assert result.module is not None
    rewards = column(read_metrics(tmp_path / "run"), "train/reward")
    assert sorted(rewards) == [0, 1] and all(float(v) != 0 for v in rewards.values())
    # Padding does not change a score: each row alone scores what it scores in a padded batch.
    module = result.module
    scorer = load_model_from_checkpoint(reward_ckpt, allow_classifier=True).model.eval()
    rows = [[5, 9, 13, 2], [7, 8], [3, 4, 11, 12, 6, 1]]
    batched = module.reward_model_scores(rows)
    with torch.no_grad():
        alone = [float(scorer(torch.tensor([r]), torch.tensor([len(r) - 1]))[0, 0]) for r in rows]
    torch.testing.assert_close(batched, torch.tensor(alone), rtol=1e-5, atol=1e-6)
    pad = module.eos_id
    assert last_real_index(torch.tensor([[5, 9, pad, pad]]), pad).tolist() == [1]


def test_a_checkpoint_that_is_no_reward_model_is_refused(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    base = trained_run / "checkpoints" / "last.ckpt"
    cfg = grpo_config(corpus_dir, examples_cache, trained_run, tmp_path / "run", 2, reward_model=str(base))
    with pytest.raises(ConfigError, match=r"^task.reward_model: .* is not a reward model"):
        train(cfg)
    missing = grpo_config(
        corpus_dir,
        examples_cache,
        trained_run,
        tmp_path / "run2",
        2,
        reward_model=str(tmp_path / "nope.ckpt"),
    )
    with pytest.raises(ConfigError, match=r"^task.reward_model: .*nope.ckpt does not exist"):
        validate(missing)
    nothing = grpo_config(corpus_dir, examples_cache, trained_run, tmp_path / "run3", 2, reward="none")
    with pytest.raises(ConfigError, match=r"^task.reward: is none and no task.reward_model"):
        validate(nothing)
