"""Build a run's report from what the run itself wrote: summary.json, metrics.csv, energy.csv and
the per-node CodeCarbon files, plus the evaluations stored in it (orchestra-eval's
``eval/<name>/eval.json``, orchestra-eval compare's ``compare.json``, the in-training
evaluation's ``eval/...`` metrics and ``early_stopping.json``). No W&B needed, so it works
offline, on a cluster login node and for a run that crashed before its summary (then it says
what is missing).

The report reads those files only, never the code that wrote them: an evaluation file it cannot
read or does not understand gets one line naming it and why, and the rest of the report stands.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from orchestra.report.plots import (
    Series,
    data_figure,
    energy_figure,
    eval_figure,
    loss_figure,
    throughput_figure,
)

REPORT_NAME = "report.md"
J_PER_KWH = 3.6e6
# The files orchestra-eval and the in-training evaluation write into a run dir (their layout, read
# here by name only: the report never imports orchestra.eval).
EVAL_DIR = "eval"
EVAL_FILE = "eval.json"
EVAL_FORMAT = 1
COMPARE_FILE = "compare.json"
EARLY_STOPPING_FILE = "early_stopping.json"
EVAL_COLUMN_PREFIX = "eval/"
DATASET_MANIFEST = "manifest.json"  # a prepared dataset's (orchestra/data/shards.py), read by name
DATA_CARD = "datacard.md"
COMPARISON_KEYS = ("task", "metric", "a", "b", "difference", "ci_low", "ci_high", "p_value", "n", "verdict")


class ReportError(ValueError):
    """A run dir the report cannot be built from; the message names the missing file."""


@dataclass
class EvalData:
    """The evaluation files of a run dir, each as (path relative to the run dir, parsed JSON)."""

    evaluations: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # eval/*/eval.json
    comparisons: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # compare.json files
    early_stopping: tuple[str, dict[str, Any]] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was skipped)

    def __bool__(self) -> bool:
        return bool(self.evaluations or self.comparisons or self.early_stopping or self.skipped)


@dataclass
class RunData:
    run_dir: Path
    summary: dict[str, Any]
    metrics: list[dict[str, float]]
    energy: list[dict[str, float]]
    nodes: list[dict[str, str]]  # one row per node and tracker run, from emissions/emissions-node*.csv
    evaluation: EvalData = field(default_factory=EvalData)


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
        evaluation=load_evaluation(run_dir),
    )


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None), or (None, why the file could not be read)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"cannot be read ({type(err).__name__}: {err})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"is not valid JSON ({err})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _eval_problem(doc: Any) -> str | None:
    """Why an eval.json cannot be reported, or None when it has the shape orchestra-eval writes."""
    if not isinstance(doc, dict):
        return f"is not an orchestra-eval result (a JSON {type(doc).__name__}, not an object)"
    if doc.get("format") != EVAL_FORMAT:
        return f"has results format {doc.get('format')!r}; this report reads format {EVAL_FORMAT}"
    tasks = doc.get("tasks")
    if not isinstance(tasks, dict):
        return "has no `tasks` object"
    for name, task in tasks.items():
        if not isinstance(task, dict) or not isinstance(task.get("metrics"), dict):
            return f"has a task {name!r} without a `metrics` object"
    if not isinstance(doc.get("model", {}), dict):
        return "has a `model` that is not an object"
    return None


def _compare_problem(doc: Any) -> str | None:
    """Why a compare.json cannot be reported, or None when it has the shape orchestra-eval writes."""
    if not isinstance(doc, dict) or not isinstance(doc.get("comparisons"), list):
        return "is not an orchestra-eval comparison (no `comparisons` list)"
    for i, row in enumerate(doc["comparisons"]):
        missing = [k for k in COMPARISON_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            return f"has comparison {i} without {', '.join(missing)}"
        bad = [k for k in ("a", "b", "difference", "ci_low", "ci_high", "p_value") if not _is_number(row[k])]
        if bad:
            return f"has comparison {i} with non-numeric {', '.join(bad)}"
    return None


def _early_stopping_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict) or "monitor" not in doc:
        return "is not an early-stopping record (no `monitor`)"
    return None


def load_evaluation(run_dir: Path) -> EvalData:
    """Every evaluation file of the run dir; a damaged one goes to ``skipped`` with the reason."""
    run_dir = Path(run_dir)
    data = EvalData()

    def read(path: Path, problem: Callable[[Any], str | None]) -> tuple[str, dict[str, Any]] | None:
        rel = path.relative_to(run_dir).as_posix()
        doc, why = _read_json(path)
        why = why or problem(doc)
        if why is not None:
            data.skipped.append((rel, why))
            return None
        return rel, doc

    eval_dir = run_dir / EVAL_DIR
    folders = sorted(p for p in eval_dir.iterdir() if p.is_dir()) if eval_dir.is_dir() else []
    for folder in folders:
        if (folder / EVAL_FILE).exists() and (found := read(folder / EVAL_FILE, _eval_problem)):
            data.evaluations.append(found)
    compare_paths = [f / COMPARE_FILE for f in folders]
    compare_paths += sorted(p / COMPARE_FILE for p in run_dir.glob("compare*") if p.is_dir())
    for path in compare_paths:
        if path.exists() and (found := read(path, _compare_problem)):
            data.comparisons.append(found)
    if (run_dir / EARLY_STOPPING_FILE).exists():
        data.early_stopping = read(run_dir / EARLY_STOPPING_FILE, _early_stopping_problem)
    return data


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


def _cell(value: Any) -> str:
    """A markdown table cell: numbers to 4 significant digits, pipes and newlines escaped."""
    text = _fmt(value) if not isinstance(value, bool) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _quote(text: str) -> list[str]:
    return [f"> {ln}".rstrip() for ln in text.strip().splitlines()]


def _confusion(details: dict[str, Any]) -> list[str]:
    """details.confusion_matrix (row = true class, column = predicted) with details.labels, if well-formed."""
    labels, matrix = details.get("labels"), details.get("confusion_matrix")
    if not isinstance(labels, list) or not isinstance(matrix, list) or len(matrix) != len(labels):
        return []
    if not all(isinstance(row, list) and len(row) == len(labels) for row in matrix):
        return []
    names = [_cell(label) for label in labels]
    lines = ["| true \\ predicted | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [
        f"| {name} | " + " | ".join(_cell(v) for v in row) + " |"
        for name, row in zip(names, matrix, strict=True)
    ]
    return lines


def _evaluation(rel: str, doc: dict[str, Any]) -> list[str]:
    """One orchestra-eval folder: who was evaluated and when, then task | metric | value."""
    model = doc.get("model") or {}
    tasks: dict[str, Any] = doc["tasks"]
    folder = rel.rsplit("/", 1)[0]
    lines = [f"### `{folder}`", ""]
    source = f"`{model['source']}`" if model.get("source") else "—"
    lines.append(f"Model {source} ({_fmt(model.get('kind'))}), evaluated {_fmt(doc.get('created'))}.")
    if tasks:
        lines.append(
            "Examples per task: "
            + ", ".join(f"{_cell(name)} {_fmt(task.get('n'), ',')}" for name, task in tasks.items())
            + "."
        )
    lines.append("")
    rows = [(name, m, v) for name, task in tasks.items() for m, v in task["metrics"].items()]
    if not rows:
        return [*lines, "This evaluation holds no metrics.", ""]
    lines += ["| task | metric | value |", "|---|---|---|"]
    lines += [f"| {_cell(t)} | {_cell(m)} | {_cell(v)} |" for t, m, v in rows]
    lines.append("")
    for name, task in tasks.items():
        details = task.get("details")
        if not isinstance(details, dict):
            continue
        if isinstance(details.get("measures"), str) and details["measures"].strip():
            lines += [f"What `{name}` measures:", "", *_quote(details["measures"]), ""]
        confusion = _confusion(details)
        if confusion:
            lines += [f"Confusion matrix of `{name}` (rows: true class, columns: predicted):", ""]
            lines += [*confusion, ""]
    return lines


def _comparison(rel: str, doc: dict[str, Any]) -> list[str]:
    """One compare.json as a verdict table (difference = b - a, with its confidence interval)."""
    alpha = doc.get("alpha")
    level = f"{1 - alpha:.0%} CI" if isinstance(alpha, float) and 0 < alpha < 1 else "CI"
    lines = [
        f"### `{rel}`",
        "",
        f"b = `{_fmt(doc.get('b'))}` vs a = `{_fmt(doc.get('a'))}`, alpha = {_fmt(alpha)}; "
        "difference = b − a, paired by example.",
        "",
    ]
    if not doc["comparisons"]:
        return [*lines, "No paired metric to compare.", ""]
    lines += [
        f"| task | metric | a | b | b − a | {level} | p | test | n | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["comparisons"]:
        metric = _cell(c["metric"]) + (" (lower is better)" if c.get("higher_is_better") is False else "")
        lines.append(
            f"| {_cell(c['task'])} | {metric} | {c['a']:.4g} | {c['b']:.4g} | {c['difference']:+.4g} | "
            f"[{c['ci_low']:+.3g}, {c['ci_high']:+.3g}] | {c['p_value']:.3g} | {_cell(c.get('test'))} | "
            f"{_cell(c['n'])} | {_cell(c['verdict'])} |"
        )
    lines.append("")
    return lines


def _early_stopping(doc: dict[str, Any]) -> list[str]:
    stopped = doc.get("stopped_step")
    best, best_step = doc.get("best"), doc.get("best_step")
    outcome = (
        f"stopped early at step {_fmt(stopped, ',')}"
        if stopped is not None
        else "did not stop early (training ran to its end)"
    )
    mode = f" ({_cell(doc['mode'])})" if doc.get("mode") else ""
    rows = [
        ("monitor", f"`{_cell(doc.get('monitor'))}`{mode}"),
        ("patience", f"{doc['patience']} checks" if _is_number(doc.get("patience")) else "—"),
        ("best", f"{_cell(best)} at step {_fmt(best_step, ',')}" if best is not None else "—"),
        ("outcome", outcome),
    ]
    return ["Early stopping (`early_stopping.json`):", "", *_table(rows), ""]


def eval_columns(run: RunData) -> list[str]:
    """The metrics.csv columns the in-training evaluation logged (``eval/<task>/<metric>``)."""
    return sorted({k for row in run.metrics for k in row if k.startswith(EVAL_COLUMN_PREFIX)})


def _evaluation_section(run: RunData, has_figure: bool) -> list[str]:
    """The report's "Evaluation" section; nothing at all for a run dir without any evaluation."""
    data = run.evaluation
    if not data and not has_figure:
        return []
    lines = ["## Evaluation", ""]
    if has_figure or data.early_stopping:
        lines += ["### During training", ""]
        if has_figure:
            lines += [
                "What the evaluation callback logged to metrics.csv (`eval/<task>/<metric>`), by step:",
                "",
                "![evaluation during training](eval.png)",
                "",
            ]
        if data.early_stopping:
            lines += _early_stopping(data.early_stopping[1])
    for rel, doc in data.evaluations:
        lines += _guarded(rel, doc, _evaluation, data)
    for rel, doc in data.comparisons:
        lines += _guarded(rel, doc, _comparison, data)
    for rel, why in data.skipped:
        lines.append(f"- skipped `{rel}`: it {why}")
    if data.skipped:
        lines.append("")
    return lines


def _data_section(run: RunData) -> tuple[list[str], Figure | None]:
    """The "Data" section: what the dataset's preparation pipeline removed, from its manifest.

    Nothing for a run whose summary names no dataset or whose dataset was prepared without a
    pipeline; one line when the manifest named in summary.json cannot be read.
    """
    dataset = run.summary.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        return [], None
    path = Path(dataset) / DATASET_MANIFEST
    manifest, problem = _read_json(path)
    if problem is not None or not isinstance(manifest, dict):
        return ["## Data", "", f"- the dataset's manifest `{path}` {problem or 'is not an object'}", ""], None
    pipeline = manifest.get("pipeline")
    if not isinstance(pipeline, dict):
        return [], None
    try:
        dropped = {str(k): int(v) for k, v in (pipeline.get("dropped") or {}).items()}
        stages = [
            (str(st["name"]), int(st["documents_in"]), int(st["documents_out"]))
            for st in pipeline.get("stages") or []
            if isinstance(st, dict) and "documents_in" in st and "documents_out" in st
        ]
        kept = int(pipeline.get("kept_documents", 0))
    except (TypeError, ValueError, KeyError) as err:
        return ["## Data", "", f"- the pipeline record of `{path}` has unexpected content ({err})", ""], None
    read = sum(
        int(c.get("documents", 0)) for c in (pipeline.get("ingest") or {}).values() if isinstance(c, dict)
    )
    lines = ["## Data", ""]
    lines += _table(
        [
            ("dataset", f"`{Path(dataset).resolve()}`"),
            ("documents read / kept", f"{read:,} / {kept:,}"),
            ("removed", f"{sum(dropped.values()):,}"),
            ("pipeline settings sha256", f"`{str(pipeline.get('config_sha256', ''))[:16]}`"),
            ("PII backend", str(pipeline.get("pii_backend", "—"))),
        ]
    )
    if dropped:
        lines += ["", "| removed because | documents |", "|---|---|"]
        lines += [f"| `{k}` | {v:,} |" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])]
    lines += ["", "![data preparation](data.png)", ""]
    card = Path(dataset) / DATA_CARD
    if card.is_file():
        lines += [f"The dataset's data card: `{card.resolve()}`.", ""]
    return lines, data_figure(dropped, stages)


def _guarded(
    rel: str, doc: dict[str, Any], render: Callable[[str, dict[str, Any]], list[str]], data: EvalData
) -> list[str]:
    """render(rel, doc), or nothing (and a skip line) when the file's content surprises it."""
    try:
        lines = render(rel, doc)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        data.skipped.append((rel, f"has unexpected content ({type(err).__name__}: {err})"))
        return []
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
    eval_series = {k: metric_series(run.metrics, k) for k in eval_columns(run)}
    eval_series = {k: v for k, v in eval_series.items() if v[0]}
    if eval_series:
        series.update(eval_series)
        figures["eval.png"] = eval_figure(eval_series)

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
    lines += _evaluation_section(run, "eval.png" in figures)
    data_lines, data_fig = _data_section(run)
    lines += data_lines
    if data_fig is not None:
        figures["data.png"] = data_fig
    lines += [
        "## Files",
        "",
        "- `metrics.csv`: every logged metric (train/, val/, perf/, energy/, system/) by step",
        "- `energy.csv`: job-wide energy readings at each logging step (time, step, kwh, kg_co2eq, power_w)",
        "- `emissions/emissions-node<k>.csv`: each node's CodeCarbon record",
        "- `summary.json`: the run's final numbers",
    ]
    ev = run.evaluation
    if ev.evaluations:
        lines.append(
            "- `eval/<name>/`: orchestra-eval results (`eval.json`, one record per example in `samples/<task>.jsonl`)"
        )
    if ev.comparisons:
        lines.append("- `compare.json`: orchestra-eval compare's paired tests of two evaluations")
    if ev.early_stopping:
        lines.append("- `early_stopping.json`: the in-training evaluation's early-stopping outcome")
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
