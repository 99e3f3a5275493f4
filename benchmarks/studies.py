"""Run a study config through the real `evomerge run`, as a user would, for the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def run_config(config: dict[str, Any], folder: Path, url: str) -> float:
    """Write `config` into `folder` as NAME.yaml, run it into `url`; returns wall seconds."""
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "run", str(path), "--storage", url],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start
