"""`evomerge plan`: a study's memory per worker and placement, before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from evomerge.cli.app import app, console, fail
from evomerge.config import ConfigError, StudyConfig

if TYPE_CHECKING:
    from evomerge.memory import WorkerPlan


def stage_plans(cfg: StudyConfig) -> dict[str, WorkerPlan]:
    """The plan of one worker of `cfg` (every worker of a study loads the same models) per
    study it runs: PS+DFS's stage 2 too, whose routes keep a KV cache per hop, planned before
    stage 1 spends its budget."""
    from workers.actor import WorkerSpec

    stages = [cfg, cfg.dataflow_stage("stage 1's best")] if cfg.next_stage else [cfg]
    return {c.name: WorkerSpec.from_config(c).plan() for c in stages}


def refuse_unfit(cfg: StudyConfig) -> None:
    """Exit 2 with the numbers when a study's workers fit no placement (or not the one the
    config asks for). Missing models are left to the coordinator's own check."""
    try:
        plans = stage_plans(cfg)
    except FileNotFoundError:
        return
    except ValueError as e:  # a task's rows that cannot be read or encoded
        raise fail(str(e), 2) from e
    for name, plan in plans.items():
        if plan.choice is None:
            raise fail(
                f"study {name!r} does not fit its workers' memory:\n" + "\n".join(plan.lines()), 2
            )


@app.command()
def plan(config: Annotated[Path, typer.Argument(help="study config YAML")]) -> None:
    """Bytes a worker needs per placement (from safetensors headers, no weights read), what
    its device has, and the placement `auto` picks; exit code 2 if none fits."""
    from evomerge.coordinator import build_space

    try:
        cfg = StudyConfig.load(config)
        build_space(cfg)  # what `run` refuses (method, parameters, options), refused here too
        plans = stage_plans(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise fail(str(e), 2) from e
    for name, worker in plans.items():
        console.print(
            f"study {name}: {cfg.workers.count} worker(s), candidate {cfg.dtype}", highlight=False
        )
        for line in worker.lines():
            console.print(line, highlight=False, markup=False)
    if any(worker.choice is None for worker in plans.values()):
        raise typer.Exit(2)
