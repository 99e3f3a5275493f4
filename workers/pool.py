"""Dispatch recipes to long-lived Ray actors and hand results back as they arrive."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from workers.actor import CandidateWorker, TrialResult, WorkerSpec

log = logging.getLogger(__name__)
# How long the workers may take to start (loading sources included) before the study fails.
START_TIMEOUT_S = 600


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


class WorkersLostError(RuntimeError):
    """Every actor died for good (Ray gave up restarting them): nothing can run a trial."""


class WorkerPool:
    """One actor per worker slot; each loads the sources once and lives for the whole study.

    A dead actor is restarted by Ray (`max_restarts`); its in-flight trial comes back as an
    `Outcome` with `result=None` so the coordinator can rerun the same recipe. The actor is
    out of service until Ray has restarted it, which may be never when its node is gone and
    no other node has room: reruns and new trials go to the live actors meanwhile (a
    submission with no idle actor waits in a backlog), so losing a node slows a study down
    instead of failing its trials. A worker whose device context broke (a CUDA error that
    fails every later call) returns its trial's FAIL and goes out of service the same way:
    it exits at the ping, and Ray restarts it.

    Each actor takes `depth` trials at a time (a slot each). With 2, the next candidate
    already waits at the actor while one runs, so no worker idles while the coordinator
    records a result, tells CMA-ES and asks for the next trial; the price is more trials in
    flight, which CMA-ES samples from an older generation.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        count: int,
        *,
        num_gpus: float = 0,
        num_cpus: float = 1,
        max_restarts: int = 3,
        depth: int = 1,
        worker_cls: type[CandidateWorker] = CandidateWorker,
    ) -> None:
        actor_cls = ray.remote(worker_cls).options(
            num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0
        )
        self.actors = [actor_cls.remote(spec) for _ in range(count)]
        self._idle = [a for _ in range(depth) for a in self.actors]  # free slots, round robin
        self._inflight: dict[ray.ObjectRef, tuple[Hashable, str, str, ray.actor.ActorHandle]] = {}
        self._recovering: dict[ray.ObjectRef, ray.actor.ActorHandle] = {}  # ping -> dead actor
        self._backlog: deque[tuple[Hashable, str, str]] = deque()
        try:
            self.pids = ray.get([a.pid.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        except (RayActorError, RayTaskError) as e:
            self.shutdown()
            raise WorkerStartError(f"workers failed to start: {e}") from e
        except GetTimeoutError as e:
            self.shutdown()
            raise WorkerStartError(
                f"{count} workers ({num_cpus:g} CPUs, {num_gpus:g} GPUs each) did not start in "
                f"{START_TIMEOUT_S} s; the cluster has {ray.cluster_resources()}"
            ) from e

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> int:
        """Trials submitted and not finished: running, or waiting for an actor."""
        return len(self._inflight) + len(self._backlog)

    @property
    def recovering(self) -> int:
        """Slots of actors that died and that Ray may still restart."""
        return len(self._recovering)

    def submit(self, key: Hashable, recipe_json: str, split: str = "search") -> None:
        if not self._idle:  # only after a worker died: its rerun waits for a live actor
            self._backlog.append((key, recipe_json, split))
            return
        actor = self._idle.pop()
        ref = actor.evaluate.remote(recipe_json, split)
        self._inflight[ref] = (key, recipe_json, split, actor)

    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes that finished within `timeout` seconds (possibly none)."""
        refs = [*self._inflight, *self._recovering]
        if not refs:
            if self._backlog:
                raise WorkersLostError("every worker died and Ray could not restart any")
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        outcomes = []
        for ref in ready:
            if ref in self._recovering:
                self._recovered(ref)
                continue
            key, recipe_json, split, actor = self._inflight.pop(ref)
            try:
                result: TrialResult | None = ray.get(ref)
            except RayActorError as e:
                log.warning("worker died during trial %s: %s", key, e)
                result = None
            if result is None or result.restart:
                # Back in service once Ray has restarted it: the ping waits (retrying) while
                # the actor is restarting and fails once Ray gives up on it. A worker whose
                # device broke exits at this ping, so it too comes back as a fresh process.
                self._recovering[actor.pid.options(max_task_retries=-1).remote()] = actor
            else:
                self._idle.append(actor)
            outcomes.append(Outcome(key, recipe_json, split, result))
        while self._backlog and self._idle:
            self.submit(*self._backlog.popleft())
        return outcomes

    def _recovered(self, ping: ray.ObjectRef) -> None:
        actor = self._recovering.pop(ping)
        try:
            ray.get(ping)
        except RayActorError as e:
            log.warning("worker lost for good: %s", e)
            return
        self._idle.append(actor)

    def cancel(self) -> list[Hashable]:
        """Abandon every in-flight trial now (the actors are killed); returns their keys."""
        keys = [key for key, *_ in self._inflight.values()]
        keys += [key for key, *_ in self._backlog]
        self.shutdown()
        return keys

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self._inflight.clear()
        self._recovering.clear()
        self._backlog.clear()
        self._idle.clear()
