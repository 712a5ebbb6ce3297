"""Shared CLI plumbing: where conf/ is, turning Hydra/OmegaConf failures into one clear line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _conf_dir() -> str:
    """conf/ of the source tree (editable installs), else the copy a wheel ships as orchestra/conf."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"Hydra configs not found next to {package} (looked for conf/config.yaml)")


CONF_DIR = _conf_dir()
console = Console()


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit without a traceback."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def table(title: str, rows: dict[str, Any]) -> Table:
    tab = Table(title=title, show_header=False, title_justify="left")
    tab.add_column("key", style="bold")
    tab.add_column("value")
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        tab.add_row(key, "-" if value is None else str(value))
    return tab
