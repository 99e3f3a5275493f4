"""A study's models compared by weight similarity (Model-GLUE's clustering), as a heatmap."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from evomerge.config import StudyConfig
from evomerge.dashboard.context import Context, context
from evomerge.dashboard.drawings import similarity_svg

router = APIRouter()
Ctx = Annotated[Context, Depends(context)]


@lru_cache(maxsize=32)
def _analysis(models: tuple[tuple[str, Path], ...], threshold: float):
    """One analysis per set of folders and threshold for the dashboard's life: it reads
    every model's layer weights once (minutes for 7B models)."""
    from evomerge.glue.kinship import analyse

    return analyse(dict(models), threshold)


@router.get("/studies/{name}/similarity")
def similarity_page(
    request: Request,
    ctx: Ctx,
    name: str,
    threshold: Annotated[float, Query(gt=0, le=1)] = 0.95,
) -> Response:
    """The base and sources of study `name` (and its PS+DFS model B), clustered."""
    row = ctx.store.get_study(name)
    try:
        config = StudyConfig.from_yaml(row.config_yaml, source=f"study {name!r}")
    except ValueError as e:  # a config this version cannot read (ConfigError)
        return ctx.render(request, "error.html", 409, status=409, message=str(e))
    try:
        result = _analysis(tuple(config.model_paths().items()), threshold)
    except (OSError, ValueError) as e:
        return ctx.render(request, "error.html", 400, status=400, message=str(e))
    return ctx.render(
        request,
        "similarity.html",
        name=name,
        result=result,
        svg=similarity_svg(result),
        apart=result.apart(),
    )
