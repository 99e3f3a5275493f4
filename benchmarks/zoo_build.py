"""Zoo build time and what the zoo is worth: its held-out table plus a hand-set merge.

python -m benchmarks.zoo_build [--size demo|test] [--weight 0.8]

Builds the zoo from scratch into a fresh temporary folder (the cache is not touched), prints
the wall time, the seconds of each training job, the held-out table, and one more row: task
arithmetic of the experts with a hand-set weight (base + w · Σ task vectors), the check that
merging works at this scale. On a shared machine the times include other users' load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli.zoo import zoo_table
from evomerge.fitness import Evaluator
from evomerge.zoo import build_zoo, read_manifest


def task_arithmetic(root: Path, experts: list[str], weight: float) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    merged = model.state_dict()
    base = {k: v.clone() for k, v in merged.items()}
    with torch.no_grad():
        for name in experts:
            expert = AutoModelForCausalLM.from_pretrained(root / name).state_dict()
            for k, v in merged.items():
                v += weight * (expert[k] - base[k])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("demo", "test"), default="demo")
    parser.add_argument("--weight", type=float, default=0.8, help="task-arithmetic weight")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = build_zoo(args.size, out=Path(tmp) / "zoo", progress=False)
        wall = time.perf_counter() - start
        manifest = read_manifest(root)
        console.print(f"zoo {args.size}: built in {wall:.0f} s wall")
        console.print(f"training seconds per job: {manifest['train_seconds']}")
        table = zoo_table(manifest)

        experts = list(manifest["experts"])
        skills = list(manifest["experts"].values())
        torch.set_num_threads(1)
        merged = task_arithmetic(root, experts, args.weight)
        evaluator = Evaluator([f"zoo:{s}" for s in skills], split="held-out", zoo_dir=root)
        score = evaluator.score(merged, AutoTokenizer.from_pretrained(root / "base"))
        columns = [c.header for c in table.columns][1:-1]
        table.add_row(
            f"task arithmetic w={args.weight}",
            *(f"{score.metrics[c]:.3f}" if c in score.metrics else "" for c in columns),
            f"{score.fitness:.3f}",
            style="bold",
        )
        console.print(table)
        console.print(f"merged model scored in {score.seconds:.2f} s")


if __name__ == "__main__":
    main()
