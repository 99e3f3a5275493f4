"""`evomerge glue CONFIG`: Model-GLUE's recipe in one command (evomerge.glue.pipeline)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from evomerge.cli.app import app, console, err_console, fail
from evomerge.cli.study import StorageOpt, _drive, _open_store, _preflight, _storage_url
from evomerge.cli.zoo import show_analysis
from evomerge.config import ConfigError, StudyConfig


@app.command()
def glue(
    config: Annotated[Path, typer.Argument(help="glue config YAML (see configs/glue/demo.yaml)")],
    storage: StorageOpt = None,
    report_json: Annotated[
        Path | None, typer.Option("--report-json", help="also write the report as JSON")
    ] = None,
) -> None:
    """Cluster a zoo, select and merge the base's family, mix the merge with the experts of
    the other clusters, and report each step on held-out. Rerun it to resume."""
    from evomerge.glue.kinship import analyse
    from evomerge.glue.pipeline import GlueConfig, as_dicts, plan, report, selection_study
    from evomerge.zoo import default_zoo_dir, resolve_model

    def say(line: str) -> None:
        err_console.print(f"[dim]{line}")

    try:
        cfg = GlueConfig.load(config)
        zoo_dir = default_zoo_dir(cfg.zoo or "demo")  # type: ignore[arg-type]
        folders = {name: resolve_model(ref, zoo_dir) for name, ref in cfg.refs().items()}
        start = time.perf_counter()
        analysis = analyse(folders, cfg.threshold, progress=say)
        seconds = time.perf_counter() - start
        chosen = plan(cfg, analysis)
        stage1 = selection_study(cfg, chosen)
    except (ConfigError, OSError, ValueError) as e:
        raise fail(str(e), 2) from e
    show_analysis(analysis)
    console.print(f"analysis of {len(folders)} models: {seconds:.1f} s")
    console.print(f"merge (select among): {', '.join(chosen.merged)}")
    console.print(f"mix with the merge: {', '.join(chosen.mixed) or 'none'}")
    for ref, why in chosen.left_out.items():
        console.print(f"[yellow]left out[/] {ref}: {why}")
    url = _storage_url(storage, stage1)
    store = _open_store(url)
    existing = store.get_study(stage1.name, missing_ok=True)
    if existing is None:
        _preflight(stage1, url)
    else:
        stage1 = StudyConfig.from_yaml(existing.config_yaml, source=f"study {stage1.name!r}")
        console.print(f"study [bold]{stage1.name}[/] exists: resuming the chain")
    _drive(stage1, store, new=existing is None)
    try:
        rows = report(cfg, stage1, store, progress=say)
    except RuntimeError as e:  # a stage with no held-out score (budget.heldout_top_k: 0)
        raise fail(f"no report for {cfg.name}: {e}", 1) from e
    best_single = max((r for r in rows if r.kind == "model"), key=lambda r: r.fitness)
    table = Table(
        "model or step",
        *rows[0].metrics,
        "fitness",
        "vs best single",
        "trials",
        "worker s",
        "what",
        title=f"{cfg.name}: held-out, against the best single model ({best_single.name})",
    )
    for r in rows:
        table.add_row(
            r.name,
            *(f"{v:.3f}" for v in r.metrics.values()),
            f"{r.fitness:.3f}",
            f"{r.fitness - best_single.fitness:+.3f}",
            "-" if r.trials is None else str(r.trials),
            "-" if r.seconds is None else f"{r.seconds:.0f}",
            r.note,
        )
    console.print(table)
    if report_json is not None:
        report_json.write_text(json.dumps(as_dicts(rows), indent=2) + "\n")
