"""Model-GLUE's heuristic selection: the replay logic, then a real study on the test zoo."""

from __future__ import annotations

import math
import os
import signal
import time

import optuna
import pytest

from evomerge.config import StudyConfig
from evomerge.coordinator import Coordinator
from evomerge.glue.kinship import merge_similarity
from evomerge.glue.selection import GRID, Selection, key, replay
from evomerge.recipe import Recipe
from storage import Store
from tests.test_coordinator import _evomerge, register

NAMES = ("good", "bad", "fine")


def fitness(weights) -> float:
    """A landscape where `bad` hurts any merge it joins and `good` + `fine` help each other."""
    good, bad, fine = weights
    return 0.5 * good + 0.4 * fine + 0.3 * min(good, fine) - 0.6 * bad


def run_to_end(heuristic: str) -> tuple[Selection, int]:
    """Replay until finished, scoring each requested round; returns (outcome, rounds)."""
    known: dict = {}
    for rounds in range(100):
        outcome = replay(heuristic, NAMES, known)
        if isinstance(outcome, Selection):
            return outcome, rounds
        assert outcome and all(c not in known for c in outcome)
        known |= {c: fitness(c) for c in outcome}
    raise AssertionError("the heuristic never finished")


def test_average_keeps_what_helps_and_drops_the_harmful_model() -> None:
    selection, rounds = run_to_end("average")
    assert selection.kept == ["good", "fine"]
    assert list(selection.dropped) == ["bad"] and "without it" in selection.dropped["bad"]
    assert selection.weights == key((0.5, 0, 0.5))
    assert rounds == 3  # the solos at once, then one candidate a step


def test_coefficient_tries_the_grid_at_each_step() -> None:
    selection, rounds = run_to_end("coefficient")
    assert selection.kept == ["good", "fine"] and list(selection.dropped) == ["bad"]
    c = selection.weights[2]
    assert c in GRID and selection.weights == key((1 - c, 0, c))
    assert selection.fitness == pytest.approx(max(fitness(key((1 - g, 0, g))) for g in GRID))
    assert rounds == 3


@pytest.mark.parametrize(("lowest", "second"), [(False, "bad"), (True, "fine")])
def test_similarity_takes_the_source_most_or_least_like_the_merge(lowest, second) -> None:
    """`bad` is the most like the merge so far: taken second with `highest`, last with
    `lowest`; either way the outcome is the same selection."""
    like = {1: 0.9, 2: 0.5}  # index -> similarity to whatever the merge is

    def closeness(weights, candidates):
        return [like[c] for c in candidates]

    known = {key(w): fitness(w) for w in ((1, 0, 0), (0, 1, 0), (0, 0, 1))}
    outcome = replay("similarity", NAMES, known, closeness=closeness, lowest=lowest)
    newcomer = NAMES.index(second)
    assert isinstance(outcome, list) and {c[newcomer] for c in outcome} == set(GRID)
    while not isinstance(outcome, Selection):
        known |= {c: fitness(c) for c in outcome}
        outcome = replay("similarity", NAMES, known, closeness=closeness, lowest=lowest)
    assert outcome.kept == ["good", "fine"] and list(outcome.dropped) == ["bad"]


def test_merge_similarity_of_a_one_source_merge_is_that_source(tiny_llama) -> None:
    sources = list(tiny_llama.sources)
    sims = merge_similarity(tiny_llama.base, sources, (1.0, 0.0, 0.0), [0, 1, 2])
    assert sims[0] == pytest.approx(1.0, abs=1e-12) and max(sims[1:]) < 1 - 1e-4
    halfway = merge_similarity(tiny_llama.base, sources, (0.5, 0.5, 0.0), [0, 1, 2])
    assert halfway[0] > halfway[2] and halfway[1] > halfway[2]


def test_a_failed_candidate_is_dropped_not_retried() -> None:
    known = {key(w): fitness(w) for w in ((1, 0, 0), (0, 1, 0), (0, 0, 1))}
    known[key((0.5, 0, 0.5))] = -math.inf
    outcome = replay("average", NAMES, known)
    assert isinstance(outcome, list) and outcome == [key((0.5, 0.5, 0))]
    known[key((0.5, 0.5, 0))] = 0.0
    outcome = replay("average", NAMES, known)
    assert isinstance(outcome, Selection) and outcome.kept == ["good"]
    assert "failed" in outcome.dropped["fine"]


SELECT = """
name: {name}
zoo: test
base: zoo:base
sources: [zoo:add, zoo:harmful, zoo:reverse]
method: task_arithmetic
granularity: 4
search: {{weight: {{low: 0, high: 1.6}}}}
fitness: {{tasks: [zoo:add, zoo:reverse], limit: 32, heldout_limit: 32}}
optimizer: {{kind: {kind}, scale: 1.6}}
budget: {{trials: {trials}, heldout_top_k: 1}}
workers: {{count: 2, cpus_per_worker: 0.5, torch_threads: 1}}
heartbeat: {{interval_s: 0.5, stale_after_s: 3}}
"""


def test_selection_study_drops_the_harmful_model(zoo_dir, ray_local, store) -> None:
    cfg = StudyConfig.from_yaml(SELECT.format(name="select", kind="average", trials=30))
    register(store, cfg)
    summary = Coordinator(cfg, store).run()
    assert summary.status == "finished", summary.reason
    kept, dropped = summary.reason.removeprefix("selection finished: kept ").split("; dropped ")
    assert sorted(kept.split(", ")) == ["zoo:add", "zoo:reverse"]
    assert dropped.startswith("zoo:harmful: the average with it scored")
    rows = {
        key(Recipe.from_json(r.recipe_json).params["weight"][0]): r for r in store.trials("select")
    }
    assert len(rows) == 5  # three solos, add + reverse, then all three
    whole_family = rows[key((1.6 / 3, 1.6 / 3, 1.6 / 3))].fitness
    chosen = rows[key((0.8, 0, 0.8))].fitness
    assert chosen > whole_family and chosen == summary.best_fitness
    assert store.best("select", top=1)[0].heldout is not None
    by_similarity = cfg.model_copy(
        update={
            "name": "similar",
            "optimizer": cfg.optimizer.model_copy(update={"kind": "similarity"}),
        }
    )
    register(store, by_similarity)
    summary = Coordinator(by_similarity, store).run()
    assert summary.status == "finished", summary.reason
    assert summary.complete == 3 + 2 * len(GRID)
    assert "dropped zoo:harmful: its best coefficient" in summary.reason


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("[zoo:add, zoo:harmful, zoo:reverse]", "[zoo:add]", "two or more"),
        ("high: 1.6", "high: 1.2", r"holding \[0, 1.6\]"),
        ("kind: average", "kind: greedy", "optimizer.kind"),
        ("scale: 1.6", "scale: 0", "optimizer.scale"),
        ("scale: 1.6", "scale: 1.6, start: [1, 0, 1]", "optimizer.start: set by evomerge"),
        ("kind: average, scale: 1.6", "evolve: 3", "optimizer.evolve: follows a selection"),
    ],
)
def test_selection_config_errors(old: str, new: str, error: str) -> None:
    text = SELECT.format(name="bad", kind="average", trials=5)
    assert old in text
    with pytest.raises(ValueError, match=error):
        StudyConfig.from_yaml(text.replace(old, new))


def _kill_when(proc, store: Store, study: str, trials: int) -> None:
    """SIGKILL the CLI once `study` has `trials` trials in the store."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if store.get_study(study, missing_ok=True) and len(store.trials(study)) >= trials:
            break
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3.5)  # the dead run's heartbeat goes stale


@pytest.mark.slow
def test_selection_then_evolution_resumes_after_sigkill_in_each_stage(zoo_dir, tmp_path) -> None:
    """Heuristic then evolutionary selection through the CLI, SIGKILLed once in each stage:
    the selection ends as an uninterrupted one would, scoring no candidate twice, and the
    evolve stage starts where the selection ended and never does worse."""
    url = f"sqlite:///{tmp_path / 'select.db'}"
    cfg_path = tmp_path / "select.yaml"
    text = SELECT.format(name="sel", kind="coefficient", trials=40)
    cfg_path.write_text(text.replace("scale: 1.6}", "scale: 1.6, evolve: 6}"))
    env = {**os.environ, "EVOMERGE_STORAGE": url, "COLUMNS": "300"}
    store = Store(url)
    store.migrate()
    proc = _evomerge("run", str(cfg_path), env=env)
    _kill_when(proc, store, "sel", 6)
    proc = _evomerge("resume", "sel", env=env)
    _kill_when(proc, store, "sel-evolve", 2)
    proc = _evomerge("resume", "sel", env=env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "selection finished: kept zoo:" in out and "dropped zoo:harmful" in out
    study = optuna.load_study(study_name="sel", storage=store.optuna_storage())
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert len({key(t.params.values()) for t in done}) == len(done)
    assert len(done) == 3 + 2 * len(GRID)
    selected = store.best("sel", top=1)[0]
    evolved = [r for r in store.trials("sel-evolve") if r.state == "COMPLETE"]
    assert len(evolved) == 6
    first = Recipe.from_json(store.trials("sel-evolve")[0].recipe_json)
    assert first.params["weight"] == Recipe.from_json(selected.recipe_json).params["weight"]
    assert max(r.fitness for r in evolved) >= selected.fitness
