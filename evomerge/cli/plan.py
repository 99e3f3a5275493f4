"""`evomerge plan`: a study's memory per worker and placement, before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evomerge.cli.app import app, console, fail
from evomerge.config import ConfigError, StudyConfig


def worker_plan(cfg: StudyConfig):
    """The plan of one worker of `cfg` (every worker of a study loads the same models)."""
    from workers.actor import WorkerSpec

    return WorkerSpec.from_config(cfg).plan()


def refuse_unfit(cfg: StudyConfig) -> None:
    """Exit 2 with the numbers when a study's workers fit no placement (or not the one the
    config asks for). Missing models are left to the coordinator's own check."""
    try:
        plan = worker_plan(cfg)
    except FileNotFoundError:
        return
    if plan.choice is None:
        raise fail(
            f"study {cfg.name!r} does not fit its workers' memory:\n" + "\n".join(plan.lines()), 2
        )


@app.command()
def plan(config: Annotated[Path, typer.Argument(help="study config YAML")]) -> None:
    """Bytes a worker needs per placement (from safetensors headers, no weights read), what
    its device has, and the placement `auto` picks; exit code 2 if none fits."""
    from evomerge.coordinator import build_space

    try:
        cfg = StudyConfig.load(config)
        build_space(cfg)  # what `run` refuses (method, parameters, options), refused here too
        worker = worker_plan(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise fail(str(e), 2) from e
    console.print(
        f"study {cfg.name}: {cfg.workers.count} worker(s), candidate {cfg.dtype}", highlight=False
    )
    for line in worker.lines():
        console.print(line, highlight=False, markup=False)
    if worker.choice is None:
        raise typer.Exit(2)
