"""Best recipes across studies, and two recipes side by side."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator, Field

from evomerge.dashboard.context import Context, context
from evomerge.dashboard.trials import load_trial, metric_rows, recipe_values
from evomerge.recipe import Recipe
from storage import TrialRow

router = APIRouter()
Ctx = Annotated[Context, Depends(context)]
MAX_TOP = 500


def _blank(value: object) -> object:
    """An empty form field means "no filter"."""
    return None if isinstance(value, str) and not value.strip() else value


Text = Annotated[str | None, BeforeValidator(_blank)]
Number = Annotated[float | None, BeforeValidator(_blank)]


@router.get("/best")
def best_page(
    request: Request,
    ctx: Ctx,
    study: Text = None,
    method: Text = None,
    task: Text = None,
    min_heldout: Number = None,
    by: Literal["fitness", "heldout"] = "fitness",
    top: Annotated[int, Query(ge=1, le=MAX_TOP)] = 20,
) -> Response:
    rows = ctx.store.best(study, top=top, method=method, task=task, min_heldout=min_heldout, by=by)
    filters = {
        "study": study,
        "method": method,
        "task": task,
        "min_heldout": min_heldout,
        "by": by,
        "top": top,
    }
    return ctx.render(
        request,
        "best.html",
        rows=rows,
        summaries=[means(r) for r in rows],
        filters=filters,
        studies=[s.name for s in ctx.store.list_studies()],
    )


def means(row: TrialRow) -> str:
    """A recipe in one line: each parameter's per-source mean over layer groups."""
    summary = Recipe.from_json(row.recipe_json).summary()
    return " · ".join(f"{k} {v}" for k, v in summary.items() if k not in ("method", "hash"))


def _ref(value: str) -> tuple[str, int]:
    study, _, number = value.rpartition(":")
    return study, int(number)


@router.get("/compare")
def compare(
    request: Request,
    ctx: Ctx,
    pick: Annotated[
        list[Annotated[str, Field(pattern=r"^.+:\d+$")]], Query(min_length=2, max_length=2)
    ],
) -> Response:
    """Two trials (`STUDY:NUMBER` each), their scores and recipes side by side."""
    sides = []
    for ref in pick:
        row, recipe = load_trial(ctx, *_ref(ref))
        sides.append(
            {
                "row": row,
                "metrics": dict((t, (s, h)) for t, s, h in metric_rows(row)),
                **recipe_values(recipe),
            }
        )
    tasks = sorted({t for side in sides for t in side["metrics"]})
    return ctx.render(request, "compare.html", sides=sides, tasks=tasks)
