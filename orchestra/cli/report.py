"""`orchestra-report RUN_DIR`: write RUN_DIR/report.md with loss, throughput and energy plots;
given a study's folder (orchestra-train -m sweep=...), the study's report and Optuna's plots.

Examples::

    orchestra-report runs/default/2026-01-01_12-00-00
    python -m orchestra.cli.report runs/llama-1b/123456      # a SLURM job's run dir
    orchestra-report sweeps/lr                                # a study: history, importances, Pareto front
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestra.cli.common import console, fail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="orchestra-report",
        description="Build report.md and PNG plots from a run dir's own metrics (no W&B needed).",
    )
    parser.add_argument(
        "run_dir",
        type=Path,
        help="the run dir (holds summary.json, metrics.csv, energy.csv) or a study's folder (study.json)",
    )
    args = parser.parse_args(argv)
    from orchestra.sweep.report import StudyReportError, is_study_dir, write_study_report

    if is_study_dir(args.run_dir):
        try:
            path, files = write_study_report(args.run_dir)
        except StudyReportError as err:
            fail(str(err))
            return
        console.print(f"report: {path}")
        for name in files:
            console.print(f"figure: {args.run_dir / name}")
        return
    # Imported after parsing so `--help` stays fast (matplotlib takes a moment to load).
    from orchestra.report import ReportError, write_report

    try:
        report = write_report(args.run_dir)
    except ReportError as err:
        fail(str(err))
        return
    console.print(f"report: {report.path}")
    for name in report.figures:
        console.print(f"figure: {args.run_dir / name}")


if __name__ == "__main__":
    main()
