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
from transformers import AutoTokenizer

from evomerge.config import EVAL_BATCH, StudyConfig
from evomerge.dataflow import route
from evomerge.fitness import Evaluator, longest_sequence
from evomerge.glue.mixture import mix
from evomerge.memory import (
    WorkerPlan,
    device_memory,
    device_works,
    out_of_memory,
    plan_worker,
    release,
)
from evomerge.merge import build
from evomerge.models import SourceSet, load_model
from evomerge.placement import Placement, release_heap
from evomerge.recipe import DATAFLOW, MIXTURE, Recipe
from evomerge.tasks import load_task
from evomerge.zoo import default_zoo_dir


class WorkerSpec(BaseModel):
    """What a worker needs to start: resolved model folders and the fitness tasks.

    `base`/`sources` are merged (a SourceSet); `routed` are whole models a data-flow route
    or a mixture runs unmerged (DFS: A and B; PS+DFS stage 2: B; a mixture's other experts).
    """

    model_config = ConfigDict(frozen=True)

    base: str | None
    base_path: str | None
    sources: tuple[str, ...]
    source_paths: tuple[str, ...]
    routed: tuple[str, ...] = ()
    routed_paths: tuple[str, ...] = ()
    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    limit: int | None
    heldout_limit: int | None
    batch_size: int = EVAL_BATCH
    repeats: int = 0  # a route's r (its hops each keep a KV cache); 0: no route
    zoo_dir: str | None
    dtype: str
    torch_threads: int | None
    placement: str = "auto"
    memory_gb: float | None = None
    gpus_per_worker: float = 0
    workers: int = 1

    @classmethod
    def from_config(cls, config: StudyConfig) -> WorkerSpec:
        """Resolve every model ref; a missing folder raises FileNotFoundError naming it."""
        paths = config.model_paths()
        if config.method in (DATAFLOW, MIXTURE):
            merged, routed = (), config.sources
        else:
            merged = config.sources
            routed = (config.dataflow.b,) if config.is_dataflow else ()
            routed = config.mixture.others if config.is_mixture else routed
        return cls(
            base=config.base,
            base_path=str(paths[config.base]) if merged else None,
            sources=merged,
            source_paths=tuple(str(paths[s]) for s in merged),
            routed=routed,
            routed_paths=tuple(str(paths[r]) for r in routed),
            tasks=tuple(t.task for t in config.fitness.tasks),
            weights=tuple(t.weight for t in config.fitness.tasks),
            limit=config.fitness.limit,
            heldout_limit=config.fitness.heldout_limit,
            batch_size=config.fitness.batch_size,
            repeats=config.dataflow.repeats if config.is_dataflow else 0,
            zoo_dir=str(default_zoo_dir(config.zoo or "demo")),
            dtype=config.dtype,
            torch_threads=config.workers.torch_threads,
            placement=config.workers.sources,
            memory_gb=config.workers.memory_gb,
            gpus_per_worker=config.workers.gpus_per_worker,
            workers=config.workers.count,
        )

    def plan(self, gpus: float | None = None) -> WorkerPlan:
        """This worker's memory plan; `gpus` overrides the config's (a worker knows whether
        it got one)."""
        gpus = self.gpus_per_worker if gpus is None else gpus
        available, where = device_memory(gpus, self.workers, self.memory_gb)
        zoo_dir = Path(self.zoo_dir) if self.zoo_dir else None
        tasks = [load_task(t, zoo_dir) for t in self.tasks]
        generate = [t.max_new_tokens for t in tasks if t.kind == "generate"]
        tokenizer = AutoTokenizer.from_pretrained(self.base_path or self.routed_paths[0])
        limits = {"search": self.limit, "held-out": self.heldout_limit}
        return plan_worker(
            self.base_path,
            self.source_paths,
            self.routed_paths,
            self.dtype,
            self.placement,
            available,
            where,
            gpu=gpus > 0,
            batch=self.batch_size,
            generate=max(generate, default=0),
            likelihood=len(generate) < len(tasks),
            repeats=self.repeats,
            longest=longest_sequence(tokenizer, tasks, limits),
            lm_eval=any(t.kind == "lm_eval" for t in tasks),
        )


class OutOfMemory(RuntimeError):
    """A build or an evaluation that did not fit: a FAIL trial, never a dead worker."""


@dataclass
class TrialResult:
    """What one evaluation produced; `error` set means the candidate failed."""

    metrics: dict[str, float] = field(default_factory=dict)
    fitness: float | None = None
    build_seconds: float = 0.0
    eval_seconds: float = 0.0
    worker: str = ""
    error: str | None = None
    restart: bool = False  # the worker's device context broke: it exits at the next ping


class CandidateWorker:
    """Holds the SourceSet, one resident candidate model, the routed models and the
    evaluators of a study."""

    def __init__(self, spec: WorkerSpec) -> None:
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.broken = False  # a CUDA error poisoned this process's context
        self.spec = spec
        self.name = f"{socket.gethostname()}:{os.getpid()}:{device}"
        self.sources: SourceSet | None = None
        self.model: torch.nn.Module | None = None
        self.placement = "routed models only"
        if spec.base_path is not None:
            self.placement = spec.placement
            if spec.placement == "auto":  # the leanest placement when nothing fits: try anyway
                self.placement = spec.plan(1 if device == "cuda" else 0).choice or Placement.HOST
            self.sources = SourceSet.load(
                spec.base_path,
                spec.source_paths,
                names=spec.sources,
                base_name=spec.base,
                device=device,
                placement=self.placement,
            )
            self.model = self.sources.new_model(spec.dtype)
            self.tokenizer = self.sources.tokenizer
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.routed_paths[0])
        self.routed = {
            ref: load_model(path, spec.dtype, device)
            for ref, path in zip(spec.routed, spec.routed_paths, strict=True)
        }
        self._merged: str | None = None  # hash of the merge a route's model A holds
        zoo_dir = Path(spec.zoo_dir) if spec.zoo_dir else None
        self._evaluators = {
            split: Evaluator(
                spec.tasks,
                spec.weights,
                split=split,
                limit=limit,
                zoo_dir=zoo_dir,
                batch_size=spec.batch_size,
            )
            for split, limit in (("search", spec.limit), ("held-out", spec.heldout_limit))
        }

    def pid(self) -> int:
        """The worker's process id (the pool's ping)."""
        self._exit_if_broken()
        return os.getpid()

    def _exit_if_broken(self) -> None:
        """A worker whose device context broke exits at its next call: the pool's ping after
        that trial, or a trial queued behind it (which then reruns elsewhere, as after any
        worker death). Ray restarts it as a fresh process."""
        if self.broken:
            os._exit(1)

    def device_works(self) -> bool:
        return self.device != "cuda" or device_works()

    def evaluate(self, recipe_json: str, split: str = "search") -> TrialResult:
        """Build the recipe into the resident model and score it; errors become results."""
        self._exit_if_broken()
        result = TrialResult(worker=self.name)
        oom = False
        try:
            t0 = time.perf_counter()
            try:
                model = self.candidate(Recipe.from_json(recipe_json))
            except Exception as e:
                if out_of_memory(e):
                    raise OutOfMemory(
                        f"out of memory building the candidate ({self.placement} placement): {e}"
                    ) from e
                raise
            t1 = time.perf_counter()
            score = self._score(self._evaluators[split], model)
            result.build_seconds = t1 - t0
            result.eval_seconds = time.perf_counter() - t1
        except Exception as e:  # a bad candidate, or one too big, must not take the worker down
            # Only its text is kept: its traceback's frames hold what the failed build or
            # evaluation allocated, which `release` must be able to free.
            result.error = f"{type(e).__name__}: {e}"
            oom = isinstance(e, OutOfMemory) or out_of_memory(e)
        if result.error is not None:
            # An out-of-memory leaves the device full, not broken: the probe would misread it.
            if oom or self.device_works():
                release()
            else:
                self.broken = result.restart = True
                result.error += " (the device's context is unusable: the worker restarts)"
            return result
        release_heap()  # the evaluation's activations: a worker keeps only what it holds
        result.metrics = dict(score.metrics)
        if not math.isfinite(score.fitness):
            result.error = f"non-finite fitness {score.fitness} (metrics {score.metrics})"
        else:
            result.fitness = score.fitness
        return result

    def _score(self, evaluator: Evaluator, model: torch.nn.Module):
        """Score `model`; after an out-of-memory, once more at half the batch, which the
        worker keeps for its later trials: a batch that did not fit once would fail the
        next trial's first attempt too, and every retry costs most of an evaluation."""
        batch = evaluator.batch_size
        try:
            return evaluator.score(model, self.tokenizer)
        except Exception as e:
            if not out_of_memory(e) or batch == 1:
                raise
        release()
        evaluator.batch_size = batch // 2
        try:
            return evaluator.score(model, self.tokenizer)
        except Exception as e:
            if out_of_memory(e):
                raise OutOfMemory(
                    f"out of memory evaluating ({self.placement} placement, batch size {batch}, "
                    f"then {batch // 2}): {e}"
                ) from e
            raise

    def candidate(self, recipe: Recipe) -> torch.nn.Module:
        """Build `recipe`'s merge in place (once for the fixed merge a route or a mixture
        holds), then its route or its mixture."""
        fixed = recipe.dataflow is not None or recipe.mixture is not None
        if recipe.method not in (DATAFLOW, MIXTURE):
            merge = recipe.merge_part()
            if not fixed or merge.hash != self._merged:
                build(merge, self.sources, into=self.model)
                self._merged = merge.hash if fixed else None
        if recipe.dataflow is not None:
            return route(recipe.dataflow, self.model, self.routed)
        if recipe.mixture is not None:
            return mix(recipe.mixture, self.model, self.routed, self.tokenizer)
        return self.model
