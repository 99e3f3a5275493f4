"""Pre-flight: everything a study needs, checked before anything is written.

`evomerge run`/`resume` and the dashboard's New study call `problems()` after the config
validated and before the store, the Optuna study or a worker is touched, so a bad model
folder, task file, storage or Ray request is refused at once (exit 2), naming the field,
instead of failing minutes later with the study name taken. Reading is cheap: config.json,
tokenizer files and safetensors headers, never a weight.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from evomerge.config import StudyConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
RAY_CONNECT_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Problem:
    """One reason a study cannot start: the config field (or file) and what is wrong."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def problems(config: StudyConfig, storage_url: str) -> list[Problem]:
    """Every problem found; empty when the study can start. Ray is asked last, and only
    joined when the study names a cluster: no local Ray is started to count its CPUs."""
    found = _model_problems(config) + _task_problems(config) + _storage_problems(storage_url)
    if not found:
        found = _space_problems(config)
    if not found:
        found = _ray_problems(config)
    return found


def _model_refs(config: StudyConfig) -> dict[str, str]:
    refs = {"base": config.base} if config.base else {}
    refs |= {f"sources.{i}": s for i, s in enumerate(config.sources)}
    if config.dataflow is not None and config.dataflow.b is not None:
        refs["dataflow.b"] = config.dataflow.b
    if config.mixture is not None:
        refs |= {f"mixture.others.{i}": m for i, m in enumerate(config.mixture.others)}
    return refs


def _model_problems(config: StudyConfig) -> list[Problem]:
    """Each folder: config.json parses, a tokenizer, readable safetensors headers; and the
    models merged together have the same tensors with the same shapes."""
    from evomerge.models import Checkpoint  # loads torch: only once a config is valid
    from evomerge.zoo import default_zoo_dir, resolve_model

    zoo_dir = default_zoo_dir(config.zoo or "demo")
    found, shapes = [], {}
    for field, ref in _model_refs(config).items():
        try:
            path = resolve_model(ref, zoo_dir)
            shapes[field] = Checkpoint.open(path).shapes()
        except Exception as e:  # any unreadable file is the user's to fix, whatever it raised
            found.append(Problem(field, f"{ref}: {_reason(e)}"))
            continue
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            found.append(Problem(field, f"{path}: no tokenizer ({', '.join(TOKENIZER_FILES)})"))
    merged = [f for f in shapes if f == "base" or f.startswith("sources.")]
    if config.method != "dataflow" and "base" in shapes:
        for field in merged:
            mismatch = _shape_mismatch(shapes["base"], shapes[field])
            if mismatch:
                found.append(Problem(field, f"{_model_refs(config)[field]}: {mismatch}"))
    return found


def _shape_mismatch(base: dict, other: dict) -> str | None:
    if base.keys() != other.keys():
        name = sorted(base.keys() ^ other.keys())[0]
        return f"tensor {name} is in only one of this model and the base"
    for name, shape in base.items():
        if other[name] != shape:
            return f"tensor {name} has shape {list(other[name])}, the base {list(shape)}"
    return None


def _task_problems(config: StudyConfig) -> list[Problem]:
    from evomerge.tasks import load_task
    from evomerge.zoo import default_zoo_dir

    zoo_dir = default_zoo_dir(config.zoo or "demo")
    refs = {f"fitness.tasks.{i}.task": t.task for i, t in enumerate(config.fitness.tasks)}
    if config.mixture is not None:
        for i, tasks in enumerate(config.mixture.prompts):
            refs |= {f"mixture.prompts.{i}.{j}": ref for j, ref in enumerate(tasks)}
    found = []
    for field, ref in refs.items():
        try:
            spec = load_task(ref, zoo_dir)
        except Exception as e:
            found.append(Problem(field, f"{ref}: {_reason(e)}"))
            continue
        if spec.kind != "lm_eval" and "search" not in spec.splits:
            found.append(Problem(field, f"{ref}: no search split"))
        for split, path in spec.splits.items():
            if not Path(path).is_file():
                found.append(Problem(field, f"{ref}: {split} data file not found: {path}"))
    return found


def _storage_problems(url: str) -> list[Problem]:
    """SQLite: an existing database takes a write (rolled back: nothing stays written); a new
    one needs a folder it can be created in."""
    from storage import StorageLockedError
    from storage.db import DEFAULT_BUSY_TIMEOUT_S, make_engine, masked, sqlite_file, transaction
    from storage.errors import translated

    try:
        db = sqlite_file(url)
    except Exception as e:
        return [Problem("storage", _reason(e))]
    if db is None:
        return []
    if not db.exists():
        folder = db.parent
        if os.access(folder, os.W_OK):
            return []
        return [
            Problem("storage", f"cannot create the SQLite database {db}: {folder} is read-only")
        ]
    engine = None
    try:
        engine = make_engine(url)
        with translated(url, DEFAULT_BUSY_TIMEOUT_S), transaction(engine, write=True) as conn:
            conn.exec_driver_sql("CREATE TABLE evomerge_preflight_probe (x INTEGER)")
            conn.rollback()
    except Exception as e:
        locked = isinstance(e, StorageLockedError)  # the store's own classification
        state = "locked by another connection" if locked else "read-only"
        return [Problem("storage", f"{masked(url)} is {state}: {_reason(e)}")]
    finally:
        if engine is not None:
            engine.dispose()
    return []


def _space_problems(config: StudyConfig) -> list[Problem]:
    from evomerge.coordinator import build_space

    try:
        build_space(config)
    except (FileNotFoundError, ValueError) as e:
        # The space's errors start with the field they are about ("search.density: ...").
        field, sep, message = _reason(e).partition(": ")
        if not sep or " " in field:
            field, message = "method", _reason(e)
        return [Problem(field, message)]
    return []


def offered_resources(address: str | None) -> dict[str, float]:
    """CPUs and GPUs the Ray cluster at `address` has (joining it, within a timeout); with
    no address and no Ray running, what a local Ray would start with on this machine."""
    import ray

    if ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        _connect_within(address, RAY_CONNECT_TIMEOUT_S)
        return dict(ray.cluster_resources())
    import torch

    return {"CPU": len(os.sched_getaffinity(0)), "GPU": torch.cuda.device_count()}


def _connect_within(address: str | None, timeout_s: float) -> None:
    from workers.pool import connect

    errors: list[BaseException] = []

    def join() -> None:
        try:
            connect(address)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=join, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    where = address or os.environ.get("RAY_ADDRESS") or "the local cluster"
    if thread.is_alive():
        raise ConnectionError(f"no answer from the Ray cluster at {where} in {timeout_s:g} s")
    if errors:
        raise ConnectionError(f"cannot join the Ray cluster at {where}: {_reason(errors[0])}")


def _ray_problems(config: StudyConfig) -> list[Problem]:
    workers = config.workers
    try:
        offered = offered_resources(workers.ray_address)
    except ConnectionError as e:
        return [Problem("workers.ray_address", str(e))]
    found = []
    for kind, field, each in (
        ("CPU", "workers.cpus_per_worker", workers.cpus_per_worker),
        ("GPU", "workers.gpus_per_worker", workers.gpus_per_worker),
    ):
        have = offered.get(kind, 0)
        if each > have:
            found.append(
                Problem(field, f"one worker asks {each:g} {kind}s; the cluster has {have:g}")
            )
        elif each and workers.count * each > have:
            found.append(
                Problem(
                    "workers.count",
                    f"{workers.count} workers x {each:g} {kind}s = {workers.count * each:g} "
                    f"{kind}s asked; the cluster has {have:g}",
                )
            )
    return found


def _reason(e: BaseException) -> str:
    """An exception as one line a user can act on (its type only when it has no message)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__
