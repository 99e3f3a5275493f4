"""Start `evomerge` commands as processes of their own, detached from the dashboard.

A run started here is the same `evomerge run`/`resume` a user would type: its own session
(so it outlives a dashboard restart), its output in a log file under `run_dir/STUDY/`, and
its run record written by the coordinator itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from evomerge.config import StudyConfig
from evomerge.dashboard.paths import PathRefused, child
from storage import Store, UnknownStudyError
from storage.lease import process_alive

log = logging.getLogger(__name__)


class LaunchBusy(RuntimeError):
    """The same command for the same study (or export folder) is still running from here."""


@dataclass(frozen=True)
class _Launch:
    process: subprocess.Popen
    at: datetime
    registers: bool  # a run or resume: once its run record exists, the store says the rest


class Launcher:
    """Spawns CLI commands for one study database; logs go under `run_dir`.

    One starting process per study (run, resume, fuse) and per export folder: a second
    click while the first process starts up (a run registers only after its workers start,
    tens of seconds) is refused with `LaunchBusy` instead of spawning a process that would
    fail. Once a run has registered, the store's status decides (a stopped run's process
    may still be winding down when its study is resumed).
    """

    def __init__(self, storage_url: str, run_dir: Path, store: Store | None = None) -> None:
        self.storage_url = storage_url
        self.run_dir = run_dir
        self._store = store
        self._live: dict[str, _Launch] = {}
        self._lock = threading.Lock()

    def folder(self, study: str) -> Path:
        """The study's folder of configs and logs (the name is checked, not trusted)."""
        return child(self.run_dir, study)

    def logs(self, study: str) -> list[Path]:
        """Logs of the commands started for `study`, newest first."""
        try:
            folder = self.folder(study)
        except PathRefused:  # a name that cannot be a folder was never started here
            return []
        return sorted(folder.glob("*.log"), reverse=True) if folder.is_dir() else []

    def start(self, config: StudyConfig) -> Path:
        """`evomerge run` on a snapshot of `config`; returns the log file."""
        folder = self.folder(config.name)
        folder.mkdir(parents=True, exist_ok=True)
        snapshot = folder / f"{_stamp()}-config.yaml"
        snapshot.write_text(config.to_yaml())
        argv = ("run", str(snapshot), "--study", config.name)
        return self._spawn(config.name, config.name, *argv, registers=True)

    def fuse(self, name: str, config: Path) -> Path:
        """`evomerge fuse` of a fusion config (a new job, or the resume of job `name`)."""
        return self._spawn(name, name, "fuse", str(config))

    def resume(self, study: str) -> Path:
        return self._spawn(study, study, "resume", study, registers=True)

    def export(self, study: str, number: int, out: Path) -> Path:
        """`evomerge export` of one trial into `out` (a checked folder)."""
        argv = ("export", study, "--trial", str(number), "--out", str(out))
        return self._spawn(study, f"export:{out}", *argv)

    def busy(self, key: str) -> bool:
        """Whether a process started here for `key` (a study's name, or `export:FOLDER`) is
        still running and, for a run or resume, has not registered its run yet."""
        launch = self._live.get(key)
        if launch is None or launch.process.poll() is not None:
            return False
        return not (launch.registers and self._registered(key, launch.at))

    def _registered(self, study: str, since: datetime) -> bool:
        """Whether `study` has a run that started at `since` or later."""
        if self._store is None:
            return False
        try:
            return any(r.started_at >= since for r in self._store.runs(study))
        except UnknownStudyError:  # a new study its process has not created yet
            return False

    def _spawn(
        self, study: str, key: str, command: str, *args: str, registers: bool = False
    ) -> Path:
        folder = self.folder(study)
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"{_stamp()}-{command}.log"
        argv = [sys.executable, "-m", "evomerge.cli", command, *args, "--storage", self.storage_url]
        with self._lock:  # check and spawn as one: two clicks race through the thread pool
            if self.busy(key):
                raise LaunchBusy(f"the {command} started here for {key} is still running")
            with log.open("ab") as out:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # Plain, wide text: a log is read in a browser, not a terminal.
                    env={**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"},
                )
            self._live[key] = _Launch(process, datetime.now(UTC), registers)
        # Reap the child when it exits, so a long-lived dashboard leaves no zombies.
        threading.Thread(target=process.wait, daemon=True).start()
        return log


def stop_host_runs(store: Store, stale_after_s: float, wait_s: float) -> dict[int, str]:
    """SIGTERM every live run and fusion job of this host (started here or not) and wait up
    to `wait_s` for their processes to end; returns those still alive then (pid: name).

    For a dashboard that is its container's main process: stopping the container stops
    the coordinators and fusion jobs in it, and a SIGTERMed one ends `stopped` and resumes
    at once, where one killed with its container stays `running` until its heartbeat goes
    stale.
    """
    host = socket.gethostname()
    live = {
        run.pid: run.study
        for study in store.list_studies(stale_after_s=stale_after_s)
        if study.status == "running"
        for run in store.runs(study.name)
        if run.status == "running" and run.host == host
    }
    for job in store.list_fusion_jobs(stale_after_s=stale_after_s):
        if job.status == "running" and job.host == host and job.pid is not None:
            live[job.pid] = f"fusion job {job.name}"
    live = {pid: name for pid, name in live.items() if process_alive(pid)}
    if live:
        names = ", ".join(f"{name} (pid {pid})" for pid, name in live.items())
        log.warning("stopping this host's runs: %s", names)
    for pid in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while live and time.monotonic() < deadline:
        time.sleep(0.2)
        live = {pid: name for pid, name in live.items() if process_alive(pid)}
    if live:
        log.warning("still running after %g s: pid %s", wait_s, ", ".join(map(str, live)))
    return live


def _stamp() -> str:
    """A sortable time stamp to the millisecond: file names order by start time."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"


def tail(path: Path, limit: int = 16_384) -> str:
    """The end of a log file, decoded leniently."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", "replace")
