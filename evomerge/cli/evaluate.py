"""Commands: `evomerge eval`, a table of models by tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from evomerge.cli.app import app, console, fail


@app.command("eval")
def evaluate(
    models: Annotated[list[str], typer.Argument(help="checkpoint folders or zoo:NAME")],
    task: Annotated[list[str], typer.Option("--task", help="zoo:TASK or a task YAML")],
    split: Annotated[str, typer.Option("--split")] = "search",
    limit: Annotated[int | None, typer.Option("--limit")] = None,
    zoo: Annotated[str, typer.Option("--zoo", help="zoo size for zoo: refs")] = "demo",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Score models on tasks; one row per model, the weighted mean last."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness import Evaluator
    from evomerge.zoo import default_zoo_dir, resolve_model

    zoo_dir: Path = default_zoo_dir(zoo)  # type: ignore[arg-type]
    try:
        evaluator = Evaluator(task, split=split, limit=limit, zoo_dir=zoo_dir)
        paths = {m: resolve_model(m, zoo_dir) for m in models}
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise fail(str(e), 2) from e
    scores = {}
    for ref, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        scores[ref] = evaluator.score(model, AutoTokenizer.from_pretrained(path))
    if as_json:
        out = {m: {"metrics": s.metrics, "mean": s.fitness} for m, s in scores.items()}
        console.print_json(json.dumps(out))
        return
    names = [t.name for t in evaluator.tasks]
    table = Table("model", *names, "mean", title=f"{split} split")
    for ref, s in scores.items():
        table.add_row(ref, *(f"{s.metrics[n]:.3f}" for n in names), f"{s.fitness:.3f}")
    console.print(table)
