"""`orchestra-eval ckpt=PATH tasks=[perplexity,classification,...]` and `orchestra-eval compare a=... b=...`.

Evaluates a training checkpoint (PEFT ones too) or an exported / Hugging Face folder on the
chosen tasks and writes eval.json + per-example samples (see orchestra/eval/run.py). Under
torchrun or srun every rank takes a share of each task's examples. ``compare`` evaluates two
models on the same examples (or reads two earlier results) and reports per metric the paired
difference with its bootstrap confidence interval, a p-value and a verdict.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from orchestra.cli.common import CONF_DIR, console, fail
from orchestra.config import CompareConfig, ConfigError, EvalConfig, LoggerName, register_configs

register_configs()


def default_out(ckpt: str) -> Path:
    """<run dir>/eval/<checkpoint name> for a checkpoint in a run dir's checkpoints/, else eval/<name>."""
    path = Path(ckpt)
    if path.parent.name == "checkpoints":
        return path.parent.parent / "eval" / path.stem
    return Path("eval") / (path.stem or "model")


def _device(choice: str) -> torch.device:
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    if choice == "auto":
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if choice == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device(f"cuda:{local}")
    return torch.device(choice)


def _init_distributed(device: torch.device) -> None:
    """One process group when launched by torchrun (or srun with its env), none otherwise."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def run_eval(cfg: EvalConfig, out: Path | None = None) -> Path | None:
    """Evaluate ``cfg.ckpt``; returns eval.json's path on rank 0 (None on the other ranks)."""
    from orchestra.eval.run import check_out, evaluate, results_document, write_results
    from orchestra.train.checkpoint.load import load_for_eval

    cfg.validate()
    out = Path(cfg.out) if cfg.out else (out or default_out(cfg.ckpt))
    check_out(out, cfg.overwrite)
    device = _device(cfg.device)
    _init_distributed(device)
    evaluated = load_for_eval(cfg.ckpt, device)
    results = evaluate(evaluated, cfg)
    if _rank() != 0:
        return None
    document = results_document(evaluated, cfg, results)
    path = write_results(out, document, results)
    console.print(results_table(path.parent))
    if cfg.logger.name == LoggerName.wandb:
        log_to_wandb(cfg, document, out)
    return path


def log_to_wandb(cfg: EvalConfig, document: dict[str, Any], out: Path) -> None:
    """One W&B run (job_type eval) with every metric as ``<task>/<metric>`` and the table of them."""
    import wandb

    from orchestra.eval.run import summary_rows
    from orchestra.train.loggers import wandb_mode

    run = wandb.init(
        project=cfg.logger.wandb_project,
        entity=cfg.logger.wandb_entity,
        group=cfg.logger.group,
        tags=list(cfg.logger.tags),
        job_type="eval",
        name=f"eval-{Path(cfg.ckpt).stem}",
        mode=wandb_mode(cfg.logger),  # type: ignore[arg-type]
        dir=str(out),
        config={"ckpt": cfg.ckpt, "tasks": list(cfg.tasks), "limit": cfg.limit, "model": document["model"]},
    )
    rows = summary_rows(document)
    run.log({f"{task}/{metric}": value for task, metric, value in rows})
    run.log({"eval_results": wandb.Table(columns=["task", "metric", "value"], data=[list(r) for r in rows])})
    run.finish()


def results_table(folder: Path) -> Table:
    from orchestra.eval.run import read_results, summary_rows

    document, _ = read_results(folder)
    table = Table(title=f"{document['model']['source']} ({document['model']['kind']})", title_justify="left")
    for column in ("task", "metric", "value"):
        table.add_column(column)
    for task, metric, value in summary_rows(document):
        table.add_row(task, metric, f"{value:.4g}")
    return table


def _errors() -> tuple[type[BaseException], ...]:
    from orchestra.data.errors import DataError
    from orchestra.eval.tasks import EvalDataError
    from orchestra.train.checkpoint import CheckpointError

    return (
        CheckpointError,
        ConfigError,
        DataError,
        EvalDataError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
    )


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    config: EvalConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    try:
        path = run_eval(config)
    except _errors() as err:
        fail(str(err))
        return
    if path is not None:
        console.print(f"results: {path}", highlight=False, soft_wrap=True)


@hydra.main(config_path=CONF_DIR, config_name="compare", version_base="1.3")
def _compare(cfg: DictConfig) -> None:
    from orchestra.eval.compare import compare_folders, verdict_table

    config: CompareConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    try:
        config.validate()
        out = Path(config.out)
        folders = []
        for side, model in (("a", config.a), ("b", config.b)):
            if (Path(model) / "eval.json").is_file():
                folders.append(Path(model))
                continue
            side_cfg = OmegaConf.to_object(
                OmegaConf.merge(OmegaConf.structured(config.eval), {"ckpt": model})
            )
            assert isinstance(side_cfg, EvalConfig)
            side_cfg.out, side_cfg.overwrite = str(out / side), True
            run_eval(side_cfg)
            folders.append(out / side)
        if _rank() != 0:
            return
        path, comparisons = compare_folders(folders[0], folders[1], out, alpha=config.alpha, n_resamples=config.n_resamples,
                                            seed=config.eval.seed)  # fmt: skip
    except _errors() as err:
        fail(str(err))
        return
    console.print(verdict_table(comparisons, config.a, config.b))
    console.print(f"comparison: {path}", highlight=False, soft_wrap=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        del sys.argv[1]
        _compare()
        return
    _main()


if __name__ == "__main__":
    main()
