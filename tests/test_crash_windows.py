"""Crash windows: a coordinator SIGKILLed at each step of a trial's life, then one resume.

Each slow case runs a real `evomerge run` with `EVOMERGE_KILL_AT` naming a kill point
(evomerge.killpoints), so the process SIGKILLs itself exactly there, then runs a single
`evomerge resume` at once (the dead pid on this host lets it take over without waiting for
the heartbeat to go stale). The resume must succeed and complete the budget, Optuna's and
evomerge's trials must agree one for one, and no parameters may be asked more than twice
(once, and once more as the marked re-ask of a trial the crash abandoned).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections import Counter

import optuna
import pytest
import ray
from optuna.trial import TrialState

from evomerge.config import StudyConfig
from evomerge.coordinator import RERUN_OF, Coordinator
from evomerge.killpoints import ENV, KILL_POINTS
from storage import REASKED, Store
from tests.test_coordinator import _evomerge as start_evomerge
from tests.test_dataflow_study import PS_DFS

STUDY = """
name: crash
zoo: test
base: zoo:base
sources: [zoo:add, zoo:reverse]
method: task_arithmetic
granularity: 2
search: {weight: {low: 0, high: 1}}
fitness: {tasks: [zoo:add, zoo:reverse], limit: 16, heldout_limit: 16}
optimizer: {population: 4}
budget: {trials: 4, heldout_top_k: 2}
workers: {count: 2, cpus_per_worker: 0.5, torch_threads: 1}
heartbeat: {interval_s: 0.5, stale_after_s: 60}
"""
# The kill point, and which time it is reached: late enough that some trials are done.
WHEN = {
    "asked": 3,
    "recorded": 3,
    "submitted": 3,
    "stored": 3,
    "told": 3,
    "heldout-stored": 1,
    "stage-1-finished": 1,
}
assert set(WHEN) == set(KILL_POINTS)


def assert_repaired(store: Store, name: str, budget: int) -> None:
    """Budget reached, both stores agree trial by trial, nothing asked more than twice."""
    study = optuna.load_study(study_name=name, storage=store.optuna_storage())
    trials = study.get_trials(deepcopy=False)
    rows = {r.number: r for r in store.trials(name)}
    assert {t.number: t.state.name for t in trials} == {n: r.state for n, r in rows.items()}
    assert sum(t.state == TrialState.COMPLETE for t in trials) == budget
    by_params = Counter(tuple(sorted(t.params.items())) for t in trials)
    for t in trials:
        if by_params[tuple(sorted(t.params.items()))] > 1 and RERUN_OF not in t.user_attrs:
            assert rows[t.number].error.endswith(REASKED), rows[t.number]
    assert max(by_params.values()) <= 2
    reasked = [t.user_attrs[RERUN_OF] for t in trials if RERUN_OF in t.user_attrs]
    assert len(reasked) == len(set(reasked))


def test_resume_repairs_a_trial_asked_outside_evomerge(zoo_dir, store):
    """The issue's reproduction: `load_study(...).ask()`, then resume. Then a resume of the
    finished study ends at once, without starting Ray or a worker."""
    cfg = StudyConfig.from_yaml(STUDY.replace("trials: 4", "trials: 2"))
    store.create_study(cfg.name, cfg.to_yaml(), optuna_study_name=cfg.name, budget_trials=2)
    Coordinator(cfg, store)  # creates the Optuna study, as a run killed at start-up would
    optuna.load_study(study_name=cfg.name, storage=store.optuna_storage()).ask()
    ray.shutdown()
    try:
        summary = Coordinator(cfg, store).run()
        assert summary.status == "finished" and summary.complete == 2, summary.reason
        assert_repaired(store, cfg.name, 2)
        first = store.trial(cfg.name, 0)
        assert first.state == "FAIL" and first.error.endswith(REASKED)
        study = optuna.load_study(study_name=cfg.name, storage=store.optuna_storage())
        rerun = [t for t in study.trials if t.user_attrs.get(RERUN_OF) == 0]
        assert len(rerun) == 1 and rerun[0].params == study.trials[0].params
    finally:
        ray.shutdown()
    again = Coordinator(cfg, store).run()
    assert again.status == "finished" and not ray.is_initialized()


def _evomerge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = start_evomerge(*args, env=env)
    try:
        out, _ = proc.communicate(timeout=420)
    finally:
        # A SIGKILLed driver may leave its local Ray behind: end the session's processes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_one_resume_repairs_a_kill_at(point, backend, zoo_dir, tmp_path, request):
    chained = point == "stage-1-finished"
    url = (
        request.getfixturevalue("pg_url")
        if backend == "postgres"
        else f"sqlite:///{tmp_path / 'crash.db'}"
    )
    config = tmp_path / "study.yaml"
    config.write_text(PS_DFS if chained else STUDY)
    name = "psdfs" if chained else "crash"
    env = {**os.environ, "EVOMERGE_STORAGE": url, ENV: f"{point}:{WHEN[point]}"}
    killed = _evomerge("run", str(config), env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    del env[ENV]
    resumed = _evomerge("resume", name, env=env)
    assert resumed.returncode == 0, resumed.stdout
    # the trials the kill interrupted were re-asked, not failed
    assert set(re.findall(r"(\d+) failed in", " ".join(resumed.stdout.split()))) == {"0"}
    store = Store(url)
    store.migrate()
    assert_repaired(store, name, 4)
    assert all(r.heldout is not None for r in store.best(name, top=1))
    if chained:
        assert_repaired(store, f"{name}-dfs", 4)
    assert [r.status for r in store.runs(name)][-1] == "finished"
