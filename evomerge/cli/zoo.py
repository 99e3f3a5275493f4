"""Commands: `evomerge zoo build`, which trains (or finds) the toy zoo and prints its table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from evomerge.cli.app import app, console, fail

zoo_app = typer.Typer(help="The toy model zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


def zoo_table(manifest: dict[str, Any]) -> Table:
    """Held-out metrics of the zoo's models, with the mean over the experts' skills."""
    from evomerge.zoo.build import model_names

    table_data = manifest["held_out"]
    tasks = list(next(iter(table_data.values())))
    skills = list(manifest["experts"].values())
    table = Table(
        "model",
        *tasks,
        "skills mean",
        title=f"zoo {manifest['size']} ({manifest['version']}), held-out split",
        caption="text is perplexity (lower is better); the rest are accuracies",
    )
    for name in model_names(manifest):
        row = table_data[name]
        mean = sum(row[s] for s in skills) / len(skills)
        table.add_row(name, *(f"{row[t]:.3f}" for t in tasks), f"{mean:.3f}")
    return table


@zoo_app.command("build")
def build(
    size: Annotated[
        Literal["demo", "test"], typer.Option("--size", help="demo, or test (smaller, faster)")
    ] = "demo",
    out: Annotated[Path | None, typer.Option("--out", help="default: the user cache")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no training progress")] = False,
    seed: Annotated[int, typer.Option("--seed", help="another draw of the same recipe")] = 0,
) -> None:
    """Train the toy zoo (cached; rebuilt only when missing or its recipe changed)."""
    from evomerge.zoo import build_zoo, read_manifest

    try:
        root = build_zoo(size, out, progress=not quiet, seed=seed)
    except FileExistsError as e:
        raise fail(str(e), 2) from e
    console.print(zoo_table(read_manifest(root)))
    console.print(f"zoo: {root}")
