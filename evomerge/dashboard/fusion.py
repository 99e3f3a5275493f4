"""Fusion jobs (FuseLLM): the list, one job's loss curves and scores, and a start button."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from evomerge.dashboard.charts import line_chart
from evomerge.dashboard.context import Context, context, read_form
from evomerge.dashboard.launch import tail
from evomerge.dashboard.paths import child

router = APIRouter()
Ctx = Annotated[Context, Depends(context)]
FOLDER = "fusion"  # fusion configs live in this folder of the configs directory


def _configs(ctx: Context) -> list[Path]:
    folder = ctx.configs_dir / FOLDER
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


@router.get("/fusion")
def fusion_jobs(request: Request, ctx: Ctx) -> Response:
    listed = ctx.store.list_fusion_jobs(stale_after_s=ctx.stale_after_s)
    jobs = [(job, len(ctx.store.fusion_steps(job.name))) for job in listed]
    configs = [c.name for c in _configs(ctx)]
    return ctx.render(request, "fusion_jobs.html", jobs=jobs, configs=configs)


@router.post("/fusion")
async def start_fusion(request: Request, ctx: Ctx) -> Response:
    """Start (or resume) `evomerge fuse` on a config of the configs directory's fusion/."""
    from evomerge.config import ConfigError
    from evomerge.fusion.job import FusionConfig

    form = await read_form(request)
    path = child(ctx.configs_dir / FOLDER, form.get("config", ""))
    try:
        config = FusionConfig.load(path)
    except ConfigError as e:
        return ctx.render(request, "error.html", 400, status=400, message=str(e))
    ctx.launcher.fuse(config.name, path)
    return RedirectResponse(f"/fusion/{config.name}", 303)


@router.post("/fusion/{name}/stop")
def stop_fusion(ctx: Ctx, name: str) -> Response:
    """Stop a running job as `evomerge stop NAME` does: it resumes from its last checkpoint."""
    ctx.store.request_fusion_stop(name)
    return RedirectResponse(f"/fusion/{quote(name, safe='')}", 303)


@router.get("/fusion/{name}")
def fusion_job(request: Request, ctx: Ctx, name: str) -> Response:
    job = ctx.store.fusion_job(name, stale_after_s=ctx.stale_after_s)
    steps = ctx.store.fusion_steps(name)
    chart = line_chart(
        {key: [(s["step"], s[key]) for s in steps] for key in ("loss", "clm", "fusion")},
        x_label="step",
        title=f"{name}: losses",
    )
    evaluation = job.evaluation or {}
    columns = list(next(iter(evaluation.values()), {}))
    logs = ctx.launcher.logs(name)
    return ctx.render(
        request,
        "fusion_job.html",
        job=job,
        steps=len(steps),
        chart=chart,
        evaluation=evaluation,
        columns=columns,
        log=tail(logs[0]) if logs else None,
    )
