"""Pages of studies: the list, New study, one study (live), and its Stop/Cancel/Resume."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from evomerge.chain import first_stage, later_stages
from evomerge.config import ConfigError, StudyConfig
from evomerge.dashboard.configform import FieldError, check_config, preflight_errors
from evomerge.dashboard.context import Context, context, read_form, study_url
from evomerge.dashboard.launch import tail
from evomerge.dashboard.paths import child
from evomerge.dashboard.progress import charts, latest_generations
from evomerge.dashboard.queries import SORTABLE
from storage import StudySummary, UnknownStudyError

router = APIRouter()
Ctx = Annotated[Context, Depends(context)]
PAGE_SIZE = 25
# Short notes a redirect may show; the query string picks one, never supplies its text.
NOTES = {
    "started": "Study started: the coordinator runs as its own process.",
    "stop": "Stop requested: running trials finish, then the run ends.",
    "cancel": "Cancel requested: running trials are abandoned and re-asked on resume.",
    "resumed": "Resume started: the coordinator runs as its own process.",
    "busy": "The study has a live run; stop it before resuming.",
}


@router.get("/")
def index(request: Request, ctx: Ctx) -> Response:
    rows = ctx.store.list_studies(stale_after_s=ctx.stale_after_s)
    return ctx.render(request, "studies.html", studies=rows)


def _configs(ctx: Context) -> list[str]:
    if not ctx.configs_dir.is_dir():
        return []
    return sorted(p.name for p in ctx.configs_dir.iterdir() if p.suffix in (".yaml", ".yml"))


@router.get("/new")
def new_form(request: Request, ctx: Ctx, config: str | None = None) -> Response:
    configs = _configs(ctx)
    if config is None:  # "" is the form's own "(paste your own)"
        config = "demo.yaml" if "demo.yaml" in configs else ""
    if config and config not in configs:
        message = f"no config {config!r} in {ctx.configs_dir} (there: {', '.join(configs)})"
        return ctx.render(request, "error.html", 404, status=404, message=message)
    chosen = config or None
    text = child(ctx.configs_dir, config).read_text() if config else ""
    return ctx.render(
        request, "new.html", configs=configs, chosen=chosen, text=text, name="", errors=[]
    )


@router.post("/new")
async def new_submit(request: Request, ctx: Ctx) -> Response:
    form = await read_form(request)
    text, name = form.get("yaml", ""), form.get("name", "")
    # Parsing, reading model files and asking Ray take time: never on the event loop.
    config, errors = await run_in_threadpool(
        check_config, text, name, ctx.model_roots, ctx.ray_address
    )
    if config is not None and ctx.store.get_study(config.name, missing_ok=True) is not None:
        errors = [FieldError("name", f"a study named {config.name!r} exists; pick another", None)]
    if config is not None and not errors:
        errors = await run_in_threadpool(preflight_errors, config, text, ctx.launcher.storage_url)
    if config is None or errors:
        return ctx.render(
            request,
            "new.html",
            422,
            configs=_configs(ctx),
            chosen=form.get("config"),
            text=text,
            name=name,
            errors=errors,
        )
    ctx.launcher.start(config)
    return RedirectResponse(study_url(config.name, note="started"), 303)


def _summary(ctx: Context, name: str) -> StudySummary:
    for row in ctx.store.list_studies(stale_after_s=ctx.stale_after_s):
        if row.name == name:
            return row
    raise UnknownStudyError(f"no study named {name!r}")


@dataclass(frozen=True)
class TableState:
    """Sort and page of the trials table, from the query string."""

    sort: str
    desc: bool
    page: int

    def link(self, **change: Any) -> str:
        state = {"sort": self.sort, "desc": int(self.desc), "page": self.page} | change
        return "?" + "&".join(f"{k}={v}" for k, v in state.items())

    def sort_link(self, column: str) -> str:
        desc = not self.desc if column == self.sort else column != "number"
        return self.link(sort=column, desc=int(desc), page=1)


def _study_values(ctx: Context, name: str, table: TableState) -> dict[str, Any]:
    """Everything the live part of a study page shows."""
    summary = _summary(ctx, name)
    info = ctx.store.get_study(name)
    config_error = None
    try:
        config: StudyConfig | None = StudyConfig.from_yaml(info.config_yaml)
    except ConfigError as e:  # stored by another version of evomerge: say so, show the rest
        config, config_error = None, str(e)
    first = first_stage(ctx.store, name)
    later = later_stages(ctx.store, config) if config else []
    points = ctx.queries.points(name)
    pages = max(1, math.ceil(len(points) / PAGE_SIZE))
    page = min(table.page, pages)
    gens = latest_generations(points)
    population = config.optimizer.population if config else None
    if population is None and len(gens) > 1:
        population = gens[1].done + gens[1].running
    return {
        "study": summary,
        "config": config,
        "config_error": config_error,
        "first_stage": first,
        "later_stages": later,
        "runs": ctx.store.runs(name)[::-1],
        "logs": [p.name for p in ctx.launcher.logs(name)],
        "generation": gens[0] if gens else None,
        "population": population,
        "trials": ctx.queries.page(
            name,
            sort=table.sort,
            descending=table.desc,
            offset=(page - 1) * PAGE_SIZE,
            limit=PAGE_SIZE,
        ),
        "table": TableState(table.sort, table.desc, page),
        "pages": pages,
        "total": len(points),
        "complete": sum(p.state == "COMPLETE" for p in points),
        "failed": sum(p.state == "FAIL" and not p.reasked for p in points),
        "columns": SORTABLE,
        **charts(points),
    }


def _table_state(
    sort: Annotated[str, Query(pattern=f"^({'|'.join(SORTABLE)})$")] = "number",
    desc: bool = True,
    page: Annotated[int, Query(ge=1)] = 1,
) -> TableState:
    return TableState(sort, desc, page)


Table = Annotated[TableState, Depends(_table_state)]


@router.get("/studies/{name}")
def study_page(request: Request, ctx: Ctx, name: str, table: Table, note: str = "") -> Response:
    if ctx.store.get_study(name, missing_ok=True) is None:
        logs = ctx.launcher.logs(name)
        if not logs:
            raise UnknownStudyError(f"no study named {name!r}")
        return ctx.render(request, "starting.html", name=name, log=tail(logs[0]))
    values = _study_values(ctx, name, table)
    return ctx.render(request, "study.html", note=NOTES.get(note), **values)


@router.get("/studies/{name}/live")
def study_live(request: Request, ctx: Ctx, name: str, table: Table) -> Response:
    return ctx.render(request, "study_live.html", **_study_values(ctx, name, table))


@router.post("/studies/{name}/{action}")
def study_action(
    ctx: Ctx, name: str, action: Literal["stop", "cancel", "resume"], table: Table
) -> Response:
    """Stop, Cancel and Resume with the CLI's semantics (a stop request the run polls); back
    to the page as it was sorted."""
    note = action
    if action == "resume":
        note = "busy" if _summary(ctx, name).status == "running" else "resumed"
        if note == "resumed":
            ctx.launcher.resume(name)
    else:
        ctx.store.request_stop(name, action)
    state = {"sort": table.sort, "desc": int(table.desc), "page": table.page}
    return RedirectResponse(study_url(name, **state, note=note), 303)


@router.get("/studies/{name}/logs/{file}")
def study_log(ctx: Ctx, name: str, file: str) -> Response:
    """The end of a log of a command started from the dashboard."""
    path = child(ctx.launcher.folder(name), file)
    if path.suffix != ".log" or not path.is_file():
        return PlainTextResponse("no such log", 404)
    return PlainTextResponse(tail(path, 262_144))
