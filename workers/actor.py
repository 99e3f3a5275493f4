"""The candidate worker: loads the sources once, then builds and scores recipe after recipe.

`CandidateWorker` is a plain class so that it runs in-process too (export checks, tests);
the pool wraps it with `ray.remote` as one long-lived actor per worker slot.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from evomerge.config import StudyConfig
from evomerge.fitness import Evaluator
from evomerge.merge import build
from evomerge.models import SourceSet
from evomerge.recipe import Recipe
from evomerge.zoo import default_zoo_dir


class WorkerSpec(BaseModel):
    """What a worker needs to start: resolved model folders and the fitness tasks."""

    model_config = ConfigDict(frozen=True)

    base: str
    base_path: str
    sources: tuple[str, ...]
    source_paths: tuple[str, ...]
    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    limit: int | None
    heldout_limit: int | None
    zoo_dir: str | None
    dtype: str
    torch_threads: int | None

    @classmethod
    def from_config(cls, config: StudyConfig) -> WorkerSpec:
        """Resolve every model ref; a missing folder raises FileNotFoundError naming it."""
        paths = config.model_paths()
        return cls(
            base=config.base,
            base_path=str(paths[config.base]),
            sources=config.sources,
            source_paths=tuple(str(paths[s]) for s in config.sources),
            tasks=tuple(t.task for t in config.fitness.tasks),
            weights=tuple(t.weight for t in config.fitness.tasks),
            limit=config.fitness.limit,
            heldout_limit=config.fitness.heldout_limit,
            zoo_dir=str(default_zoo_dir(config.zoo or "demo")),
            dtype=config.dtype,
            torch_threads=config.workers.torch_threads,
        )


@dataclass
class TrialResult:
    """What one evaluation produced; `error` set means the candidate failed."""

    metrics: dict[str, float] = field(default_factory=dict)
    fitness: float | None = None
    build_seconds: float = 0.0
    eval_seconds: float = 0.0
    worker: str = ""
    error: str | None = None


class CandidateWorker:
    """Holds the SourceSet, one resident candidate model and the evaluators of a study."""

    def __init__(self, spec: WorkerSpec) -> None:
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.spec = spec
        self.name = f"{socket.gethostname()}:{os.getpid()}:{device}"
        self.sources = SourceSet.load(
            spec.base_path,
            spec.source_paths,
            names=spec.sources,
            base_name=spec.base,
            device=device,
        )
        self.model = self.sources.new_model(spec.dtype)
        zoo_dir = Path(spec.zoo_dir) if spec.zoo_dir else None
        self._evaluators = {
            split: Evaluator(spec.tasks, spec.weights, split=split, limit=limit, zoo_dir=zoo_dir)
            for split, limit in (("search", spec.limit), ("held-out", spec.heldout_limit))
        }

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, recipe_json: str, split: str = "search") -> TrialResult:
        """Build the recipe into the resident model and score it; errors become results."""
        result = TrialResult(worker=self.name)
        try:
            t0 = time.perf_counter()
            build(Recipe.from_json(recipe_json), self.sources, into=self.model)
            t1 = time.perf_counter()
            score = self._evaluators[split].score(self.model, self.sources.tokenizer)
            result.build_seconds = t1 - t0
            result.eval_seconds = time.perf_counter() - t1
        except Exception as e:  # a bad candidate must not take the worker down
            result.error = f"{type(e).__name__}: {e}"
            return result
        result.metrics = dict(score.metrics)
        if not math.isfinite(score.fitness):
            result.error = f"non-finite fitness {score.fitness} (metrics {score.metrics})"
        else:
            result.fitness = score.fitness
        return result
