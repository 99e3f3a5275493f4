"""The trial page: the recipe drawn, its scores and timings, and its exports."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from evomerge.config import StudyConfig
from evomerge.dashboard.context import Context, context, read_form, study_url
from evomerge.dashboard.drawings import dataflow_svg, heatmap_svg, heatmaps, legend
from evomerge.dashboard.paths import child
from evomerge.recipe import Recipe
from storage import TrialRow, UnknownTrialError

router = APIRouter()
Ctx = Annotated[Context, Depends(context)]
NOTES = {
    "export": "Export started: the checkpoint is written by `evomerge export` (see its log).",
    "exists": "That export folder exists already; choose another name.",
}


def load_trial(ctx: Context, study: str, number: int) -> tuple[TrialRow, Recipe]:
    """Trial `number` of `study` and its recipe; UnknownTrialError (404) for any number the
    store has not (one past SQL's integers too)."""
    row = ctx.store.trial(study, number) if 0 <= number < 1 << 63 else None
    if row is None:
        raise UnknownTrialError(f"study {study!r} has no trial {number}")
    return row, Recipe.from_json(row.recipe_json)


def recipe_values(recipe: Recipe) -> dict[str, Any]:
    """The drawings of a recipe, for `recipe.html`."""
    maps = [(hm, heatmap_svg(recipe, hm), legend(hm)) for hm in heatmaps(recipe)]
    flow = dataflow_svg(recipe.dataflow) if recipe.dataflow is not None else None
    return {"recipe": recipe, "heatmaps": maps, "dataflow": flow}


def metric_rows(row: TrialRow) -> list[tuple[str, float | None, float | None]]:
    """(task, search-split value, held-out value) for every task either split scored."""
    search, heldout = row.metrics or {}, row.heldout_metrics or {}
    return [(t, search.get(t), heldout.get(t)) for t in sorted({*search, *heldout})]


def export_name(study: str, number: int) -> str:
    return f"trial-{number}-{study}"


@router.get("/studies/{study}/trials/{number}")
def trial_page(request: Request, ctx: Ctx, study: str, number: int, note: str = "") -> Response:
    row, recipe = load_trial(ctx, study, number)
    folder = export_name(study, number)
    return ctx.render(
        request,
        "trial.html",
        row=row,
        metrics=metric_rows(row),
        export_folder=folder,
        exported=child(ctx.export_dir, folder).is_dir(),
        export_dir=ctx.export_dir,
        note=NOTES.get(note),
        **recipe_values(recipe),
    )


def _download(body: str, filename: str, media_type: str) -> Response:
    return Response(
        body,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/studies/{study}/trials/{number}/recipe.json")
def recipe_json(ctx: Ctx, study: str, number: int) -> Response:
    _, recipe = load_trial(ctx, study, number)
    body = json.dumps(json.loads(recipe.to_json()), indent=2) + "\n"
    return _download(body, f"{export_name(study, number)}.json", "application/json")


def source_paths(config: StudyConfig) -> dict[str, str]:
    """Where a study's models are, resolved as its workers resolve them."""
    return {ref: str(path) for ref, path in config.model_paths().items()}


@router.get("/studies/{study}/trials/{number}/mergekit.yaml")
def mergekit(request: Request, ctx: Ctx, study: str, number: int) -> Response:
    """The mergekit config of a recipe (a route's: passthrough), with the study's paths."""
    from evomerge.export import recipe_yaml

    _, recipe = load_trial(ctx, study, number)
    try:
        config = StudyConfig.from_yaml(ctx.store.get_study(study).config_yaml)
        text = recipe_yaml(recipe, source_paths(config))
    except (ValueError, OSError) as e:
        message = f"no mergekit config for trial {number}: {e}"
        return ctx.render(request, "error.html", 409, status=409, message=message)
    return _download(text, f"{export_name(study, number)}.yaml", "application/yaml")


@router.post("/studies/{study}/trials/{number}/export")
async def export(request: Request, ctx: Ctx, study: str, number: int) -> Response:
    """Build the trial's HF checkpoint under the export folder, via `evomerge export`."""
    load_trial(ctx, study, number)
    form = await read_form(request)
    out = child(ctx.export_dir, form.get("folder") or export_name(study, number))
    note = "exists" if out.exists() else "export"
    if note == "export":
        ctx.export_dir.mkdir(parents=True, exist_ok=True)
        ctx.launcher.export(study, number, out)
    return RedirectResponse(study_url(study, f"/trials/{number}", note=note), 303)
