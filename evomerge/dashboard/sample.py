"""Realistic studies written through the `Store` API, and a background server, for tests,
screenshots and benchmarks.

The recipes are real `Recipe`s over the toy zoo's names (TIES per layer group, and a DFS
path); the scores follow a noisy rising curve, some trials fail, and the best few get
held-out scores, as a real search records them.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from evomerge.recipe import DATAFLOW, DataFlow, Recipe, layer_group_names
from storage import Store

SOURCES = ("zoo:add", "zoo:reverse", "zoo:translate")
TASKS = ("zoo:add", "zoo:reverse", "zoo:translate")
NUM_LAYERS = 8


# Debian's Chromium, headless, with the flags that keep it off this offline machine's network.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def config_yaml(
    name: str,
    method: str = "ties",
    trials: int = 60,
    workers: int = 2,
    base: str = "zoo:base",
    sources: tuple[str, ...] = SOURCES,
    zoo: str = "demo",
) -> str:
    """A valid study config (over the toy zoo unless `base` and `sources` say otherwise)."""
    if method == DATAFLOW:
        models = f"sources: [{', '.join(sources[:2])}]\ndataflow: {{scales: pair}}\n"
    else:
        search = (
            "  weight: {low: 0.0, high: 1.0}\n  density: {low: 0.1, high: 1.0}\n"
            if method == "ties"
            else "  weight: {low: 0.0, high: 1.0}\n"
        )
        models = f"base: {base}\nsources: [{', '.join(sources)}]\ngranularity: 2\nsearch:\n{search}"
    return (
        f"name: {name}\nzoo: {zoo}\nmethod: {method}\n{models}"
        f"fitness:\n  tasks: [{', '.join(TASKS)}]\n  limit: 64\n"
        f"optimizer: {{seed: 1, population: 8}}\nbudget: {{trials: {trials}}}\n"
        f"workers: {{count: {workers}}}\n"
    )


def one_trial_study(
    store: Store,
    name: str,
    recipe: Recipe,
    state: str = "COMPLETE",
    fitness: float | None = None,
    error: str | None = None,
) -> None:
    """A finished study over the test-size zoo whose one trial, 0, is `recipe`."""
    text = config_yaml(name, recipe.method, sources=recipe.sources, zoo="test")
    store.create_study(name, text, optuna_study_name=name, budget_trials=1)
    run_id = store.start_run(name, pid=1, host="h", stale_after_s=30)
    store.record_trial_started(name, run_id, 0, 0, recipe)
    metrics = None if fitness is None else {recipe.sources[0]: fitness}
    store.record_trial_finished(name, 0, state, metrics, fitness, error=error)
    store.end_run(run_id, "finished")


def ps_recipe(
    rng: random.Random,
    method: str = "ties",
    base: str = "zoo:base",
    sources: tuple[str, ...] = SOURCES,
) -> Recipe:
    """A parameter-space recipe: per-group weights (and densities for TIES)."""
    groups = layer_group_names(NUM_LAYERS, 2)
    names = ("weight", "density") if method == "ties" else ("weight",)
    params = {
        n: tuple(tuple(round(rng.uniform(0.05, 1.0), 4) for _ in sources) for _ in groups)
        for n in names
    }
    return Recipe(method=method, base=base, sources=sources, groups=groups, params=params, seed=7)


def dfs_recipe(rng: random.Random) -> Recipe:
    """A data-flow recipe: a path through the layers of two models with a scale per hop."""
    models = SOURCES[:2]
    inner = tuple((rng.randrange(2), rng.randrange(NUM_LAYERS)) for _ in range(12))
    path = ((0, 0), *inner, (0, NUM_LAYERS - 1))  # a route starts and ends in A
    scales = (1.0, *(round(rng.uniform(0.6, 1.3), 3) for _ in range(len(path) - 1)))
    return Recipe(
        method=DATAFLOW,
        sources=models,
        groups=(),
        dataflow=DataFlow(models=models, path=path, scales=scales),
    )


@dataclass(frozen=True)
class Scores:
    fitness: float
    metrics: dict[str, float]


def scores(rng: random.Random, number: int) -> Scores:
    """A noisy score that rises with the trial number, as CMA-ES finds better recipes."""
    level = 0.35 + 0.35 * (1 - math.exp(-number / 40))
    metrics = {t: min(1.0, max(0.0, level + rng.gauss(0, 0.06))) for t in TASKS}
    return Scores(sum(metrics.values()) / len(metrics), metrics)


def fill_study(
    store: Store,
    name: str,
    trials: int,
    *,
    method: str = "ties",
    budget: int | None = None,
    end: str | None = "finished",
    seed: int = 0,
    base: str = "zoo:base",
    sources: tuple[str, ...] = SOURCES,
    zoo: str = "demo",
) -> None:
    """A study of `trials` trials in one run; the run ends with status `end` (None: live)."""
    rng = random.Random(seed)
    store.create_study(
        name,
        config_yaml(name, method, budget or trials, base=base, sources=sources, zoo=zoo),
        optuna_study_name=name,
        budget_trials=budget or trials,
    )
    run_id = store.start_run(name, pid=4242, host="node-1", stale_after_s=30)
    for number in range(trials):
        recipe = dfs_recipe(rng) if method == DATAFLOW else ps_recipe(rng, method, base, sources)
        worker = f"worker-{number % 2}"
        store.record_trial_started(name, run_id, number, number // 8, recipe, worker)
        if number % 13 == 12:
            store.record_trial_finished(
                name,
                number,
                "FAIL",
                build_seconds=0.4,
                worker=worker,
                error="RuntimeError: merged model produced NaN logits on zoo:add",
            )
            continue
        s = scores(rng, number)
        store.record_trial_finished(
            name,
            number,
            "COMPLETE",
            metrics=s.metrics,
            fitness=s.fitness,
            build_seconds=round(rng.uniform(0.3, 0.9), 3),
            eval_seconds=round(rng.uniform(1.5, 3.0), 3),
            worker=worker,
        )
    for row in store.best(name, top=3):
        s = scores(rng, row.number)
        store.record_heldout(name, row.number, s.metrics, s.fitness - 0.03)
    if end is not None:
        store.end_run(run_id, end, "budget reached" if end == "finished" else end)
        store.set_study_status(name, end)


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """Serve `app` on a free loopback port in a background thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the dashboard server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()
