"""Zoo build time and what the zoo is worth, over several seeds: the held-out table, a
hand-set merge, and the margin of every floor the tests hold the zoo to.

python -m benchmarks.zoo_build [--size demo|test] [--weight W] [--seeds 0 1 2] [--keep]

Builds each seed's zoo from scratch into a fresh temporary folder (`--keep`: into the cache,
where the tests and the demo find seed 0), prints the wall time, the held-out table, one more
row: task arithmetic of the experts with a hand-set weight (base + w · Σ task vectors), and
then one line a seed with each floor's margin (positive: met). A zoo whose margins are thin on
one seed flips on another machine. On a shared machine the times include other users' load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from evomerge.cli.zoo import zoo_table
from evomerge.fitness import Evaluator
from evomerge.zoo import build_zoo, read_manifest
from evomerge.zoo.build import HAND_MERGE_WEIGHT, hand_merge

# The floors of tests/test_zoo.py: (expert on its skill, its gain over the base, the merge's
# gain over the best single model on the skills' mean, the share of each expert's gain that the
# merge keeps); the stranger's is "no better than the base + 0.05". The second family's: the
# stranger's experts score at least SECOND_OWN on their skill, the first family at most
# FIRST_LACKS on it.
FLOORS = {"test": (0.85, 0.4, 0.1, 0.3), "demo": (0.9, 0.4, 0.1, 0.3)}
SECOND_OWN, FIRST_LACKS = 0.85, 0.05


def margins(root: Path, size: str, weight: float, console: Console) -> dict[str, float]:
    """Print the zoo's table with the merge row; return each floor's margin."""
    manifest = read_manifest(root)
    table = zoo_table(manifest)
    rows, skills = manifest["held_out"], list(manifest["experts"].values())
    merged = hand_merge(root, weight)
    evaluator = Evaluator([f"zoo:{s}" for s in skills], split="held-out", zoo_dir=root)
    score = evaluator.score(merged, AutoTokenizer.from_pretrained(root / "base"))
    columns = [c.header for c in table.columns][1:-1]
    table.add_row(
        f"task arithmetic w={weight}",
        *(f"{score.metrics[c]:.3f}" if c in score.metrics else "" for c in columns),
        f"{score.fitness:.3f}",
        style="bold",
    )
    console.print(table)
    own, gain, merge_gain, kept = FLOORS[size]
    base, stranger = rows[manifest["base"]], rows[manifest["stranger"]]
    first = [manifest["base"], *manifest["experts"], manifest["harmful"]]
    second = manifest["stranger_experts"].items()
    best_single = max(sum(r[s] for s in skills) / len(skills) for r in rows.values())
    experts = manifest["experts"].items()
    return {
        "expert": min(rows[e][s] for e, s in experts) - own,
        "gain": min(rows[e][s] - base[s] for e, s in experts) - gain,
        "stranger": min(base[s] + 0.05 - stranger[s] for s in skills),
        "merge": score.fitness - best_single - merge_gain,
        "kept": min((score.metrics[s] - base[s]) / (rows[e][s] - base[s]) for e, s in experts)
        - kept,
        "second": min(
            min(rows[e][s] - SECOND_OWN, min(FIRST_LACKS - rows[m][s] for m in first))
            for e, s in second
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("demo", "test"), default="demo")
    parser.add_argument("--weight", type=float, default=HAND_MERGE_WEIGHT, help="merge weight")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--keep", action="store_true", help="build into the zoo cache")
    args = parser.parse_args()
    weight = args.weight
    console = Console()
    torch.set_num_threads(1)
    spread = Table(title=f"zoo {args.size}: margin of each floor (positive: met), w={weight}")
    for column in ("seed", "build s", "expert", "gain", "stranger", "merge", "kept", "second"):
        spread.add_column(column, justify="right")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            out = None if args.keep else Path(tmp) / "zoo"
            start = time.perf_counter()
            root = build_zoo(args.size, out=out, progress=False, seed=seed)
            wall = time.perf_counter() - start
            console.print(f"zoo {args.size} seed {seed}: built in {wall:.0f} s wall ({root})")
            found = margins(root, args.size, weight, console)
        spread.add_row(str(seed), f"{wall:.0f}", *(f"{v:+.3f}" for v in found.values()))
        console.print(spread)


if __name__ == "__main__":
    main()
