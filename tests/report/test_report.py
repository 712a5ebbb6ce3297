"""`orchestra-report` on a real tiny run: PNGs are written and every plotted point is the CSV's."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from orchestra.cli.report import main
from orchestra.report import build_report, write_report
from tests.report.conftest import LOG_EVERY, STEPS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    """(Lightning's 0-based step, value) of one metrics.csv column, as written."""
    points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [p[0] for p in points], [p[1] for p in points]


def line(fig: Figure, label: str) -> tuple[list[float], list[float]]:
    """The data of the line with this legend label, read back from the matplotlib figure."""
    found = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == label]
    assert len(found) == 1, label
    return list(found[0].get_xdata()), list(found[0].get_ydata())


def test_report_plots_exactly_what_the_run_wrote(observed_run: Path) -> None:
    report = write_report(observed_run)
    assert report.path == observed_run / "report.md"
    for name in ("loss.png", "throughput.png", "energy.png"):
        data = (observed_run / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name

    summary = json.loads((observed_run / "summary.json").read_text())
    tokens_per_step = summary["tokens"] / summary["steps"]
    metrics = csv_rows(observed_run / "metrics.csv")

    # Loss against tokens seen: step index s has completed s + 1 optimizer steps.
    steps, loss = column(metrics, "train/loss")
    assert steps == list(range(LOG_EVERY - 1, STEPS, LOG_EVERY))
    assert line(report.figures["loss.png"], "train/loss") == (
        [(s + 1) * tokens_per_step for s in steps],
        loss,
    )
    val_steps, val = column(metrics, "val/loss")
    assert len(val) == 2
    assert line(report.figures["loss.png"], "val/loss") == (
        [(s + 1) * tokens_per_step for s in val_steps],
        val,
    )

    # Throughput and MFU (in %) against optimizer steps.
    steps, tps = column(metrics, "perf/tokens_per_s")
    assert line(report.figures["throughput.png"], "perf/tokens_per_s") == ([s + 1 for s in steps], tps)
    steps, mfu = column(metrics, "perf/mfu")
    assert mfu and line(report.figures["throughput.png"], "perf/mfu") == (
        [s + 1 for s in steps],
        [100 * v for v in mfu],
    )

    # Power and cumulative energy against wall time, straight from energy.csv.
    energy = csv_rows(observed_run / "energy.csv")
    origin = float(energy[0]["time"]) - float(energy[0]["elapsed_s"])
    minutes = [(float(r["time"]) - origin) / 60 for r in energy]
    assert line(report.figures["energy.png"], "energy/power_w") == (
        minutes,
        [float(r["power_w"]) for r in energy],
    )
    assert line(report.figures["energy.png"], "energy/kwh") == (minutes, [float(r["kwh"]) for r in energy])

    # The run's totals: energy.csv's last row is the summary; one node, so its CodeCarbon file agrees.
    assert float(energy[-1]["kwh"]) == summary["energy_kwh"] > 0
    assert float(energy[-1]["kg_co2eq"]) == summary["co2_kg"] > 0
    node = csv_rows(observed_run / "emissions" / "emissions-node0.csv")
    assert len(node) == 1 and float(node[0]["energy_consumed"]) == pytest.approx(
        summary["energy_kwh"], rel=1e-9
    )

    md = (observed_run / "report.md").read_text()
    intensity = summary["co2_kg"] / summary["energy_kwh"]
    assert f"{summary['energy_kwh']:.4g} kWh" in md
    assert f"{summary['co2_kg']:.4g} kg CO2eq" in md
    assert f"{summary['j_per_token']:.4g} J/token" in md
    assert f"{intensity * 1000:.1f} g CO2eq/kWh" in md
    for name in ("loss.png", "throughput.png", "energy.png"):
        assert f"]({name})" in md


def test_report_without_energy_or_summary_still_builds(observed_run: Path, tmp_path: Path) -> None:
    """A crashed run with energy=none: no energy figure, and the report says what is missing."""
    run = tmp_path / "crashed"
    run.mkdir()
    shutil.copy(observed_run / "metrics.csv", run / "metrics.csv")
    report = build_report(run)
    assert set(report.figures) == {"loss.png", "throughput.png"}
    assert "summary.json is missing" in report.markdown
    assert "Energy accounting was off" in report.markdown
    # Without summary.json the tokens per step are unknown: loss is drawn against steps.
    steps, loss = column(csv_rows(run / "metrics.csv"), "train/loss")
    assert line(report.figures["loss.png"], "train/loss") == ([s + 1 for s in steps], loss)


def test_cli_writes_the_report_and_names_a_bad_run_dir(
    observed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main([str(observed_run)])
    assert str(observed_run / "report.md") in capsys.readouterr().out.replace("\n", "")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert "nope does not exist" in capsys.readouterr().out.replace("\n", "")


def _run_dir_as_a_40_step_run_writes_it(run: Path, summary: dict | None) -> None:
    """metrics.csv of `experiment=debug trainer.max_steps=40 energy=none`: train rows every 10 steps
    (0-based steps 9..39), then the final validation's row that trainer.validate logs at step 40."""
    run.mkdir()
    header = ["epoch", "perf/tokens_per_s", "step", "train/grad_norm", "train/loss", "val/loss", "val/ppl"]
    rows = [
        [0, 800.0, s, 1.0, loss, "", ""] for s, loss in ((9, 7.477), (19, 6.563), (29, 5.987), (39, 5.894))
    ]
    rows.append([1, "", 40, "", "", 6.0568, 427.0])
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))


def test_final_train_loss_comes_from_metrics_csv_when_the_summary_lacks_it(tmp_path: Path) -> None:
    """A run whose max_steps is not a multiple of val_every_n_steps: the validation after training
    replaced the train metrics the summary reads, so summary.json has train_loss null."""
    summary = {"steps": 40, "tokens": 163840, "train_loss": None, "val_loss": 6.0568, "val_ppl": 427.0}
    _run_dir_as_a_40_step_run_writes_it(tmp_path / "ux40", summary)
    md = build_report(tmp_path / "ux40").markdown
    assert "| final train loss | 5.894 (metrics.csv, step 40) |" in md
    assert "| final val loss | 6.057 |" in md  # the summary's own value, as it has one

    _run_dir_as_a_40_step_run_writes_it(tmp_path / "crashed", None)  # no summary at all
    md = build_report(tmp_path / "crashed").markdown
    assert "| final train loss | 5.894 (metrics.csv, step 40) |" in md
    assert "| final val loss | 6.057 (metrics.csv, step " in md
    assert "| final val perplexity | 427 (metrics.csv, step " in md


def test_final_train_loss_prefers_the_summary(tmp_path: Path) -> None:
    summary = {"steps": 40, "tokens": 163840, "train_loss": 5.9, "val_loss": None, "val_ppl": None}
    _run_dir_as_a_40_step_run_writes_it(tmp_path / "run", summary)
    md = build_report(tmp_path / "run").markdown
    assert "| final train loss | 5.9 |" in md and "—" not in md.split("## Learning")[1].split("##")[0]
