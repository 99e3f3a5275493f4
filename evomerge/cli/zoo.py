"""Commands: `evomerge zoo build`, which trains (or finds) the toy zoo and prints its table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from evomerge.cli.app import app, console, err_console, fail
from evomerge.config import ZooSize

zoo_app = typer.Typer(help="The toy model zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


def zoo_table(manifest: dict[str, Any]) -> Table:
    """Held-out metrics of the zoo's models (both families: the base's, then the
    stranger's), with the mean over the base's experts' skills."""
    from evomerge.zoo.build import model_names

    table_data = manifest["held_out"]
    tasks = list(next(iter(table_data.values())))
    skills = list(manifest["experts"].values())
    table = Table(
        "model",
        *tasks,
        "skills mean",
        title=f"zoo {manifest['size']} ({manifest['version']}), held-out split",
        caption="text is perplexity (lower is better); the rest are accuracies; skills mean: "
        "over the base's experts' skills",
        # Light borders: eight columns and names like stranger-upper fit 80 characters whole.
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for name in model_names(manifest):
        row = table_data[name]
        mean = sum(row[s] for s in skills) / len(skills)
        table.add_row(name, *(f"{row[t]:.3f}" for t in tasks), f"{mean:.3f}")
    return table


@zoo_app.command("build")
def build(
    size: Annotated[
        ZooSize,
        typer.Option("--size", help="demo, test (smaller, faster) or cross (the cross-skill zoo)"),
    ] = "demo",
    out: Annotated[Path | None, typer.Option("--out", help="default: the user cache")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no training progress")] = False,
    seed: Annotated[int, typer.Option("--seed", help="another draw of the same recipe")] = 0,
    fusion: Annotated[
        bool, typer.Option("--fusion", help="also the fusion sources (Qwen2, BPE) and corpus")
    ] = False,
) -> None:
    """Train the toy zoo (cached; rebuilt only when missing or its recipe changed)."""
    from evomerge.zoo import build_zoo, read_manifest
    from evomerge.zoo.fusion import build_fusion

    try:
        root = build_zoo(size, out, progress=not quiet, seed=seed)
    except FileExistsError as e:
        raise fail(str(e), 2) from e
    if fusion:
        build_fusion(root, progress=not quiet)
    console.print(zoo_table(read_manifest(root)))
    console.print(f"zoo: {root}")


def _named(refs: list[str], zoo: str) -> dict[str, Path]:
    """`NAME=PATH`, `zoo:NAME` or a folder (named by its folder name) → {name: folder}."""
    from evomerge.zoo import default_zoo_dir, resolve_model

    out: dict[str, Path] = {}
    for ref in refs:
        name, sep, where = ref.partition("=")
        if not sep:
            where = ref
            name = ref[4:] if ref.startswith("zoo:") else Path(ref).name
        if name in out:
            raise ValueError(f"model name {name!r} given twice; name them NAME=PATH")
        out[name] = resolve_model(where, default_zoo_dir(zoo))  # type: ignore[arg-type]
    return out


def similarity_table(result: Any) -> Table:
    """The similarity matrix, one row a model, with its cluster."""
    cluster_of = {n: i + 1 for i, c in enumerate(result.clusters) for n in c}
    table = Table(
        "model",
        "cluster",
        *result.names,
        title=f"weight similarity (mean column cosine), clusters at {result.threshold}",
        caption="-: cannot merge (see the reasons below)",
    )
    for name, row in zip(result.names, result.matrix, strict=True):
        table.add_row(
            name,
            str(cluster_of[name]),
            *("-" if v is None else f"{v:.3f}".replace("-0.000", "0.000") for v in row),
        )
    return table


@zoo_app.command("analyse")
def analyse(
    models: Annotated[list[str], typer.Argument(help="NAME=PATH, zoo:NAME or a model folder")],
    threshold: Annotated[
        float, typer.Option("--threshold", help="similarity that joins a cluster, in (0, 1]")
    ] = 0.95,
    zoo: Annotated[ZooSize, typer.Option("--zoo", help="zoo size that zoo: refs name")] = "demo",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Cluster models by weight similarity (Model-GLUE): which can merge, and why not."""
    import json

    from evomerge.glue.kinship import analyse as run_analysis
    from evomerge.glue.kinship import check_threshold

    try:
        check_threshold(threshold)
        show = None if as_json else (lambda line: err_console.print(f"[dim]{line}"))
        result = run_analysis(_named(models, zoo), threshold, progress=show)
    except (OSError, ValueError) as e:
        raise fail(str(e), 2) from e
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    show_analysis(result)


def show_analysis(result: Any) -> None:
    """The similarity matrix, the clusters, and why each model that stands apart does."""
    console.print(similarity_table(result))
    for i, cluster in enumerate(result.clusters):
        console.print(f"cluster {i + 1}: {', '.join(cluster)}")
    for name, why in result.apart().items():
        console.print(f"[yellow]{name}[/] stands apart: {why}")
