"""`orchestra-plan`: size a training job before it is submitted.

It takes the same overrides as orchestra-train, plus its own ``plan.*`` keys (conf/plan.yaml
holds a site's defaults), and prints memory per rank term by term, step time, tokens/s and MFU,
and the GPU-hours, energy and CO2 of a token budget; for a layout that cannot fit, the changes
to try, each planned again. Nothing is built or read beyond the configs (and a base model's
config.json), so it answers in about a second on a login node::

    orchestra-plan model=llama-8b strategy=fsdp trainer.devices=8 trainer.num_nodes=4
    orchestra-plan model=llama-70b strategy=fsdp strategy.tp=8 plan.gpu=h200-141gb plan.tokens=2e12
    orchestra-plan experiment=debug plan.out=plan.json

Exit status: 0, or 2 for a configuration that cannot run (one line naming the key), or
:data:`OUT_OF_MEMORY_EXIT_CODE` when ``plan.fail_above`` is set and the predicted memory per
rank exceeds that multiple of the GPU's (slurm/pretrain.sh's check before ``srun``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.table import Table

from orchestra.cli.common import CONF_DIR, console, fail, table
from orchestra.config import ConfigError, PlanConfig, register_configs
from orchestra.io import atomic_write_text

OUT_OF_MEMORY_EXIT_CODE = 7
PLAN_PREFIX = "plan."


def split_arguments(arguments: list[str]) -> tuple[list[str], list[str]]:
    """(the training overrides, the ``plan.*`` ones without their prefix)."""
    train = [a for a in arguments if not a.startswith(PLAN_PREFIX)]
    plan = [a[len(PLAN_PREFIX) :] for a in arguments if a.startswith(PLAN_PREFIX)]
    return train, plan


def plan_config(overrides: list[str], defaults: Path | None = None) -> PlanConfig:
    """PlanConfig from the site defaults (conf/plan.yaml) and ``key=value`` overrides, type-checked."""
    schema = OmegaConf.structured(PlanConfig)
    try:
        layers = [schema]
        if defaults is not None and defaults.is_file():
            layers.append(OmegaConf.load(defaults))
        layers.append(OmegaConf.from_dotlist(overrides))
        config: PlanConfig = OmegaConf.to_object(OmegaConf.merge(*layers))  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"plan.{key}: {first}" if key else f"plan: {first}") from None
    config.validate()
    return config


def compose_train_config(overrides: list[str]) -> Any:
    """The TrainConfig orchestra-train would run with these overrides (no run directory is made)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from orchestra.cli.train import misspelled_override, to_config

    message = misspelled_override(overrides)
    if message:
        raise ConfigError(message)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            composed = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(first) from None
    finally:
        GlobalHydra.instance().clear()
    return to_config(composed)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _amount(value: float) -> str:
    """Large amounts with thousands separators, small ones with three significant digits."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def print_plan(document: dict[str, Any]) -> None:
    """The plan as console tables: the job, memory per rank, time, budget, fixes and notes."""
    model, lay, gpu = document["model"], document["layout"], document["gpu"]
    job = {
        "model": f"{model['name']} ({model['parameters'] / 1e9:.3g}B parameters, vocabulary {model['vocab_size']})",
        "gpu": f"{gpu['name']} ({gpu['memory_gib']:.1f} GiB)",
        "layout": (
            f"{lay['strategy']}: {lay['nodes']} node(s) x {lay['devices']} = {lay['world']} ranks; "
            f"tp={lay['tp']} cp={lay['cp']} pp={lay['pp']} data-parallel={lay['data_parallel']} "
            f"(states sharded over {lay['shard']})"
        ),
        "batch": (
            f"global {lay['global_batch_size']} = micro {lay['micro_batch_size']} x accumulation "
            f"{lay['accumulation']} x {lay['data_parallel']}; rows of {model['seq_len']} tokens"
        ),
        "precision": lay["precision"],
    }
    console.print(table("Orchestra plan", job))
    memory = Table(title="Memory per rank (GiB)", title_justify="left")
    memory.add_column("term")
    memory.add_column("GiB", justify="right")
    memory.add_column("note")
    for row in document["memory_rows"]:
        memory.add_row(row["label"], _gib(row["gib"]), row["note"])
    memory.add_row(
        "[bold]total[/]",
        f"[bold]{document['memory_total_gib']:.2f}[/]",
        f"{document['memory_ratio']:.0%} of {gpu['memory_gib']:.1f}; largest: {document['largest']}",
    )
    console.print(memory)
    verdict = document["verdict"]
    colour = "green" if document["fits"] else "red"
    console.print(f"[bold {colour}]{verdict}[/]", highlight=False)
    time, cost = document["time"], document["budget"]
    console.print(
        table(
            "Time",
            {
                "step": f"{time['step_s']:.3f} s (compute {time['compute_s']:.3f}, exposed communication "
                f"{time['exposed_communication_s']:.3f}, overhead {time['overhead_s']:.3f}, optimizer "
                f"{time['optimizer_s']:.3f})",
                "tokens/s": f"{time['tokens_per_s']:,.0f} ({time['tokens_per_s_per_gpu']:,.0f} per GPU)",
                "MFU": f"{time['mfu']:.1%} of the {lay['precision']} peak",
            },
        )
    )
    console.print(
        table(
            f"Budget for {cost['tokens']:.3g} tokens",
            {
                "wall time": f"{_amount(cost['wall_hours'])} h",
                "GPU-hours": _amount(cost["gpu_hours"]),
                "power": f"{_amount(cost['power_kw'])} kW",
                "energy": f"{_amount(cost['energy_kwh'])} kWh",
                "CO2": f"{_amount(cost['co2_kg'])} kg",
            },
        )
    )
    if document["fixes"]:
        fixes = Table(title="Changes to try (each planned again)", title_justify="left")
        fixes.add_column("change")
        fixes.add_column("overrides", overflow="fold")
        fixes.add_column("GiB per rank", justify="right")
        fixes.add_column("fits")
        fixes.add_column("tokens/s per GPU", justify="right")
        for fix in document["fixes"]:
            speed = fix["tokens_per_s_per_gpu"]
            fixes.add_row(
                fix["why"],
                " ".join(fix["overrides"]) or "-",
                _gib(fix["memory_total_gib"]),
                "yes" if fix["fits"] else "no",
                "-" if speed is None else f"{speed:,.0f}",
            )
        console.print(fixes)
    for note in document["notes"]:
        console.print(f"note: {note}", highlight=False, markup=False)


def refusal(document: dict[str, Any], limit: float) -> str:
    """The one line slurm/pretrain.sh prints for a layout certain to run out of memory."""
    gpu = document["gpu"]
    fits = [f for f in document["fixes"] if f["fits"] and f["overrides"]]
    fix = (
        "try: " + "; or ".join(" ".join(f["overrides"]) for f in fits[:3])
        if fits
        else "no single change fits: more GPUs per model replica (nodes, strategy.tp) or a smaller model"
    )
    return (
        f"the plan needs {document['memory_total_gib']:.1f} GiB per rank, more than {limit:g} x the "
        f"{gpu['memory_gib']:.1f} GiB of a {gpu['key']} (largest term: {document['largest']}); {fix}. "
        "Set ORCHESTRA_SKIP_PLAN=1 to submit anyway."
    )


def main() -> None:
    from orchestra.train.sizing import plan_job, plan_to_dict

    train_overrides, plan_overrides = split_arguments(sys.argv[1:])
    try:
        settings = plan_config(plan_overrides, Path(CONF_DIR) / "plan.yaml")
        plan = plan_job(compose_train_config(train_overrides), settings)
    except ConfigError as err:
        fail(f"invalid configuration: {err}")
        return
    document = plan_to_dict(plan)
    print_plan(document)
    if settings.out:
        atomic_write_text(Path(settings.out), json.dumps(document, indent=2) + "\n")
    if settings.fail_above is not None and document["memory_ratio"] > settings.fail_above:
        fail(refusal(document, settings.fail_above), code=OUT_OF_MEMORY_EXIT_CODE)


if __name__ == "__main__":
    main()
