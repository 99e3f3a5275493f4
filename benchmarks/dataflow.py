"""PS, DFS and PS+DFS on the toy zoo: held-out scores next to the sources', and trial times.

python -m benchmarks.dataflow [--workers N] [--storage URL]

Runs configs/demo.yaml (parameter space), configs/demo-dfs.yaml (data-flow space) and
configs/demo-ps-dfs.yaml (PS, then DFS over its best merge and zoo:translate) through the
CLI, as a user would, into one database; then scores every model of the demo zoo on the
held-out split and prints the best recipe of each study beside them, with the median time
of a trial (build + eval) of each kind and the ratio DFS / PS.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml

from benchmarks.studies import run_config
from evomerge.config import StudyConfig
from evomerge.demo import score_models
from evomerge.zoo import build_zoo
from storage import Store

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNS = {"PS": "demo", "DFS": "demo-dfs", "PS+DFS": "demo-ps-dfs"}


def run_study(config: Path, workers: int | None, url: str, tmp: Path) -> float:
    """`evomerge run` on `config` (workers overridden), seconds of wall time."""
    data = yaml.safe_load(config.read_text())
    if workers:
        data["workers"] = {**data.get("workers", {}), "count": workers}
    return run_config(data, tmp, url)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, help="override the configs' worker count")
    ap.add_argument("--storage", help="default: a fresh SQLite file")
    args = ap.parse_args(argv)
    build_zoo("demo", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.storage or f"sqlite:///{Path(tmp) / 'dataflow.db'}"
        walls = {
            k: run_study(CONFIGS / f"{v}.yaml", args.workers, url, Path(tmp))
            for k, v in RUNS.items()
        }
        store = Store(url)
        config = StudyConfig.load(CONFIGS / "demo.yaml")
        models = score_models(config, [config.base, *config.sources])
        rows = {
            "PS": store.best("demo", top=1, by="heldout")[0],
            "DFS": store.best("demo-dfs", top=1, by="heldout")[0],
            "PS+DFS": store.best("demo-ps-dfs-dfs", top=1, by="heldout")[0],
        }
        trial = {
            kind: statistics.median(
                r.build_seconds + r.eval_seconds for r in store.trials(name, state="COMPLETE")
            )
            for kind, name in (("PS", "demo"), ("DFS", "demo-dfs"), ("PS+DFS", "demo-ps-dfs-dfs"))
        }
    tasks = list(next(iter(models.values())).metrics)
    lines = [
        "| model | " + " | ".join(tasks) + " | held-out fitness |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for ref, score in models.items():
        cells = " | ".join(f"{score.metrics[t]:.3f}" for t in tasks)
        lines.append(f"| {ref} | {cells} | {score.fitness:.3f} |")
    for kind, row in rows.items():
        metrics = row.heldout_metrics or {}
        cells = " | ".join(f"{metrics.get(t, float('nan')):.3f}" for t in tasks)
        lines.append(f"| best {kind} ({row.study} #{row.number}) | {cells} | {row.heldout:.3f} |")
    lines += [
        "",
        "Median trial (build + eval, search split): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in trial.items())
        + f"; DFS / PS = {trial['DFS'] / trial['PS']:.2f}.",
        "Study wall times (worker start and held-out rescoring included): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())
        + " (PS+DFS: both stages).",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
