"""`orchestra-report`: a run's report (markdown + PNG figures) from the files the run wrote."""

from orchestra.report.build import Report, ReportError, build_report, load_run, write_report

__all__ = ["Report", "ReportError", "build_report", "load_run", "write_report"]
