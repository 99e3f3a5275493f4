"""Commands: `evomerge zoo build`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evomerge.cli.app import app, console

zoo_app = typer.Typer(help="The toy model zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def build(
    size: Annotated[str, typer.Option("--size", help="demo or test")] = "demo",
    out: Annotated[Path | None, typer.Option("--out", help="default: the user cache")] = None,
) -> None:
    """Train the toy zoo (cached; rebuilt only when missing or its recipe changed)."""
    from evomerge.zoo import build_zoo

    if size not in ("demo", "test"):
        raise typer.BadParameter("--size must be demo or test")
    root = build_zoo(size, out)  # type: ignore[arg-type]
    console.print(f"zoo ready: {root}")
