"""Coordinator costs: per-trial overhead as a study grows, and worker utilisation.

python -m benchmarks.coordinator [--trials 5000] [--storage URL]

1. Overhead: the coordinator's own work per trial (ask CMA-ES, decode the recipe, record the
   start, record the result, tell), measured over 100 trials at the start of a study and
   again after it holds `--trials` trials; the ratio is the growth.
2. Utilisation: the real coordinator and pool with 4 Ray workers whose evaluation takes a
   fixed time (0.5 s, with one and two trials queued per worker, and 2 s); busy time over
   (workers x wall time).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna

from evomerge.config import StudyConfig
from evomerge.coordinator import Coordinator, make_sampler
from evomerge.recipe import Recipe, layer_group_names
from evomerge.space import SearchSpace
from storage import Store
from workers.actor import CandidateWorker, TrialResult

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONFIG = """
name: {name}
zoo: test
base: zoo:base
sources: [zoo:add, zoo:reverse, zoo:translate]
method: ties
search: {{weight: {{low: 0, high: 1}}, density: {{low: 0.1, high: 1}}}}
fitness: {{tasks: [zoo:add]}}
budget: {{trials: {trials}, heldout_top_k: 0}}
workers: {{count: 4, cpus_per_worker: 0.25, queue: {queue}}}
"""


def synthetic_fitness(recipe: Recipe) -> float:
    """A smooth stand-in for a score: how close every value is to 0.3."""
    values = [v for rows in recipe.params.values() for row in rows for v in row]
    return -sum((v - 0.3) ** 2 for v in values) / len(values)


def overhead(store: Store, n_trials: int, num_layers: int = 16) -> tuple[float, float]:
    """Mean seconds of coordinator work per trial: first 100, and 100 after `n_trials`."""
    cfg = StudyConfig.from_yaml(CONFIG.format(name="overhead", trials=n_trials + 100, queue=1))
    space = SearchSpace(cfg, layer_group_names(num_layers, 1))
    store.create_study(cfg.name, cfg.to_yaml(), optuna_study_name=cfg.name)
    run_id = store.start_run(cfg.name, 0, "bench", 30)
    study = optuna.create_study(
        study_name=cfg.name,
        storage=store.optuna_storage(),
        direction="maximize",
        sampler=make_sampler(cfg, space),
    )

    def one() -> None:
        trial = study.ask(space.distributions)
        recipe = space.decode(trial.params)
        store.record_trial_started(cfg.name, run_id, trial.number, None, recipe)
        fitness = synthetic_fitness(recipe)
        store.record_trial_finished(cfg.name, trial.number, "COMPLETE", {"x": fitness}, fitness)
        study.tell(trial, fitness)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        return (time.perf_counter() - t0) / n

    early = timed(100)
    for i in range(n_trials - 100):
        one()
        if i % 1000 == 999:
            print(f"  filled {i + 101} trials", flush=True)
    late = timed(100)
    print(f"search space: {space.dim} dimensions ({num_layers} layers, 3 sources, 2 params)")
    return early, late


def fixed_duration_worker(duration: float) -> type[CandidateWorker]:
    """A worker class whose every evaluation takes exactly `duration` s and loads nothing."""

    class FixedDurationWorker(CandidateWorker):
        def __init__(self, spec: object) -> None:
            self.name = "fixed"

        def evaluate(self, recipe_json: str, split: str = "search") -> TrialResult:
            time.sleep(duration)
            fitness = synthetic_fitness(Recipe.from_json(recipe_json))
            return TrialResult({"x": fitness}, fitness, 0.0, duration, self.name)

    return FixedDurationWorker


def utilisation(store: Store, duration: float, queue: int, n_trials: int = 80) -> float:
    """Busy time over (workers x wall time) of the real coordinator and pool, 4 workers."""
    name = f"utilisation-{duration}-{queue}"
    cfg = StudyConfig.from_yaml(CONFIG.format(name=name, trials=n_trials, queue=queue))
    store.create_study(cfg.name, cfg.to_yaml(), optuna_study_name=cfg.name)
    Coordinator(cfg, store, worker_cls=fixed_duration_worker(duration)).run()
    rows = store.trials(cfg.name, state="COMPLETE")
    started = min(r.started_at for r in rows)
    finished = max(r.finished_at for r in rows)
    wall = (finished - started).total_seconds()
    return len(rows) * duration / (cfg.workers.count * wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--storage", default=None, help="default: a fresh SQLite file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.storage or f"sqlite:///{Path(tmp) / 'bench.db'}"
        store = Store(url)
        store.migrate()
        early, late = overhead(store, args.trials)
        print(
            f"overhead per trial: {early * 1e3:.1f} ms at 100 trials, {late * 1e3:.1f} ms at "
            f"{args.trials} trials; growth {late / early:.2f}x (floor: at most 2x)"
        )
        for duration, queue in ((0.5, 1), (0.5, 2), (2.0, 1)):
            util = utilisation(store, duration, queue)
            print(
                f"worker utilisation, 4 workers, {duration} s evaluations, workers.queue "
                f"{queue}: {util:.1%} (floor: 90%)"
            )


if __name__ == "__main__":
    main()
