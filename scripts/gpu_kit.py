"""What the GPU checks need on a lent GPU machine that its image lacks, in one folder.

    .venv/bin/python scripts/gpu_kit.py [--python 3.12] [--dest .whl]

The GPU machines lent to this project's sessions reach no package index, their image has
torch, transformers and most of the scientific stack but not Ray, Optuna or SQLAlchemy, and
a call carries at most 64 MiB with the working tree. Into `--dest` (ignored by git) this
puts, at the versions of requirements.lock and for that machine's Python:

- the wheels of CARRY;
- Ray as a tar.xz of its installed files, less its Java jars and RLlib (the wheel is 79 MB,
  and even slimmed its native binaries do not compress enough as a zip to fit beside the rest);
- the test zoo's manifest, task data and the four models the GPU study merges, as
  `cache/zoo/...` (building the zoo there would take minutes of device time).

`scripts/gpu_check.sh` installs them there, files the zoo under the key that machine's
torch and transformers give (`--adopt-zoo`), and runs every GPU check in one call.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# What the GPU checks import (benchmarks.scale, benchmarks.gpu_workers, tests/test_placement.py
# and the study path: Ray actors, Optuna's CMA-ES, SQLite through SQLAlchemy) that the
# 'cuda' image lacks (its package list: the device tool's KINDS.md). Its own transformers
# (5.17, older than the lock's) serves: found by running the checks in a venv holding only
# that image's packages and versions (`scripts/gpu_check.sh --rehearse`, on the CPU).
CARRY = (
    "alembic",
    "annotated-types",
    "cmaes",
    "colorlog",
    "jsonschema",
    "jsonschema-specifications",
    "mako",
    "mergekit",
    "optuna",
    "platformdirs",
    "pydantic",
    "pydantic-core",
    "referencing",
    "rpds-py",
    "sqlalchemy",
    "typing-inspection",
)
RAY = "ray"
SLIM = ("ray/jars/", "ray/rllib/")  # never imported by a worker; 34 MB of Ray's wheel
ZOO_PARTS = ("zoo.json", "tasks", "base", "add", "reverse", "translate")  # benchmarks.gpu_workers
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """Distribution name -> pinned version, from the hash-pinned lock."""
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", lock.read_text(), re.MULTILINE)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def download(names: tuple[str, ...], python: str, dest: Path) -> None:
    pins = locked_versions()
    missing = [n for n in names if n not in pins]
    if missing:
        raise SystemExit(f"{LOCK.name} pins no {missing}: refresh CARRY or the lock")
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", python, "--implementation", "cp", *platforms, "-d", str(dest),
         *(f"{n}=={pins[n]}" for n in names)],
        check=True,
    )  # fmt: skip


def ray_archive(wheel: Path, dest: Path) -> Path:
    """Ray's `wheel` unpacked, less SLIM, as `dest/ray-VERSION.tar.xz`: what `pip install
    --target` would lay out (no console scripts: a worker starts Ray from Python)."""
    out = dest / (wheel.name.split("-cp")[0] + ".tar.xz")
    with zipfile.ZipFile(wheel) as src, tarfile.open(out, "w:xz", preset=9) as tar:
        for item in src.infolist():
            if item.is_dir() or item.filename.startswith(SLIM):
                continue
            info = tarfile.TarInfo(item.filename)
            info.size = item.file_size
            info.mode = (item.external_attr >> 16) & 0o777 or 0o644  # keeps raylet executable
            with src.open(item) as f:
                tar.addfile(info, f)
    return out


def zoo_subset(dest: Path) -> Path:
    """The test zoo's parts the GPU study reads, under `dest/cache` as $EVOMERGE_CACHE."""
    from evomerge.zoo import build_zoo

    zoo = build_zoo("test")
    out = dest / "cache" / "zoo" / zoo.name
    shutil.rmtree(dest / "cache", ignore_errors=True)
    out.mkdir(parents=True)
    for part in ZOO_PARTS:
        (shutil.copytree if (zoo / part).is_dir() else shutil.copy)(zoo / part, out / part)
    return out


def adopt_zoo() -> Path:
    """(On the GPU machine, EVOMERGE_CACHE at the kit's cache.) File the carried test zoo
    under the key that this machine's torch and transformers give, so that
    `build_zoo("test")` finds it there instead of training another (minutes of device time):
    the GPU study needs trained toy models, not the ones those libraries would train."""
    from evomerge.zoo.build import MANIFEST, default_zoo_dir, version

    target = default_zoo_dir("test")
    if not target.exists():
        (carried,) = target.parent.glob("test-*")
        carried.rename(target)
        manifest = json.loads((target / MANIFEST).read_text())
        (target / MANIFEST).write_text(json.dumps(manifest | {"version": version("test")}))
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (KINDS.md)")
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl")
    ap.add_argument("--adopt-zoo", action="store_true", help="on the GPU machine")
    args = ap.parse_args(argv)
    if args.adopt_zoo:
        print(f"test zoo: {adopt_zoo()}")
        return
    args.dest.mkdir(exist_ok=True)
    for old in (*args.dest.glob("*.whl"), *args.dest.glob("*.tar.xz")):
        old.unlink()
    download(CARRY, args.python, args.dest)
    with tempfile.TemporaryDirectory() as tmp:
        download((RAY,), args.python, Path(tmp))
        (wheel,) = Path(tmp).glob("*.whl")
        ray_archive(wheel, args.dest)
    zoo_subset(args.dest)
    total = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{total / 2**20:.1f} MiB in {args.dest}: carry it with the working tree (64 MiB)")


if __name__ == "__main__":
    main()
