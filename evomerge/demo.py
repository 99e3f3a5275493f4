"""The demo: a real search over the toy zoo, and the proof that it beat every source."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli.app import console
from evomerge.config import StudyConfig
from evomerge.fitness import Evaluator
from evomerge.zoo import build_zoo, default_zoo_dir


def score_models(config: StudyConfig, refs: list[str], split: str = "held-out") -> dict:
    """Score whole checkpoints (the sources themselves) on the study's tasks."""
    zoo_dir = default_zoo_dir(config.zoo or "demo")
    tasks = [t.task for t in config.fitness.tasks]
    weights = [t.weight for t in config.fitness.tasks]
    limit = config.fitness.heldout_limit if split == "held-out" else config.fitness.limit
    evaluator = Evaluator(tasks, weights, split=split, limit=limit, zoo_dir=zoo_dir)
    out = {}
    paths = config.model_paths()
    for ref in refs:
        path = paths[ref]
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        out[ref] = evaluator.score(model, AutoTokenizer.from_pretrained(path))
    return out


def run_demo(config_path: Path, store, study: str | None, drive: Callable) -> None:
    """Build the zoo if missing, run the demo study, print the best merge next to the sources."""
    t0 = time.monotonic()
    base_cfg = StudyConfig.load(config_path)
    build_zoo(base_cfg.zoo or "demo")
    name = study or f"{base_cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = StudyConfig.load(config_path, name=name)
    drive(config, store, new=True)

    best = store.best(name, top=1, by="heldout")
    if not best:
        console.print("[red]no complete trial[/]")
        return
    row = best[0]
    sources = score_models(config, [config.base, *config.sources])
    table = Table(title="held-out split", show_lines=False)
    tasks = list(next(iter(sources.values())).metrics)
    table.add_column("model")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("fitness", justify="right")
    for ref, score in sources.items():
        table.add_row(ref, *(f"{score.metrics[t]:.3f}" for t in tasks), f"{score.fitness:.3f}")
    metrics = row.heldout_metrics or {}
    table.add_row(
        f"[bold]best merge (trial {row.number})",
        *(f"[bold]{metrics.get(t, float('nan')):.3f}" for t in tasks),
        f"[bold]{row.heldout:.3f}",
    )
    console.print(table)
    best_source = max(s.fitness for s in sources.values())
    verdict = "beats" if row.heldout > best_source else "does not beat"
    console.print(
        f"best merge {verdict} every source on held-out data "
        f"({row.heldout:.3f} vs best source {best_source:.3f}); "
        f"demo took {time.monotonic() - t0:.0f} s"
    )
