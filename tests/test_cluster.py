"""evomerge on a real multi-node Ray cluster and on PostgreSQL under concurrent writers.

The cluster is made of real `ray start` nodes on this machine, each in its own process
session: a head and, for the node-loss test, a second raylet with its own resources. Killing
that session kills the node (raylet, its workers, its agents) and nothing else, so other Ray
instances on the machine are never touched (`ray stop` would kill every one of them).
Coordinators run in subprocesses (`evomerge run`) so their drivers join as real clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import psutil
import pytest
from fastapi.testclient import TestClient
from optuna.trial import TrialState

from storage import Store

pytestmark = pytest.mark.postgres

RAY = str(Path(sys.executable).with_name("ray"))

CONFIG = """
name: {name}
zoo: test
base: zoo:base
sources: [zoo:add, zoo:reverse]
method: task_arithmetic
granularity: 1
search: {{weight: {{low: 0, high: 1}}}}
fitness: {{tasks: [zoo:add, zoo:reverse], limit: 24, heldout_limit: 24}}
optimizer: {{population: 4}}
budget: {{trials: {trials}, heldout_top_k: 2}}
workers: {{count: {workers}, cpus_per_worker: 1, torch_threads: 1, ray_address: "{address}"}}
heartbeat: {{interval_s: 0.5, stale_after_s: 5}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    proc: subprocess.Popen
    temp_dir: Path
    log: Path

    @property
    def session(self) -> int:
        """The node's process session: `ray start --block` and everything it spawned."""
        return self.proc.pid

    def processes(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.session:
                    out.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        return out

    def kill(self) -> None:
        """SIGKILL the whole node at once, the way a machine drops off the network."""
        procs = self.processes()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.session, signal.SIGKILL)
        for p in procs:  # anything that left the process group but not the session
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        self.proc.wait(timeout=10)


@dataclass
class RayCluster:
    """Ray nodes started with the real CLI, each `--block`ed in its own session.

    Every node gets its own temp dir (so `ray.init()` elsewhere never discovers this
    cluster), its own ports, and a token shared only with this cluster's processes.
    """

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    address: str = ""
    slot: int = field(default_factory=lambda: secrets.randbelow(4))

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "TOKENIZERS_PARALLELISM": "false",
            # the GCS declares a silent node dead after ~3 s instead of ~15 s, so that a
            # study outlives the death and its lost actors sit in RESTARTING meanwhile
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "2000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.env.pop("RAY_ADDRESS", None)

    def _start(self, name: str, args: list[str]) -> Node:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"evr-{name}-", dir="/tmp"))  # short: sockets
        log = self.root / f"{name}.log"
        # worker ports below the ephemeral range that free_port() draws from, and below
        # none of Ray's default range (10002-19999) that local Ray instances use
        low = 20000 + 1000 * len(self.nodes) + 3000 * self.slot
        proc = subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                f"--temp-dir={temp_dir}",
                "--object-store-memory=150000000",
                "--dashboard-agent-listen-port=0",
                f"--min-worker-port={low}",
                f"--max-worker-port={low + 999}",
                "--disable-usage-stats",
                *args,
            ],
            env=self.env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        node = Node(proc, temp_dir, log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int, resources: dict[str, float]) -> Node:
        port = free_port()
        node = self._start(
            "head",
            [
                "--head",
                f"--port={port}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--resources={json.dumps(resources)}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-port={free_port()}",
            ],
        )
        self.address = f"127.0.0.1:{port}"
        self._wait_nodes(1, node)
        return node

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float]) -> Node:
        node = self._start(
            name,
            [
                f"--address={self.address}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--resources={json.dumps(resources)}",
            ],
        )
        self._wait_nodes(len(self.nodes), node)
        return node

    def alive_nodes(self) -> list[dict]:
        """`ray.nodes()` as seen by a throwaway driver (the test process stays Ray-free)."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False, "
            "configure_logging=False); print('NODES=' + json.dumps([n['Resources'] "
            "for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        line = next(x for x in out.stdout.splitlines() if x.startswith("NODES="))
        return json.loads(line.removeprefix("NODES="))

    def _wait_nodes(self, count: int, node: Node) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert node.proc.poll() is None, node.log.read_text()[-3000:]
            started = "Ray runtime started" in node.log.read_text()
            if started and len(self.alive_nodes()) >= count:
                return
            time.sleep(1)
        raise AssertionError(f"Ray node did not join: {node.log.read_text()[-3000:]}")

    def teardown(self) -> None:
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node
        for node in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=20)
            node.kill()  # whatever is left in the node's session
            shutil.rmtree(node.temp_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RayCluster]:
    c = RayCluster(tmp_path)
    try:
        yield c
    finally:
        c.teardown()


def start_study(
    cluster: RayCluster, url: str, tmp_path: Path, name: str, trials: int, workers: int
) -> tuple[subprocess.Popen, Path]:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        CONFIG.format(name=name, trials=trials, workers=workers, address=cluster.address)
    )
    log = tmp_path / f"{name}.out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "run", str(cfg), "--storage", url],
        env={**cluster.env, "COLUMNS": "120"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(
            f"coordinator still running after {timeout} s:\n{log.read_text()}"
        ) from e
    out = log.read_text()
    assert proc.returncode == 0, out
    return out


def trial_rows(store: Store, name: str) -> list:
    return store.trials(name) if store.get_study(name, missing_ok=True) else []


def assert_accounted_for(store: Store, name: str, budget: int) -> None:
    """Every trial accounted for, in Optuna's tables and in evomerge's, and they agree."""
    study = optuna.load_study(study_name=name, storage=store.optuna_storage())
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "duplicated Optuna trial numbers"
    assert sum(t.state == TrialState.COMPLETE for t in trials) == budget
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    rows = store.trials(name)
    assert [r.number for r in rows] == sorted(numbers), "evomerge rows != Optuna trials"
    assert not [r.number for r in rows if r.state == "RUNNING"]
    assert all(r.error for r in rows if r.state == "FAIL")
    states = {t.number: t.state.name for t in trials}
    assert {r.number: r.state for r in rows} == states
    values = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    assert {r.number: r.fitness for r in rows if r.state == "COMPLETE"} == pytest.approx(values)


def is_candidate_worker(p: psutil.Process) -> bool:
    try:
        return "CandidateWorker" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def worker_pid(row) -> int:
    return int(row.worker.split(":")[1])


@pytest.mark.slow
def test_study_survives_losing_a_node(zoo_dir, pg_url, cluster, tmp_path):
    """Workers on two nodes; the second node is SIGKILLed mid-study; the study completes."""
    cluster.start_head(num_cpus=1, resources={"node_head": 1})
    node_b = cluster.add_node("node-b", num_cpus=2, resources={"node_b": 2})
    store = Store(pg_url)
    store.migrate()
    name, budget = "two-nodes", 40
    t0 = time.monotonic()
    proc, log = start_study(cluster, pg_url, tmp_path, name, budget, workers=3)

    # Wait until the three actors are up (one on the head, two on node B) and node B's
    # workers have completed trials.
    pids_b: set[int] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        done = [r for r in trial_rows(store, name) if r.state == "COMPLETE"]
        pids_b |= {p.pid for p in node_b.processes() if is_candidate_worker(p)}
        if len(done) >= 4 and {worker_pid(r) for r in done} & pids_b:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no trial completed on node B in time:\n{log.read_text()}")
    before = trial_rows(store, name)
    by_node = {
        "b": {worker_pid(r) for r in before if r.worker and worker_pid(r) in pids_b},
        "head": {worker_pid(r) for r in before if r.worker and worker_pid(r) not in pids_b},
    }
    assert len(pids_b) == 2, f"expected two actors on node B, found {pids_b}"
    assert by_node["b"] and by_node["head"], f"trials did not run on both nodes: {by_node}"
    assert sum(r.state == "COMPLETE" for r in before) < budget, "the study ended too early"
    t_kill = time.monotonic()
    node_b.kill()
    assert not node_b.processes()

    out = finish(proc, log, timeout=600)
    t_end = time.monotonic()
    assert "finished" in out and "worker died during trial" in out
    assert_accounted_for(store, name, budget)
    rows = store.trials(name)
    # the trials running when node B died (some of them on it) completed after all
    running_at_kill = {r.number for r in before if r.state == "RUNNING"}
    final = {r.number: r for r in rows}
    assert all(final[n].state == "COMPLETE" for n in running_at_kill), running_at_kill
    after = [r for r in rows if r.finished_at and r.number not in {b.number for b in before}]
    assert after and all(worker_pid(r) not in pids_b for r in after if r.worker)
    # Ray saw a node die, not a worker crash: the GCS declares node B dead (health checks).
    deadline = time.monotonic() + 90
    while len(alive := cluster.alive_nodes()) > 1 and time.monotonic() < deadline:
        time.sleep(2)
    assert len(alive) == 1 and "node_head" in alive[0], alive
    reran = sorted({int(n) for n in re.findall(r"worker died during trial (\d+)", out)})
    print(
        f"\nnode loss: {len(before)} trials before the kill at {t_kill - t0:.0f} s, "
        f"finished at {t_end - t0:.0f} s; reran after a worker death: {reran}"
    )


@pytest.mark.slow
def test_postgres_under_concurrent_coordinators_and_dashboard(zoo_dir, pg_url, cluster, tmp_path):
    """Three coordinators on three studies in one database, the dashboard polled throughout."""
    from evomerge.dashboard import create_app

    cluster.start_head(num_cpus=3, resources={})
    store = Store(pg_url)
    store.migrate()
    budgets = {"conc-a": 6, "conc-b": 7, "conc-c": 5}
    procs = {
        name: start_study(cluster, pg_url, tmp_path, name, trials, workers=1)
        for name, trials in budgets.items()
    }
    app = create_app(pg_url, run_dir=tmp_path / "runs", export_dir=tmp_path / "exports")
    statuses: list[tuple[str, int]] = []
    stop = threading.Event()

    def poll() -> None:
        with TestClient(app, base_url="http://127.0.0.1") as client:
            while not stop.is_set():
                for name in budgets:
                    paths = ["/", "/best"]
                    rows = trial_rows(store, name)
                    if rows:
                        paths += [f"/studies/{name}", f"/studies/{name}/live"]
                        paths.append(f"/studies/{name}/trials/{rows[-1].number}")
                    statuses.extend((p, client.get(p).status_code) for p in paths)
                time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    t0 = time.monotonic()
    poller.start()
    try:
        for proc, log in procs.values():
            finish(proc, log, timeout=max(60, 600 - (time.monotonic() - t0)))
    finally:
        stop.set()
        poller.join(timeout=60)
    seconds = time.monotonic() - t0
    assert statuses, "the dashboard was never polled"
    bad = [s for s in statuses if s[1] != 200]
    assert not bad, bad[:10]
    assert any(p.endswith("/live") for p, _ in statuses)
    for name, budget in budgets.items():
        assert_accounted_for(store, name, budget)
        assert store.get_study(name).status == "finished"
    optuna_names = set(optuna.get_all_study_names(store.optuna_storage()))
    runs = [store.runs(name)[0] for name in budgets]
    assert max(r.started_at for r in runs) < min(r.ended_at for r in runs), "not concurrent"
    assert optuna_names == set(budgets)
    print(f"\n3 studies, {sum(budgets.values())} trials, {len(statuses)} pages in {seconds:.0f} s")


OPEN_OPTUNA = """
import sys, time
from storage import Store
store = Store(sys.argv[1])
while time.time() < float(sys.argv[2]):
    pass
store.optuna_storage()
"""


def test_processes_opening_a_fresh_database_at_once_all_get_optuna_storage(pg_url):
    """Optuna creates its tables on first use; four processes at once must not collide."""
    start = time.time() + 3  # all past their imports, then into Optuna's create_all together
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_OPTUNA, pg_url, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outs)
