"""Shared CLI plumbing: where conf/ is, turning Hydra/OmegaConf failures into one clear line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
console = Console()


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit without a traceback."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def run_guarded(fn: Callable[[], Any], known: tuple[type[BaseException], ...]) -> Any:
    try:
        return fn()
    except known as err:
        fail(str(err))


def table(title: str, rows: dict[str, Any]) -> Table:
    tab = Table(title=title, show_header=False, title_justify="left")
    tab.add_column("key", style="bold")
    tab.add_column("value")
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        tab.add_row(key, "-" if value is None else str(value))
    return tab
