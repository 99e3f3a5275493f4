"""One search trial, evomerge's way against the mergekit-evolve way, on the toy zoo.

python -m benchmarks.trial [--method ties] [--reps 5] [--threads 1]

Both score the same recipe (per-layer-group parameters over zoo:add, zoo:reverse and
zoo:translate of the demo zoo) on the demo's fitness (3 generate tasks x 64 prompts):

- evomerge: `CandidateWorker.evaluate`, what a Ray worker does per trial: build the recipe in
  place into the resident model (sources loaded once, before timing), then score it.
- mergekit-evolve's way: write the recipe's mergekit YAML, `run_merge` it to a folder on
  disk, load that folder with `from_pretrained`, score it with the same evaluator.

Median of `--reps` trials each, after one warm-up each, alternated so both see the same
machine. Needs mergekit (a dev dependency).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.config import StudyConfig
from evomerge.export import mergekit_yaml
from evomerge.space import SearchSpace
from evomerge.zoo import build_zoo
from workers.actor import CandidateWorker, WorkerSpec

CONFIG = """
name: trial
zoo: demo
base: zoo:base
sources: [zoo:add, zoo:reverse, zoo:translate]
method: {method}
granularity: 2
search: {{weight: {{low: 0, high: 1.5}}, density: {{low: 0.1, high: 1}}}}
fitness: {{tasks: [zoo:add, zoo:reverse, zoo:translate], limit: 64}}
"""


def mergekit_trial(config_yaml: str, worker: CandidateWorker, root: Path) -> tuple[float, float]:
    """(merge to disk + load, score) seconds."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = Path(tempfile.mkdtemp(dir=root))
    t0 = time.perf_counter()
    config = MergeConfiguration.model_validate(yaml.safe_load(config_yaml))
    run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=True))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    t1 = time.perf_counter()
    worker._evaluators["search"].score(model, worker.tokenizer)
    return t1 - t0, time.perf_counter() - t1


def evomerge_trial(recipe_json: str, worker: CandidateWorker) -> tuple[float, float]:
    """(build in place, score) seconds."""
    result = worker.evaluate(recipe_json)
    assert result.error is None, result.error
    return result.build_seconds, result.eval_seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="ties", choices=["task_arithmetic", "ties", "dare_ties"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    build_zoo("demo", progress=False)
    config = StudyConfig.from_yaml(CONFIG.format(method=args.method))
    spec = WorkerSpec.from_config(config)
    t0 = time.perf_counter()
    worker = CandidateWorker(spec)
    load_s = time.perf_counter() - t0
    space = SearchSpace(config, worker.sources.groups(config.granularity))
    recipe = space.decode(space.initial_params())
    paths = {n: str(p) for n, p in worker.sources.paths.items()}
    text = mergekit_yaml(recipe, paths)
    with tempfile.TemporaryDirectory() as tmp:
        evomerge_trial(recipe.to_json(), worker)
        mergekit_trial(text, worker, Path(tmp))
        pairs = [
            (evomerge_trial(recipe.to_json(), worker), mergekit_trial(text, worker, Path(tmp)))
            for _ in range(args.reps)
        ]
    ours = [statistics.median(p[0][i] for p in pairs) for i in (0, 1)]
    theirs = [statistics.median(p[1][i] for p in pairs) for i in (0, 1)]
    print(
        f"{args.method} over 3 demo-zoo experts, granularity 2, {args.threads} torch "
        f"thread(s), median of {args.reps} (sources loaded once per evomerge worker: "
        f"{load_s:.2f} s):\n"
        f"| | candidate (s) | score (s) | trial (s) |\n|---|---:|---:|---:|\n"
        f"| evomerge (in-place build) | {ours[0]:.3f} | {ours[1]:.2f} | {sum(ours):.2f} |\n"
        f"| mergekit-evolve way (run_merge to disk, load) | {theirs[0]:.3f} | {theirs[1]:.2f} "
        f"| {sum(theirs):.2f} |\n"
        f"candidate: {theirs[0] / ours[0]:.0f}x faster; whole trial: "
        f"{sum(theirs) / sum(ours):.2f}x faster"
    )


if __name__ == "__main__":
    main()
