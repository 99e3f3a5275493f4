"""Start `evomerge` commands as processes of their own, detached from the dashboard.

A run started here is the same `evomerge run`/`resume` a user would type: its own session
(so it outlives a dashboard restart), its output in a log file under `run_dir/STUDY/`, and
its run record written by the coordinator itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from evomerge.config import StudyConfig
from evomerge.dashboard.paths import PathRefused, child


class Launcher:
    """Spawns CLI commands for one study database; logs go under `run_dir`."""

    def __init__(self, storage_url: str, run_dir: Path) -> None:
        self.storage_url = storage_url
        self.run_dir = run_dir

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
        return self._spawn(config.name, "run", str(snapshot), "--study", config.name)

    def fuse(self, name: str, config: Path) -> Path:
        """`evomerge fuse` of a fusion config (a new job, or the resume of job `name`)."""
        return self._spawn(name, "fuse", str(config))

    def resume(self, study: str) -> Path:
        return self._spawn(study, "resume", study)

    def export(self, study: str, number: int, out: Path) -> Path:
        """`evomerge export` of one trial into `out` (a checked folder)."""
        return self._spawn(study, "export", study, "--trial", str(number), "--out", str(out))

    def _spawn(self, study: str, command: str, *args: str) -> Path:
        folder = self.folder(study)
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"{_stamp()}-{command}.log"
        argv = [sys.executable, "-m", "evomerge.cli", command, *args, "--storage", self.storage_url]
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
        # Reap the child when it exits, so a long-lived dashboard leaves no zombies.
        threading.Thread(target=process.wait, daemon=True).start()
        return log


def _stamp() -> str:
    """A sortable time stamp to the millisecond: file names order by start time."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"


def tail(path: Path, limit: int = 16_384) -> str:
    """The end of a log file, decoded leniently."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", "replace")
