"""Dispatch recipes to long-lived Ray actors and hand results back as they arrive."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError

from workers.actor import CandidateWorker, TrialResult, WorkerSpec

log = logging.getLogger(__name__)


class WorkerStartError(RuntimeError):
    """The workers could not start (a source that does not load, no resources, ...)."""


@dataclass
class Outcome:
    """One finished dispatch. `result` is None when the worker died mid-trial."""

    key: Hashable
    recipe_json: str
    split: str
    result: TrialResult | None


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local one (the embedded default)."""
    if ray.is_initialized():
        return
    ray.init(
        address=address,
        num_cpus=None if address else num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )


class WorkerPool:
    """One actor per worker slot; each loads the sources once and lives for the whole study.

    A dead actor is restarted by Ray (`max_restarts`); its in-flight trial comes back as an
    `Outcome` with `result=None` so the coordinator can rerun the same recipe.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        count: int,
        *,
        num_gpus: float = 0,
        num_cpus: float = 1,
        max_restarts: int = 3,
        worker_cls: type[CandidateWorker] = CandidateWorker,
    ) -> None:
        actor_cls = ray.remote(worker_cls).options(
            num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0
        )
        self.actors = [actor_cls.remote(spec) for _ in range(count)]
        self._idle = list(self.actors)
        self._inflight: dict[ray.ObjectRef, tuple[Hashable, str, str, ray.actor.ActorHandle]] = {}
        try:
            self.pids = ray.get([a.pid.remote() for a in self.actors], timeout=600)
        except (RayActorError, RayTaskError) as e:
            self.shutdown()
            raise WorkerStartError(f"workers failed to start: {e}") from e

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> int:
        return len(self._inflight)

    def submit(self, key: Hashable, recipe_json: str, split: str = "search") -> None:
        actor = self._idle.pop()
        ref = actor.evaluate.remote(recipe_json, split)
        self._inflight[ref] = (key, recipe_json, split, actor)

    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes that finished within `timeout` seconds (possibly none)."""
        if not self._inflight:
            return []
        ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
        outcomes = []
        for ref in ready:
            key, recipe_json, split, actor = self._inflight.pop(ref)
            try:
                result: TrialResult | None = ray.get(ref)
            except RayActorError as e:
                log.warning("worker died during trial %s: %s", key, e)
                result = None
            self._idle.append(actor)
            outcomes.append(Outcome(key, recipe_json, split, result))
        return outcomes

    def cancel(self) -> list[Hashable]:
        """Abandon every in-flight trial now (the actors are killed); returns their keys."""
        keys = [key for key, *_ in self._inflight.values()]
        self.shutdown()
        return keys

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self._inflight.clear()
        self._idle.clear()
