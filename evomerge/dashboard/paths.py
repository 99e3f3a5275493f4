"""Every file-system path a request can name goes through here.

A request may name a file inside a folder the dashboard owns (a config in `configs/`, a log,
an export folder), and a config started from the dashboard names models and task files;
each is resolved (symlinks included) and must stay under its allowed roots.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from evomerge.config import StudyConfig

# One plain path component: no separators, no leading dot (so never `.` or `..`).
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
ZOO_PREFIX = "zoo:"


class PathRefused(ValueError):
    """A name from a request that would leave its folder."""


def child(root: Path, name: str) -> Path:
    """`root / name` for a single plain component `name` that stays under `root`."""
    if not NAME.fullmatch(name):
        raise PathRefused(f"{name!r} is not a plain file or folder name")
    base = root.resolve()
    path = (base / name).resolve()
    if path.parent != base:
        raise PathRefused(f"{name!r} leaves {root}")
    return path


def under(path: Path, roots: Iterable[Path]) -> bool:
    """Whether `path`, resolved, lies in one of `roots`, resolved."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(r.resolve()) for r in roots)


def refused_refs(config: StudyConfig, roots: tuple[Path, ...]) -> dict[str, str]:
    """Field -> reason for each model or task reference outside the allowed roots.

    `zoo:NAME` refs are allowed when NAME is a plain name; anything else must be an
    absolute path under one of `roots`: the run resolves a relative path against its own
    config snapshot's folder, so the dashboard could not judge it as the run would.
    """
    refs = {"base": config.base, "dataflow.b": config.dataflow.b if config.dataflow else None}
    refs = {field: ref for field, ref in refs.items() if ref is not None}
    refs |= {f"sources.{i}": s for i, s in enumerate(config.sources)}
    refs |= {f"fitness.tasks.{i}.task": t.task for i, t in enumerate(config.fitness.tasks)}
    allowed = ", ".join(str(r) for r in roots) or "none configured (use --model-root)"
    out = {}
    for field, ref in refs.items():
        if ref.startswith(ZOO_PREFIX):
            if not NAME.fullmatch(ref[len(ZOO_PREFIX) :]):
                out[field] = f"{ref!r}: a zoo ref is zoo:NAME with a plain NAME"
        elif not Path(ref).is_absolute():
            out[field] = f"{ref!r} is relative: give the absolute path (under {allowed})"
        elif not under(Path(ref), roots):
            out[field] = f"{ref!r} is outside the allowed model roots ({allowed})"
    return out
