"""Build a run's report from what the run itself wrote: summary.json, metrics.csv, energy.csv and
the per-node CodeCarbon files. No W&B needed, so it works offline, on a cluster login node and for
a run that crashed before its summary (then it says what is missing).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from orchestra.report.plots import Series, energy_figure, loss_figure, throughput_figure

REPORT_NAME = "report.md"
J_PER_KWH = 3.6e6


class ReportError(ValueError):
    """A run dir the report cannot be built from; the message names the missing file."""


@dataclass
class RunData:
    run_dir: Path
    summary: dict[str, Any]
    metrics: list[dict[str, float]]
    energy: list[dict[str, float]]
    nodes: list[dict[str, str]]  # one row per node and tracker run, from emissions/emissions-node*.csv


@dataclass
class Report:
    """The markdown, the figures by file name, and the exact series each figure was drawn from."""

    markdown: str
    figures: dict[str, Figure] = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)
    path: Path | None = None  # report.md, once written


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _floats(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    out = []
    for row in rows:
        parsed = {}
        for key, value in row.items():
            try:
                parsed[key] = float(value)
            except (TypeError, ValueError):
                continue
        out.append(parsed)
    return out


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run dir {run_dir} does not exist")
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.csv"
    if not summary_path.is_file() and not metrics_path.is_file():
        raise ReportError(
            f"{run_dir} holds neither summary.json nor metrics.csv; is it an Orchestra run dir?"
        )
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    nodes = []
    for path in sorted((run_dir / "emissions").glob("emissions-node*.csv")):
        for row in _read_csv(path):
            nodes.append({"file": path.name, **row})
    return RunData(
        run_dir=run_dir,
        summary=summary,
        metrics=_floats(_read_csv(metrics_path)),
        energy=_floats(_read_csv(run_dir / "energy.csv")),
        nodes=nodes,
    )


def metric_series(rows: list[dict[str, float]], key: str) -> Series:
    """(optimizer steps completed, value) of one metrics.csv column.

    Lightning's CSV ``step`` is the 0-based index of the step that logged the value, so the number
    of completed steps (what summary.json and energy.csv count) is step + 1.
    """
    points = [(int(r["step"]) + 1, r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def run_series(run: RunData) -> tuple[dict[str, Series], str]:
    """Every series the figures draw, and the loss plot's x label."""
    s = run.summary
    tokens_per_step = s["tokens"] / s["steps"] if s.get("steps") else None
    series: dict[str, Series] = {}
    for key in ("train/loss", "val/loss"):
        steps, values = metric_series(run.metrics, key)
        x = [n * tokens_per_step for n in steps] if tokens_per_step else steps
        series[key] = (x, values)
    for key in ("perf/tokens_per_s", "perf/mfu", "perf/hfu"):
        series[key] = metric_series(run.metrics, key)
    if run.energy:
        # Minutes since the first attempt started (elapsed_s counts from each attempt's fit start).
        origin = run.energy[0]["time"] - run.energy[0]["elapsed_s"]
        minutes = [(r["time"] - origin) / 60 for r in run.energy]
        series["energy/power_w"] = (minutes, [r["power_w"] for r in run.energy])
        series["energy/kwh"] = (minutes, [r["kwh"] for r in run.energy])
    return series, ("tokens" if tokens_per_step else "optimizer step")


def _fmt(value: Any, spec: str = ".4g", unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        return f"{value:{spec}}{unit}"
    return str(value)


def final_value(run: RunData, summary_key: str, column: str) -> str:
    """The summary's final value, else the newest one metrics.csv logged, with the step it is from.

    summary.json can lack a value the run did log: a run that crashed before its summary, or
    one whose final validation (run after training when max_steps is not a multiple of
    val_every_n_steps) replaced the training metrics the summary is read from.
    """
    value = run.summary.get(summary_key)
    if value is not None:
        return _fmt(value)
    steps, values = metric_series(run.metrics, column)
    if not values:
        return "—"
    newest = max(range(len(steps)), key=lambda i: (steps[i], i))  # the last row of the newest step
    return f"{_fmt(values[newest])} (metrics.csv, step {steps[newest]})"


def _table(rows: Sequence[tuple[str, str]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return lines


def _sustainability(run: RunData) -> list[str]:
    s = run.summary
    kwh, kg = s.get("energy_kwh"), s.get("co2_kg")
    if kwh is None and run.energy:
        kwh, kg = run.energy[-1]["kwh"], run.energy[-1]["kg_co2eq"]
    lines = ["## Sustainability", ""]
    if kwh is None:
        return [
            *lines,
            "Energy accounting was off for this run (`energy=none`), so there is nothing to report.",
            "",
        ]
    intensity = kg / kwh if kg is not None and kwh > 0 else None
    first_node = run.nodes[0] if run.nodes else {}
    where = ", ".join(v for v in (first_node.get("country_name"), first_node.get("region")) if v) or "—"
    rows = [
        ("energy", f"{kwh:.4g} kWh ({kwh * J_PER_KWH:.4g} J)"),
        ("carbon", f"{_fmt(kg, '.4g')} kg CO2eq"),
        ("energy per token", _fmt(s.get("j_per_token"), ".4g", " J/token")),
        (
            "grid intensity used",
            f"{intensity * 1000:.1f} g CO2eq/kWh ({intensity:.4g} kg/kWh)" if intensity else "—",
        ),
        ("location (CodeCarbon)", where),
        ("PUE applied", first_node.get("pue") or "—"),
    ]
    if run.energy and run.energy[-1].get("time") and len(run.energy) > 1:
        span = run.energy[-1]["time"] - run.energy[0]["time"] + run.energy[0]["elapsed_s"]
        rows.append(("mean power, all nodes", f"{kwh * J_PER_KWH / span:.1f} W over {span / 60:.1f} min"))
    lines += _table(rows)
    lines += [
        "",
        "Energy is measured once per node (CodeCarbon on local rank 0: GPUs via NVML, CPU via RAPL "
        "or CodeCarbon's estimate, RAM) and summed over nodes; the PUE is included. "
        "Carbon = energy × the grid intensity CodeCarbon holds for the configured country/region.",
        "",
    ]
    if run.nodes:
        lines += [
            "Per node and tracker run (`emissions/`):",
            "",
            "| file | kWh | kg CO2eq | GPUs | CPU |",
            "|---|---|---|---|---|",
        ]
        for node in run.nodes:
            lines.append(
                f"| {node['file']} | {_fmt(_num(node.get('energy_consumed')))} | "
                f"{_fmt(_num(node.get('emissions')))} | {node.get('gpu_count') or 0} × "
                f"{node.get('gpu_model') or '—'} | {node.get('cpu_model') or '—'} |"
            )
        lines.append("")
    return lines


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def build_report(run_dir: Path) -> Report:
    """The report of one run dir, in memory (figures not yet written)."""
    run = load_run(run_dir)
    s = run.summary
    series, x_label = run_series(run)
    figures = {
        "loss.png": loss_figure(series["train/loss"], series["val/loss"], x_label),
        "throughput.png": throughput_figure(
            series["perf/tokens_per_s"], series["perf/mfu"], series["perf/hfu"]
        ),
    }
    if "energy/kwh" in series:
        figures["energy.png"] = energy_figure(series["energy/power_w"], series["energy/kwh"])

    lines = [f"# Run report — {run.run_dir.name}", ""]
    if not s:
        lines += [
            "> summary.json is missing: the run did not finish. Figures show what metrics.csv holds.",
            "",
        ]
    lines += _table(
        [
            ("run dir", f"`{run.run_dir.resolve()}`"),
            ("steps / tokens", f"{_fmt(s.get('steps'), ',')} / {_fmt(s.get('tokens'), ',')}"),
            ("parameters", _fmt(s.get("parameters"), ",")),
            (
                "strategy / world size / precision",
                f"{_fmt(s.get('strategy'))} / {_fmt(s.get('world_size'))} / {_fmt(s.get('precision'))}",
            ),
            ("wall time", _fmt(s.get("wall_s"), ".1f", " s")),
            ("resumed from", f"`{s['resumed_from']}`" if s.get("resumed_from") else "—"),
        ]
    )
    lines += ["", "## Learning", ""]
    lines += _table(
        [
            ("final train loss", final_value(run, "train_loss", "train/loss")),
            ("final val loss", final_value(run, "val_loss", "val/loss")),
            ("final val perplexity", final_value(run, "val_ppl", "val/ppl")),
        ]
    )
    lines += ["", "![loss](loss.png)", "", "## Throughput", ""]
    tps = series["perf/tokens_per_s"][1]
    data_wait = metric_series(run.metrics, "perf/data_wait_frac")[1]
    hfu = series["perf/hfu"][1]
    lines += _table(
        [
            ("mean tokens/s (all devices)", _fmt(s.get("tokens_per_s"), ",.0f")),
            ("median tokens/s per log interval", _fmt(statistics.median(tps) if tps else None, ",.0f")),
            (
                "MFU (run mean)",
                _fmt(s["mfu"] * 100, ".1f", " %")
                if s.get("mfu") is not None
                else "not reported: no peak FLOP/s known for this device (set `trainer.peak_flops`)",
            ),
            ("HFU (last interval)", _fmt(hfu[-1] * 100, ".1f", " %") if hfu else "—"),
            ("peak device memory", _fmt(s.get("peak_mem_gb"), ".2f", " GiB")),
            (
                "time waiting for data (median)",
                _fmt(statistics.median(data_wait) * 100, ".1f", " %") if data_wait else "—",
            ),
        ]
    )
    lines += ["", "![throughput](throughput.png)", ""]
    lines += _sustainability(run)
    if "energy.png" in figures:
        lines += ["![energy](energy.png)", ""]
    lines += [
        "## Files",
        "",
        "- `metrics.csv`: every logged metric (train/, val/, perf/, energy/, system/) by step",
        "- `energy.csv`: job-wide energy readings at each logging step (time, step, kwh, kg_co2eq, power_w)",
        "- `emissions/emissions-node<k>.csv`: each node's CodeCarbon record",
        "- `summary.json`: the run's final numbers",
    ]
    if (run.run_dir / "wandb").is_dir():
        lines.append(
            f"- `wandb/`: W&B run files; upload an offline run with `wandb sync {run.run_dir.resolve()}/wandb/offline-run-*`"
        )
    lines.append("")
    return Report(markdown="\n".join(lines), figures=figures, series=series)


def write_report(run_dir: Path) -> Report:
    """Write report.md and its PNG figures into the run dir; returns what was written."""
    report = build_report(run_dir)
    run_dir = Path(run_dir)
    for name, fig in report.figures.items():
        fig.savefig(run_dir / name, dpi=110)
    path = run_dir / REPORT_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report.markdown)
    tmp.replace(path)
    report.path = path
    return report
