"""The paper's claim in miniature: PS, DFS and PS+DFS on the cross-skill zoo, one budget each.

python -m benchmarks.cross_skill [--seeds 0 1 2] [--trials 48] [--variant NAME ...]

Builds the cross-skill zoo if missing, runs configs/cross/{ps,dfs,ps-dfs}.yaml through
`evomerge run` with the same number of trials (PS+DFS splits it between its two stages) once
per CMA-ES seed, into a temporary SQLite database, then prints the held-out table: base, each
expert, the hand-set task arithmetic, and per search the final recipe's held-out accuracy
(the best of the `heldout_top_k` best search recipes, as `evomerge best --by heldout`), as
mean, min and max over the seeds. `--variant` also runs PS with changed settings (VARIANTS)
at the same budget, which is how each search setting was chosen.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoTokenizer

from benchmarks.studies import run_config
from evomerge.config import StudyConfig
from evomerge.demo import score_models
from evomerge.fitness import Evaluator
from evomerge.zoo import build_zoo
from evomerge.zoo.build import hand_merge
from storage import Store

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cross"
# A search with one setting changed, each measured against its parent at the same budget.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ps-unit-range": ("ps", {"search": {"weight": {"low": 0, "high": 1}}}),
    "ps-per-layer": ("ps", {"granularity": 1}),
    "ps-whole-model": ("ps", {"granularity": 8}),
    "ps-dare-ties": (
        "ps",
        {"method": "dare_ties", "search": {"density": {"low": 0.1, "high": 1}}},
    ),
    "dfs-a-start": ("dfs", {"dataflow": {"start": "a"}}),
    "dfs-hop-scales": ("dfs", {"dataflow": {"scales": "hop"}}),
}


def _patched(config: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`config` with `patch` merged in, mapping by mapping."""
    out = dict(config)
    for key, value in patch.items():
        old = out.get(key)
        out[key] = (
            _patched(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
        )
    return out


def _final(store: Store, study: str) -> tuple[float, float]:
    """Held-out accuracy of the study's final recipe (the best by held-out of the
    `heldout_top_k` re-scored), and of its best recipe by search fitness alone."""
    by_heldout = store.best(study, top=1, by="heldout")
    by_fitness = store.best(study, top=1, by="fitness")
    if not by_heldout:
        return float("nan"), float("nan")
    return by_heldout[0].heldout, by_fitness[0].heldout


def _references(config: StudyConfig, zoo: Path) -> dict[str, float]:
    """Held-out accuracy of the base, each expert and the hand-set task arithmetic."""
    scores = {
        ref[4:]: s.fitness
        for ref, s in score_models(config, [config.base, *config.sources]).items()
    }
    evaluator = Evaluator([t.task for t in config.fitness.tasks], split="held-out", zoo_dir=zoo)
    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    for weight in (0.8, 1.0):
        model = hand_merge(zoo, weight)
        scores[f"task arithmetic, λ = {weight} each"] = evaluator.score(model, tokenizer).fitness
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--variant", nargs="*", default=[], choices=sorted(VARIANTS))
    parser.add_argument(
        "--storage", help="keep the studies in this database (default: a temporary one)"
    )
    args = parser.parse_args()
    zoo = build_zoo("cross")
    searches: dict[str, dict[str, Any]] = {
        name: yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        for name in ("ps", "dfs", "ps-dfs")
    }
    for name in args.variant:
        parent, patch = VARIANTS[name]
        searches[name] = _patched(searches[parent], patch)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in searches}
    seconds: dict[str, list[float]] = {name: [] for name in searches}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = args.storage or f"sqlite:///{folder / 'cross.db'}"
        for seed in args.seeds:
            for name, base in searches.items():
                study = f"cross-{name}-seed{seed}"
                config = {**base, "name": study, "optimizer": {"seed": seed}}
                if "dataflow" in base and base.get("method") != "dataflow":
                    half = args.trials // 2  # PS+DFS: the budget split between its stages
                    config["budget"] = {**base["budget"], "trials": args.trials - half}
                    config["dataflow"] = {**base["dataflow"], "trials": half}
                    final = f"{study}-dfs"
                else:
                    config["budget"] = {**base["budget"], "trials": args.trials}
                    final = study
                seconds[name].append(run_config(config, folder, url))
                results[name].append(_final(Store(url), final))
                print(f"seed {seed} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
        references = _references(StudyConfig.load(CONFIGS / "ps.yaml"), zoo)
    print(f"held-out accuracy on foreign_add, {args.trials} trials a search, seeds {args.seeds}")
    print(
        "| model or search | final recipe (mean) | min | max "
        "| best by search fitness alone (mean) | seconds a search |"
    )
    print("|---|---|---|---|---|---|")
    for name, value in references.items():
        print(f"| {name} | {value:.3f} | | | | |")
    best_source = max(v for k, v in references.items() if not k.startswith("task"))
    for name, pairs in results.items():
        final, alone = zip(*pairs, strict=True)
        label = name.upper() if name in ("ps", "dfs") else name.replace("ps-dfs", "PS+DFS")
        print(
            f"| best {label} | {statistics.mean(final):.3f} | {min(final):.3f} | "
            f"{max(final):.3f} | {statistics.mean(alone):.3f} | "
            f"{statistics.mean(seconds[name]):.0f} |"
        )
    ps = statistics.mean(f for f, _ in results["ps"])
    print(f"PS beats the best source by {ps - best_source:+.3f} (floor: +0.15)")


if __name__ == "__main__":
    main()
