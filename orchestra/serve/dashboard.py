"""GET /dashboard: the router's A/B page (versions, traffic split, latency, feedback, verdicts).

The page is one self-contained HTML file (inline CSS and JS, no CDN), so it works on a machine
without internet access; it reads /api/stats every few seconds. Every number sits in an element
with ``data-version`` / ``data-field`` attributes and the raw value in ``data-value``, so a test
(or a scraper) reads exactly what the page shows.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

__all__ = ["add_dashboard", "dashboard_html"]

PAGE = "dashboard.html"


@cache
def dashboard_html() -> str:
    """The page as shipped inside the package (read once)."""
    return resources.files("orchestra.serve").joinpath(PAGE).read_text(encoding="utf-8")


def add_dashboard(app: FastAPI, path: str = "/dashboard") -> None:
    """Serve the page at ``path`` on ``app`` (which must answer GET /api/stats)."""

    @app.get(path, response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(dashboard_html(), headers={"cache-control": "no-cache"})
