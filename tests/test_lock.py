"""requirements.lock: every dependency pinned and hashed, within pyproject's ranges, and what
this environment runs; the slow test has pip resolve pyproject against the lock from scratch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# Each machine keeps its own torch build (CPU wheel here, CUDA in the image); see the Makefile.
UNLOCKED = {"torch"}


def locked() -> dict[str, str]:
    """{canonical name: version} of the lock, checking that every pin carries a hash."""
    pins = {}
    for entry in re.split(r"\n(?=\S)", LOCK.read_text()):
        if not entry or entry.startswith("#"):
            continue
        match = re.match(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", entry)
        assert match, f"not an exact pin: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"no hash: {entry.splitlines()[0]}"
        pins[canonicalize_name(match[1].split("[")[0])] = match[2]
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [
        d for ds in project["optional-dependencies"].values() for d in ds
    ]
    return [Requirement(d) for d in deps]


def test_every_declared_dependency_is_locked_within_its_range() -> None:
    pins = locked()
    for req in declared():
        name = canonicalize_name(req.name)
        if name in UNLOCKED:
            assert name not in pins, f"{name} must stay out of the lock"
            continue
        assert name in pins, f"{name} is declared in pyproject.toml but not locked: `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], req)


def test_this_environment_runs_the_locked_versions() -> None:
    pins = locked()
    wrong = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (installed, version)
    assert not wrong, f"installed vs locked (reinstall with `make`): {wrong}"


@pytest.mark.slow
def test_pip_resolves_the_project_to_the_locked_versions(tmp_path: Path) -> None:
    """An empty environment told to use the lock: pip's own resolver, from the registries,
    installs exactly the locked versions (and nothing the lock lacks but torch's own)."""
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        "\n".join(f"{n}=={v}" for n, v in locked().items())
        + f"\ntorch=={metadata.version('torch').split('+')[0]}\n"
    )
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(constraints),
            f"{ROOT}[dev]",
        ],
        check=True,
    )
    chosen = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    pins = locked()
    differ = {n: (v, pins[n]) for n, v in chosen.items() if n in pins and v != pins[n]}
    assert not differ
    extra = set(chosen) - set(pins) - UNLOCKED - {"evomerge"}
    assert all(n.startswith(("nvidia-", "triton")) for n in extra), extra
