"""Commands: `evomerge eval`, a table of models by tasks with the fitness (mean) last."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from evomerge.cli.app import app, console, fail
from evomerge.config import ZooSize


@app.command("eval")
def evaluate(
    models: Annotated[list[str], typer.Argument(help="checkpoint folders or zoo:NAME")],
    task: Annotated[list[str], typer.Option("--task", help="zoo:TASK or a task YAML")],
    split: Annotated[str, typer.Option("--split", help="search or held-out")] = "search",
    limit: Annotated[int | None, typer.Option("--limit", help="rows per task")] = None,
    weight: Annotated[
        list[float] | None, typer.Option("--weight", help="one per --task; default equal")
    ] = None,
    zoo: Annotated[ZooSize, typer.Option("--zoo", help="zoo size that zoo: refs name")] = "demo",
    threads: Annotated[int, typer.Option("--threads", help="torch threads")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Score models on tasks; one row per model, the weighted mean (the fitness) last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evomerge import dataflow, glue  # noqa: F401  (register the DFS and mixture exports' classes)
    from evomerge.fitness import Evaluator
    from evomerge.zoo import default_zoo_dir, resolve_model

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    zoo_dir = default_zoo_dir(zoo)
    try:
        paths = {m: resolve_model(m, zoo_dir) for m in models}
        evaluator = Evaluator(task, weights=weight, split=split, limit=limit, zoo_dir=zoo_dir)
        scores = {}
        for ref, path in paths.items():
            model = AutoModelForCausalLM.from_pretrained(path)
            scores[ref] = evaluator.score(model, AutoTokenizer.from_pretrained(path))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise fail(str(e), 2) from e
    if as_json:
        out = {
            ref: {"metrics": s.metrics, "fitness": s.fitness, "seconds": round(s.seconds, 3)}
            for ref, s in scores.items()
        }
        print(json.dumps(out, indent=2))
        return
    names = [t.name for t in evaluator.tasks]
    metrics = ", ".join(f"{t.name}: {t.metric_name}" for t in evaluator.tasks)
    table = Table(
        "model",
        *names,
        "mean",
        title=f"{split} split",
        caption=f"{metrics}; mean: the fitness (weighted, higher is better, 1/perplexity)",
    )
    for ref, s in scores.items():
        table.add_row(ref, *(f"{s.metrics[n]:.3f}" for n in names), f"{s.fitness:.3f}")
    console.print(table)
