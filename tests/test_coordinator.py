"""The search service end to end: real zoo, real merges, real Ray workers, real databases."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
import torch

from evomerge.config import StudyConfig
from evomerge.coordinator import GENERATION_ATTR, Coordinator
from evomerge.recipe import Recipe
from storage import Store
from storage.schema import runs
from tests.test_dataflow_study import DFS
from workers.actor import CandidateWorker, TrialResult

CONFIG = """
name: {name}
zoo: test
base: zoo:base
sources: [zoo:add, zoo:reverse]
method: task_arithmetic
granularity: 2
search: {{weight: {{low: 0, high: 1}}}}
fitness: {{tasks: [zoo:add, zoo:reverse], limit: 24, heldout_limit: 24}}
optimizer: {{population: 4}}
budget: {{trials: {trials}, heldout_top_k: 2}}
workers: {{count: 2, cpus_per_worker: 0.5, torch_threads: 1}}
heartbeat: {{interval_s: 0.5, stale_after_s: 3}}
"""


def make_config(name: str, trials: int = 8) -> StudyConfig:
    return StudyConfig.from_yaml(CONFIG.format(name=name, trials=trials))


def register(store: Store, cfg: StudyConfig) -> None:
    store.create_study(
        cfg.name, cfg.to_yaml(), optuna_study_name=cfg.name, budget_trials=cfg.budget.trials
    )


def generations(store: Store, name: str) -> list[int]:
    study = optuna.load_study(study_name=name, storage=store.optuna_storage())
    return [t.system_attrs.get(GENERATION_ATTR, -1) for t in study.get_trials(deepcopy=False)]


def test_search_runs_records_and_rescores(zoo_dir, ray_local, store):
    cfg = make_config("e2e")
    register(store, cfg)
    summary = Coordinator(cfg, store).run()
    assert summary.status == "finished", summary.reason
    assert summary.complete == cfg.budget.trials
    rows = store.trials(cfg.name)
    assert [r.number for r in rows] == list(range(len(rows)))
    done = [r for r in rows if r.state == "COMPLETE"]
    assert len(done) == cfg.budget.trials
    assert all(set(r.metrics) == {"add", "reverse"} and r.build_seconds > 0 for r in done)
    # every trial was proposed by CMA-ES, none by the random start-up sampler
    assert all(g >= 0 for g in generations(store, cfg.name))
    best = store.best(cfg.name, top=2)
    assert all(r.heldout is not None for r in best)
    recipe = Recipe.from_json(best[0].recipe_json)
    assert recipe.sources == cfg.sources and recipe.method == "task_arithmetic"
    assert optuna.load_study(
        study_name=cfg.name, storage=store.optuna_storage()
    ).best_value == pytest.approx(max(r.fitness for r in done))


def test_a_stop_on_an_earlier_stage_stops_the_chain(zoo_dir, ray_local, store):
    """PS+DFS's stage 2 runs under its own name; Stop pressed on the study the user started
    (stage 1, finished) stops it too, and is then cleared on both."""
    first, second = make_config("chain"), make_config("chain-dfs", trials=40)
    register(store, first)
    register(store, second)
    store.request_stop("chain", "stop")
    summary = Coordinator(second, store, stop_from=("chain",)).run()
    assert (summary.status, summary.reason) == ("stopped", "stop requested")
    assert summary.complete < second.budget.trials
    assert store.stop_request("chain") is None and store.stop_request("chain-dfs") is None


class NeverStartsWorker(CandidateWorker):
    """A run that starts workers with this class fails (`WorkerStartError`)."""

    def __init__(self, spec) -> None:
        raise RuntimeError("this run should have needed no worker")


def test_wall_time_is_the_studys_over_all_its_runs(zoo_dir, ray_local, sqlite_store):
    """A study that ended on its wall time is spent: a resume ends at once, starting no
    worker (at 7B that is minutes of loading), instead of searching another window."""
    yaml = CONFIG.format(name="wall", trials=40).replace("heldout_top_k: 2", "wall_time_s: 1")
    cfg = StudyConfig.from_yaml(yaml)
    register(sqlite_store, cfg)
    first = Coordinator(cfg, sqlite_store).run()
    assert (first.status, first.reason) == ("finished", "wall time reached")
    trials = len(sqlite_store.trials("wall"))
    again = Coordinator(cfg, sqlite_store, worker_cls=NeverStartsWorker).run()
    assert (again.status, again.reason) == ("finished", "wall time reached")
    assert len(sqlite_store.trials("wall")) == trials
    assert [r.exit_reason for r in sqlite_store.runs("wall")] == ["wall time reached"] * 2


def test_a_crashed_runs_downtime_is_not_search_time(zoo_dir, ray_local, sqlite_store):
    """A run killed after 10 s and resumed an hour later has spent 10 s of the study's wall
    time (to its last heartbeat), not the hour until the resume took over."""
    budget = "heldout_top_k: 0, wall_time_s: 600"
    cfg = StudyConfig.from_yaml(
        CONFIG.format(name="down", trials=2).replace("heldout_top_k: 2", budget)
    )
    register(sqlite_store, cfg)
    sqlite_store.start_run("down", pid=1, host="elsewhere", stale_after_s=3)
    beat = datetime.now(UTC) - timedelta(hours=1)
    with sa.create_engine(sqlite_store.url).begin() as conn:
        conn.execute(
            sa.update(runs).values(started_at=beat - timedelta(seconds=10), heartbeat_at=beat)
        )
    summary = Coordinator(cfg, sqlite_store).run()
    assert (summary.status, summary.reason, summary.complete) == ("finished", "budget reached", 2)
    assert [r.status for r in sqlite_store.runs("down")] == ["interrupted", "finished"]


class StopsDuringHeldout(Store):
    """A store on which a user presses Stop as soon as one held-out score is recorded."""

    def record_heldout(self, study: str, number: int, metrics, fitness) -> None:
        super().record_heldout(study, number, metrics, fitness)
        self.request_stop(study, "stop")


def test_a_stop_during_heldout_rescoring_ends_the_run(zoo_dir, ray_local, tmp_path):
    """Rescoring the top k takes minutes at 7B: a stop ends it (running ones finish, no
    more start), and a resume rescores the rest."""
    cfg = StudyConfig.from_yaml(
        CONFIG.format(name="ho", trials=8).replace("heldout_top_k: 2", "heldout_top_k: 6")
    )
    store = StopsDuringHeldout(f"sqlite:///{tmp_path / 'ho.db'}")
    store.migrate()
    register(store, cfg)
    summary = Coordinator(cfg, store).run()
    assert (summary.status, summary.reason) == (
        "stopped",
        "stop requested during held-out rescoring",
    )
    scored = [r for r in store.trials("ho") if r.heldout is not None]
    assert 1 <= len(scored) < 6 and store.stop_request("ho") is None
    plain = Store(store.url)
    assert Coordinator(cfg, plain).run().status == "finished"
    assert len([r for r in plain.trials("ho") if r.heldout is not None]) == 6


class DiesOnceWorker(CandidateWorker):
    """Its process exits in the middle of its first evaluation (a real crash, once), and in
    every held-out one (a candidate that kills its worker each time it is scored)."""

    def evaluate(self, recipe_json: str, split: str = "search") -> TrialResult:
        marker = Path(os.environ["EVOMERGE_TEST_MARKER"])
        if split == "held-out":
            os._exit(1)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().evaluate(recipe_json, split)


@pytest.fixture
def sqlite_store(tmp_path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'study.db'}")
    store.migrate()
    return store


@pytest.mark.slow
def test_worker_death_reruns_the_trial(zoo_dir, ray_local, sqlite_store, tmp_path, monkeypatch):
    import ray

    store = sqlite_store
    marker = tmp_path / "died"
    ray.shutdown()
    monkeypatch.setenv("EVOMERGE_TEST_MARKER", str(marker))
    from workers.pool import connect

    connect(None, num_cpus=2)
    yaml = CONFIG.format(name="dies", trials=4).replace("heldout_top_k: 2", "heldout_top_k: 1")
    cfg = StudyConfig.from_yaml(yaml)
    register(store, cfg)
    summary = Coordinator(cfg, store, worker_cls=DiesOnceWorker).run()
    assert marker.exists(), "the worker never died"
    rows = store.trials(cfg.name)
    assert summary.complete == 4 and summary.failed == 0, [r.error for r in rows]
    assert len(rows) == 4 and sorted(r.attempts for r in rows)[-2:] == [1, 2]  # the rerun
    # the held-out rescoring gave up after three deaths instead of restarting workers forever
    (best,) = store.best(cfg.name, top=1)
    assert summary.status == "finished" and best.heldout is None
    assert summary.reason == (
        f"budget reached; held-out rescoring failed for trial {best.number} (worker died 3 times)"
    )


class DeviceFaultOnceWorker(CandidateWorker):
    """Its first candidate hits a CUDA error that poisons the process's context, as an
    illegal address or a device-side assert does: on the CPU, the error is raised and the
    device probe fails from then on."""

    def candidate(self, recipe: Recipe) -> torch.nn.Module:
        marker = Path(os.environ["EVOMERGE_TEST_MARKER"])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            self.faulted = True
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return super().candidate(recipe)

    def device_works(self) -> bool:
        return not getattr(self, "faulted", False)


def test_a_device_fault_fails_the_trial_and_restarts_its_worker(
    zoo_dir, ray_local, sqlite_store, tmp_path, monkeypatch
):
    """A broken CUDA context fails every later call: the trial is a FAIL that names the
    error, the worker comes back as a fresh process, and the search goes on. The trial
    queued behind it (`workers.queue: 2`) never runs on the broken process: it reruns."""
    import ray

    from workers.pool import connect

    marker = tmp_path / "faulted"
    ray.shutdown()  # the actors see the marker's path only in a Ray started after this
    monkeypatch.setenv("EVOMERGE_TEST_MARKER", str(marker))
    connect(None, num_cpus=2)
    yaml = CONFIG.format(name="fault", trials=4).replace("heldout_top_k: 2", "heldout_top_k: 0")
    cfg = StudyConfig.from_yaml(yaml.replace("count: 2", "count: 1, queue: 2"))
    register(sqlite_store, cfg)
    summary = Coordinator(cfg, sqlite_store, worker_cls=DeviceFaultOnceWorker).run()
    assert (summary.status, summary.complete, summary.failed) == ("finished", 4, 1)
    (failed,) = sqlite_store.trials("fault", state="FAIL")
    assert failed.error == (
        "AcceleratorError: CUDA error: an illegal memory access was encountered"
        " (the device's context is unusable: the worker restarts)"
    )
    faulted_pid = marker.read_text()
    assert failed.worker.split(":")[1] == faulted_pid
    later = [r for r in sqlite_store.trials("fault") if r.number > failed.number]
    assert later and all(r.worker.split(":")[1] != faulted_pid for r in later)
    assert later[0].attempts == 2  # queued behind the fault: its first attempt died with it


class NaNOnOddTrialsWorker(CandidateWorker):
    """Builds the real candidate, then poisons one weight on every other call."""

    calls = 0

    def evaluate(self, recipe_json: str, split: str = "search") -> TrialResult:
        type(self).calls += 1
        if type(self).calls % 2:
            return super().evaluate(recipe_json, split)
        with torch.no_grad():
            self.model.get_input_embeddings().weight[0, 0] = float("nan")
            result = TrialResult(worker=self.name)
            score = self._evaluators[split].score(self.model, self.sources.tokenizer)
        result.error = f"non-finite fitness {score.fitness}"
        return result


@pytest.mark.slow
def test_nan_candidate_is_a_failure_and_the_search_goes_on(zoo_dir, ray_local, sqlite_store):
    store = sqlite_store
    cfg = make_config("nan", trials=4)
    register(store, cfg)
    summary = Coordinator(cfg, store, worker_cls=NaNOnOddTrialsWorker).run()
    assert summary.status == "finished" and summary.complete == 4 and summary.failed >= 1
    failed = store.trials(cfg.name, state="FAIL")
    assert failed and all("non-finite" in r.error and r.fitness is None for r in failed)


def _evomerge(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "config"),
    [
        ("sqlite", CONFIG),
        pytest.param("postgres", CONFIG, marks=pytest.mark.postgres),
        ("sqlite", DFS),  # a data-flow study resumes the same way
    ],
    ids=["sqlite", "postgres", "sqlite-dataflow"],
)
def test_resume_after_sigkill(zoo_dir, backend, config, tmp_path, request):
    """SIGKILL the coordinator three times at random moments; resume; nothing lost."""
    url = (
        request.getfixturevalue("pg_url")
        if backend == "postgres"
        else f"sqlite:///{tmp_path / 'kill.db'}"
    )
    budget = 14
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(config.format(name="killed", trials=budget))
    env = {**os.environ, "EVOMERGE_STORAGE": url}
    rng = random.Random(7)
    store = Store(url)
    store.migrate()
    proc = _evomerge("run", str(cfg_path), env=env)
    gens_seen = []
    for _ in range(3):
        time.sleep(rng.uniform(12, 25))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        gens_seen.append(max(generations(store, "killed"), default=-1))
        time.sleep(3.5)  # the dead run's heartbeat goes stale
        proc = _evomerge("resume", "killed", env=env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    study = optuna.load_study(study_name="killed", storage=store.optuna_storage())
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == budget
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    rows = store.trials("killed")
    assert {r.number for r in rows} == set(numbers)
    assert len(store.runs("killed")) == 4
    # CMA-ES kept counting generations across runs instead of restarting from its mean
    final = max(generations(store, "killed"))
    assert final >= max(gens_seen) and final >= 2


@pytest.mark.slow
def test_second_coordinator_is_refused_then_resume_takes_over(zoo_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'two.db'}"
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(CONFIG.format(name="two", trials=40))
    env = {**os.environ, "EVOMERGE_STORAGE": url}
    first = _evomerge("run", str(cfg_path), env=env)
    store = Store(url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        store.migrate()
        if store.get_study("two", missing_ok=True) and store.runs("two"):
            break
        time.sleep(0.5)
    second = _evomerge("resume", "two", env=env)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 3 and "already being run" in " ".join(out.split()), out
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(3.5)
    third = _evomerge("resume", "two", env=env)

    deadline = time.monotonic() + 120
    while len(store.runs("two")) < 2:  # registered: its workers may not have started yet
        assert time.monotonic() < deadline and third.poll() is None, third.communicate()[0]
        time.sleep(0.2)
    # SIGTERM ends the run as stopped, not as an error; here from a container's dashboard,
    # which stops its host's runs when it is stopped (`docker compose stop`)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dashboard = _evomerge("dashboard", "--port", str(port), "--stop-runs-on-exit", env=env)
    deadline = time.monotonic() + 60
    while True:  # serving, so its signal handlers are set
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
            break
        assert time.monotonic() < deadline and dashboard.poll() is None
        time.sleep(0.2)
    dashboard.send_signal(signal.SIGTERM)
    said, _ = dashboard.communicate(timeout=120)
    assert f"stopping this host's runs: two (pid {third.pid})" in said, said
    assert third.poll() is not None, "the dashboard returned before the run ended"
    out, _ = third.communicate(timeout=300)
    with contextlib.suppress(ProcessLookupError):  # a Ray it was starting, if any
        os.killpg(third.pid, signal.SIGKILL)
    assert third.returncode != 0 and "`evomerge resume two` goes on" in " ".join(out.split())
    runs = store.runs("two")
    assert [(r.status, r.exit_reason) for r in runs][-1] == ("stopped", "terminated"), out
    assert len(runs) == 2 and store.get_study("two").status == "stopped"
    assert not store.trials("two", state="RUNNING")
