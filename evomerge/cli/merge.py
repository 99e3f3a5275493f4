"""Commands: merge (a recipe file into a Hugging Face checkpoint folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from evomerge.cli.app import app, console, fail


@app.command("merge")
def merge(
    recipe: Annotated[Path, typer.Argument(help="recipe JSON file")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint folder to write")],
    mergekit_yaml: Annotated[
        Path | None, typer.Option("--mergekit-yaml", help="also write the mergekit config here")
    ] = None,
    scores: Annotated[
        Path | None, typer.Option("--scores", help="JSON object of known scores for the card")
    ] = None,
    zoo_dir: Annotated[
        Path | None, typer.Option("--zoo-dir", help="toy zoo folder that zoo: refs name")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="where to build")] = "cpu",
) -> None:
    """Build RECIPE into a checkpoint folder: safetensors, config, tokenizer, model card."""
    from evomerge.export import export_recipe
    from evomerge.recipe import Recipe

    try:
        parsed = Recipe.load(recipe)
        known = json.loads(scores.read_text()) if scores else None
        if known is not None and not isinstance(known, dict):
            raise ValueError(f"{scores}: scores must be a JSON object")
        export_recipe(parsed, None, out, known, mergekit_yaml, zoo_dir=zoo_dir, device=device)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise fail(str(e), 2) from e
    console.print(f"wrote {recipe.name} ({parsed.method}) to {out}")
    if mergekit_yaml:
        console.print(f"mergekit config: {mergekit_yaml}")
