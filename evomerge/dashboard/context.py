"""What every route shares: the `Context` built once per app, templates and form parsing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from fastapi import Request
from fastapi.responses import Response
from fastapi.templating import Jinja2Templates

from evomerge.dashboard.launch import Launcher
from evomerge.dashboard.queries import Queries
from storage import Store

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Context:
    """Everything a route needs, built once per app."""

    store: Store
    queries: Queries
    launcher: Launcher
    templates: Jinja2Templates
    model_roots: tuple[Path, ...]
    export_dir: Path
    configs_dir: Path
    stale_after_s: float
    ray_address: str | None  # the one Ray cluster a study started here may name

    def render(
        self, request: Request, template: str, status_code: int = 200, /, **values: Any
    ) -> Response:
        return self.templates.TemplateResponse(request, template, values, status_code=status_code)


def context(request: Request) -> Context:
    """FastAPI dependency: the app's `Context`."""
    return request.app.state.ctx


async def read_form(request: Request) -> dict[str, str]:
    """An url-encoded form body (the Guard has already capped its size)."""
    body = (await request.body()).decode("utf-8", "replace")
    return dict(parse_qsl(body, keep_blank_values=True))


def ago(when: datetime | None) -> str:
    """`12 s ago`, `3 min ago`, ...: how long since `when`."""
    if when is None:
        return "-"
    seconds = (datetime.now(UTC) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{max(seconds, 0):.0f} s ago"


def num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def study_url(name: str, suffix: str = "", **query: object) -> str:
    """The path of a study's page (or of `suffix` below it), the name quoted."""
    url = f"/studies/{quote(name, safe='')}{suffix}"
    return url + (f"?{urlencode(query)}" if query else "")


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(ago=ago, num=num)
    templates.env.globals["study_url"] = study_url
    templates.env.globals["zip"] = zip
    return templates
