"""Drive one study: ask CMA-ES for candidates, keep every worker busy, record every trial.

The coordinator uses Optuna's ask/tell (never `study.optimize`) so that it can keep all
workers busy across generation boundaries, tell results in the order they arrive, rerun a
trial whose worker died, and hand RUNNING trials of a dead run back to CMA-ES on resume.
Optuna's tables are the optimizer's memory (CmaEsSampler pickles its state into trial
attributes); evomerge's tables (`storage`) add recipes, metrics, timings and runs.

Write order makes a crash at any point recoverable: a result goes to evomerge's table before
it is told to Optuna, so a RUNNING Optuna trial whose evomerge row holds a result is told on
resume instead of rerun, and any other RUNNING trial (recorded by evomerge or not, even one
asked by another program) is recorded, failed and re-asked once with the same parameters.
The steps carry `kill_point`s (evomerge.killpoints) so that tests SIGKILL a real
coordinator at each one.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import optuna
import psutil
from optuna.distributions import BaseDistribution
from optuna.samplers import CmaEsSampler
from optuna.trial import FrozenTrial, TrialState
from transformers import AutoConfig

from evomerge.config import StudyConfig
from evomerge.glue.kinship import merge_similarity
from evomerge.glue.selection import Selection, Weights, key, replay
from evomerge.killpoints import kill_point
from evomerge.models import check_shared_tokenizer
from evomerge.recipe import layer_group_names
from evomerge.space import DataFlowSpace, MixtureSpace, SearchSpace
from storage import REASKED, LeaseLostError, Store, TrialRow, is_reasked
from storage.lease import Heartbeat
from workers.actor import CandidateWorker, TrialResult, WorkerSpec
from workers.pool import Outcome, WorkerPool, WorkersLostError, connect

MAX_WORKER_DEATHS = 3
GENERATION_ATTR = "cma:generation"
# User attribute of a trial enqueued to re-ask an abandoned one: its number, so a repair
# interrupted in its turn never re-asks the same parameters twice.
RERUN_OF = "evomerge:rerun_of"
# How the error of an abandoned trial ends: a failure of the run, not of the candidate.
log = logging.getLogger(__name__)


class KnownSpaceCmaEsSampler(CmaEsSampler):
    """CmaEsSampler that knows the search space from the first trial.

    Optuna infers the space from completed trials, so a plain CmaEsSampler samples the first
    trials of a study at random (and, with several workers, many of them). The coordinator
    knows the space up front, so CMA-ES proposes every trial, starting with the first.
    """

    def __init__(self, space: dict[str, BaseDistribution], **kwargs: object) -> None:
        super().__init__(n_startup_trials=0, **kwargs)
        self._known_space = space

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self._known_space)


def population_size(dim: int) -> int:
    """CMA-ES's default population, 4 + floor(3 ln n), as in the paper."""
    return 4 + int(3 * math.log(dim))


@dataclass
class Progress:
    """What a progress display needs, sent after every finished trial."""

    complete: int
    budget: int
    failed: int
    busy: int
    best_fitness: float | None
    best_number: int | None


@dataclass
class RunSummary:
    study: str
    status: str
    reason: str
    complete: int
    failed: int
    best_fitness: float | None
    best_number: int | None
    seconds: float


Space = SearchSpace | DataFlowSpace | MixtureSpace


def build_space(config: StudyConfig) -> tuple[Space, WorkerSpec]:
    """Validate everything a run needs that can be checked without writing anything."""
    spec = WorkerSpec.from_config(config)

    if config.is_mixture:
        first = spec.base_path or spec.routed_paths[0]
        name = spec.base or spec.routed[0]
        check_shared_tokenizer(name, first, spec.routed, spec.routed_paths, what="mixes")
        layers = AutoConfig.from_pretrained(first).num_hidden_layers
        return MixtureSpace(config, layers, Path(spec.zoo_dir) if spec.zoo_dir else None), spec
    if config.is_dataflow:
        a = AutoConfig.from_pretrained(spec.base_path or spec.routed_paths[0])
        b = AutoConfig.from_pretrained(spec.routed_paths[-1])
        if a.hidden_size != b.hidden_size:
            raise ValueError(
                f"dataflow: cannot route between models of hidden size {a.hidden_size} (A) "
                f"and {b.hidden_size} (B, {spec.routed[-1]})"
            )
        return DataFlowSpace(config, a.num_hidden_layers, b.num_hidden_layers), spec
    layers = AutoConfig.from_pretrained(spec.base_path).num_hidden_layers
    groups = layer_group_names(layers, config.granularity)
    return SearchSpace(config, groups), spec


def make_sampler(config: StudyConfig, space: Space) -> optuna.samplers.BaseSampler:
    """The paper's CMA-ES: start at each range's init (middle by default), sigma0 1/6.

    A heuristic selection and a mixture's router candidates enqueue every trial with all its
    parameters, so their sampler is never consulted; Optuna needs one all the same."""
    if config.optimizer.kind != "cmaes" or config.is_mixture:
        return optuna.samplers.RandomSampler(seed=config.optimizer.seed)
    kwargs: dict[str, object] = {
        "seed": config.optimizer.seed,
        "popsize": config.optimizer.population or population_size(space.dim),
    }
    if space.custom_start:
        kwargs["x0"] = space.initial_params()
    if config.optimizer.sigma0 is not None:
        kwargs["sigma0"] = config.optimizer.sigma0
    with warnings.catch_warnings():  # Optuna 4.9 deprecates x0/sigma0 with no replacement yet
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*(x0|sigma0)")
        return KnownSpaceCmaEsSampler(space.distributions, **kwargs)


class Coordinator:
    """One run of one study. Create it, then call `run()`; it always ends the run record."""

    def __init__(
        self,
        config: StudyConfig,
        store: Store,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        worker_cls: type[CandidateWorker] = CandidateWorker,
        stop_from: tuple[str, ...] = (),
    ) -> None:
        """`stop_from`: the chain's earlier stages (PS+DFS's stage 1, ...), whose stop
        requests stop this run too: a user stops the study they started, whichever stage
        it has reached."""
        self.config = config
        self.stop_from = stop_from
        self.worker_cls = worker_cls
        self.store = store
        self.on_progress = on_progress
        self.space, self.spec = build_space(config)
        self.optuna_storage = store.optuna_storage()
        self.study = optuna.create_study(
            study_name=config.name,
            storage=self.optuna_storage,
            direction="maximize",
            sampler=make_sampler(config, self.space),
            load_if_exists=True,
        )
        self._study_id = self.optuna_storage.get_study_id_from_name(config.name)
        if config.optimizer.start is not None and not self.study.get_trials(deepcopy=False):
            # an evolve stage first re-scores where it starts: the selection's merge
            self.study.enqueue_trial(self.space.initial_params())
        self._trials: dict[int, optuna.trial.Trial] = {}
        self._deaths: Counter[tuple[int, str]] = Counter()  # (trial, split) -> deaths
        self._consecutive_failures = 0
        self._last_error = ""
        self._selection: Selection | None = None
        self._grid_done = False
        self._earlier_s = 0.0

    def run(self) -> RunSummary:
        t_start = time.monotonic()
        started = datetime.fromtimestamp(psutil.Process().create_time(), UTC)
        run_id = self.store.start_run(
            self.config.name,
            os.getpid(),
            socket.gethostname(),
            self.config.heartbeat.stale_after_s,
            since=started,  # a Stop pressed while this process started up is for this run
        )
        status, reason = "failed", "coordinator error"
        lease_lost = False
        self._beat = Heartbeat(
            lambda: self.store.heartbeat(run_id), self.config.heartbeat.interval_s, f"run {run_id}"
        )
        self._beat.start()
        try:
            self.store.set_study_status(self.config.name, "running")
            self._recover_orphans(run_id)
            self._earlier_s = self._earlier_runs_seconds(run_id)
            complete, _, best = self._counts()
            spent = self._budget_reason(complete, best, t_start)
            if spent is not None and not self._heldout_pending():
                status, reason = "finished", spent  # no worker needed
            else:
                status, reason = self._search_with_workers(run_id, t_start)
        except (KeyboardInterrupt, SystemExit) as e:
            # Ctrl-C, or SIGTERM (`kill`, a scheduler's stop), which Ray's driver turns into
            # SystemExit. The status comes first: a second Ctrl-C may cut the rest short.
            why = "interrupted by the user" if isinstance(e, KeyboardInterrupt) else "terminated"
            status, reason = "stopped", why
            self._fail_inflight(list(self._trials), f"run {why}")
            raise
        except LeaseLostError:
            lease_lost = True  # another run owns the study now: leave its records alone
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._beat.stop()
            if not lease_lost and self.store.end_run(run_id, status, reason):
                self.store.set_study_status(self.config.name, status)
        complete, failed, best = self._counts()
        return RunSummary(
            self.config.name,
            status,
            reason,
            complete,
            failed,
            best.value if best else None,
            best.number if best else None,
            time.monotonic() - t_start,
        )

    def _search_with_workers(self, run_id: int, t_start: float) -> tuple[str, str]:
        connect(self.config.workers.ray_address)
        pool = WorkerPool(
            self.spec,
            self.config.workers.count,
            num_gpus=self.config.workers.gpus_per_worker,
            num_cpus=self.config.workers.cpus_per_worker,
            depth=self.config.workers.queue,
            worker_cls=self.worker_cls,
        )
        try:
            status, reason = self._search(pool, run_id, t_start)
            if status == "finished":
                status, reason = self._rescore_heldout(pool, reason)
        finally:
            pool.shutdown()
        return status, reason

    def _counts(self) -> tuple[int, int, FrozenTrial | None]:
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        reasked = {t.user_attrs.get(RERUN_OF) for t in trials}  # interrupted, not failed
        failed = sum(t.state == TrialState.FAIL and t.number not in reasked for t in trials)
        best = max(complete, key=lambda t: t.value) if complete else None
        return len(complete), failed, best

    def _earlier_runs_seconds(self, run_id: int) -> float:
        """The study's search time before this run: `wall_time_s` is the study's budget, so a
        resume spends what is left of it (a run killed outright counts to its last beat)."""
        spent = 0.0
        for r in self.store.runs(self.config.name):
            # an interrupted run "ended" when a later one took over: its last beat is its end
            end = r.heartbeat_at if r.status == "interrupted" else r.ended_at or r.heartbeat_at
            spent += max(0.0, (end - r.started_at).total_seconds()) if r.id != run_id else 0.0
        return spent

    def _recover_orphans(self, run_id: int) -> None:
        """Repair what a dead run left: every RUNNING Optuna trial is told its stored result,
        or recorded, failed and re-asked once with its parameters.

        Each step is idempotent (the row is upserted, the re-ask is marked with `RERUN_OF`,
        the tell comes last), so a crash during the repair is repaired by the next resume.
        """
        name = self.config.name
        rows = {r.number: r for r in self.store.trials(name)}
        trials = self.study.get_trials(deepcopy=False)
        reasked = {t.user_attrs.get(RERUN_OF) for t in trials}
        for t in trials:
            if t.state != TrialState.RUNNING:
                continue
            row = rows.get(t.number)
            if _holds_result(row):
                if row.state == "COMPLETE":
                    self.study.tell(t.number, row.fitness)
                else:
                    self.study.tell(t.number, state=TrialState.FAIL)
                continue
            trial = optuna.trial.Trial(self.study, t._trial_id)
            for param, dist in self.space.distributions.items():
                if param not in t.params:  # asked elsewhere without them: CMA-ES fills them
                    trial.suggest_float(param, dist.low, dist.high, log=dist.log, step=dist.step)
            params = trial.params
            if row is None:
                generation = self.optuna_storage.get_trial_system_attrs(t._trial_id).get(
                    GENERATION_ATTR
                )
                recipe = self.space.decode(params)
                self.store.record_trial_started(name, run_id, t.number, generation, recipe)
            why = "run ended before the trial finished"
            self._abandon(t.number, params, why, requeue=t.number not in reasked)

    def _abandon(self, number: int, params: dict, why: str, *, requeue: bool = True) -> None:
        """Fail trial `number` in both stores, its parameters queued for the next ask."""
        self.store.record_trial_finished(
            self.config.name, number, "FAIL", error=f"{why}; {REASKED}"
        )
        if requeue:
            self.study.enqueue_trial(params, user_attrs={RERUN_OF: number})
        self.study.tell(number, state=TrialState.FAIL)

    def _ask(self, pool: WorkerPool, run_id: int) -> bool:
        """Ask for a trial and submit it; False when there is none to ask now."""
        if isinstance(self.space, MixtureSpace):
            if not self._grid_next(self.space):
                return False
        elif self.config.optimizer.kind != "cmaes" and not self._select_next():
            return False
        trial = self.study.ask(self.space.distributions)
        kill_point("asked")
        recipe = self.space.decode(trial.params)
        trial_id = self.optuna_storage.get_trial_id_from_study_id_trial_number(
            self._study_id, trial.number
        )
        generation = self.optuna_storage.get_trial_system_attrs(trial_id).get(GENERATION_ATTR)
        self.store.record_trial_started(
            self.config.name, run_id, trial.number, generation, recipe, worker=None
        )
        self._trials[trial.number] = trial
        kill_point("recorded")
        pool.submit(trial.number, recipe.to_json())
        kill_point("submitted")
        return True

    def _closeness(self, weights: Weights, candidates: Sequence[int]) -> list[float]:
        """How alike in weights the merge with `weights` and each candidate source are (read
        from the checkpoints once per merge: a replay asks again on every ask)."""
        spec = self.spec
        return list(
            _merge_similarity(spec.base_path, spec.source_paths, weights, tuple(candidates))
        )

    def _select_next(self) -> bool:
        """Queue the next candidate a heuristic selection needs. False while it waits on
        running trials, or when it has finished (then `_selection` holds its outcome)."""
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return True  # a re-asked trial of a dead run comes first
        rerun = {t.user_attrs.get(RERUN_OF) for t in trials}

        def weights(params: dict) -> Weights:
            return key(self.space.source_weights(params))  # type: ignore[union-attr]

        known: dict[Weights, float] = {}
        for t in trials:
            if t.state == TrialState.COMPLETE:
                known[weights(t.params)] = t.value
            elif t.state == TrialState.FAIL and t.number not in rerun:
                known[weights(t.params)] = -math.inf  # a candidate that failed for good
        opt = self.config.optimizer
        lowest = opt.order == "lowest"
        outcome = replay(opt.kind, self.config.sources, known, opt.scale, self._closeness, lowest)
        if isinstance(outcome, Selection):
            self._selection = outcome
            return False
        running = {weights(t.params) for t in trials if t.state == TrialState.RUNNING}
        todo = [c for c in outcome if c not in running]
        if todo:
            self.study.enqueue_trial(self.space.genome_of_weights(todo[0]))  # type: ignore[union-attr]
        return bool(todo)

    def _grid_next(self, space: MixtureSpace) -> bool:
        """Queue the next router candidate not asked yet; False once every one was asked."""
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return True  # a re-asked trial of a dead run comes first
        asked = [t.params for t in trials]
        todo = [c for c in space.candidates if c not in asked]
        if todo:
            self.study.enqueue_trial(todo[0])
        else:
            self._grid_done = True
        return bool(todo)

    def _stop_request(self) -> str | None:
        """The strongest pending stop request on this study or the chain's earlier stages."""
        requests = {self.store.stop_request(n) for n in (self.config.name, *self.stop_from)}
        return next((r for r in ("cancel", "stop") if r in requests), None)

    def _clear_stop_requests(self) -> None:
        for study in (self.config.name, *self.stop_from):
            self.store.clear_stop_request(study)

    def _search(self, pool: WorkerPool, run_id: int, t_start: float) -> tuple[str, str]:
        budget = self.config.budget
        last_poll = 0.0
        stopping: str | None = None
        complete, failed, best = self._counts()
        while True:
            self._beat.check()
            if time.monotonic() - last_poll > self.config.heartbeat.interval_s:
                last_poll = time.monotonic()
                request = self._stop_request()
                if request == "cancel":
                    self._fail_inflight(pool.cancel(), "cancelled")
                    self._clear_stop_requests()
                    return "stopped", "cancel requested"
                if request == "stop" and stopping is None:
                    stopping = "stop requested"
            if stopping is None:
                stopping = self._budget_reason(complete, best, t_start)
            while stopping is None and pool.idle and complete + pool.busy < budget.trials:
                if not self._ask(pool, run_id):
                    stopping = self._budget_reason(complete, best, t_start)
                    break
            if not pool.busy and stopping is None and not pool.recovering:
                # Budget left, nothing running, no idle actor and none Ray can restart.
                raise WorkersLostError("every worker is gone and Ray cannot restart any")
            if not pool.busy and stopping is not None:
                if stopping == "stop requested":
                    self._clear_stop_requests()
                    return "stopped", stopping
                return "finished", stopping
            outcomes = pool.wait(timeout=0.5)
            for outcome in outcomes:
                self._finish(outcome, pool)
            if outcomes:  # a study scan per result, not per idle poll
                complete, failed, best = self._counts()
            if self._consecutive_failures >= budget.max_consecutive_failures:
                self._fail_inflight(pool.cancel(), "study stopped after repeated failures")
                return "failed", (
                    f"{self._consecutive_failures} candidates failed in a row; "
                    f"last error: {self._last_error}"
                )
            if self.on_progress:
                self.on_progress(
                    Progress(
                        complete,
                        budget.trials,
                        failed,
                        pool.busy,
                        best.value if best else None,
                        best.number if best else None,
                    )
                )

    def _budget_reason(self, complete: int, best: FrozenTrial | None, t_start: float) -> str | None:
        budget = self.config.budget
        if self._selection is not None:
            dropped = "; ".join(f"{k}: {v}" for k, v in self._selection.dropped.items())
            return (
                f"selection finished: kept {', '.join(self._selection.kept)}"
                f"; dropped {dropped or 'none'}"
            )
        if self._grid_done:
            return "every router candidate scored"
        if complete >= budget.trials:
            return "budget reached"
        elapsed = self._earlier_s + time.monotonic() - t_start
        if budget.wall_time_s is not None and elapsed > budget.wall_time_s:
            return "wall time reached"
        if budget.target_fitness is not None and best and best.value >= budget.target_fitness:
            return "target fitness reached"
        return None

    def _finish(self, outcome: Outcome, pool: WorkerPool) -> None:
        number = int(outcome.key)
        result = outcome.result
        if result is None:
            if self._rerun_after_death(number, "search"):
                self.store.record_attempt(self.config.name, number)
                pool.submit(number, outcome.recipe_json)  # same parameters, same generation
                return
            result = TrialResult(error=f"worker died {MAX_WORKER_DEATHS} times on this trial")
        state = "COMPLETE" if result.error is None else "FAIL"
        self.store.record_trial_finished(
            self.config.name,
            number,
            state,
            metrics=result.metrics,
            fitness=result.fitness,
            build_seconds=result.build_seconds,
            eval_seconds=result.eval_seconds,
            worker=result.worker,
            error=result.error,
        )
        kill_point("stored")
        trial = self._trials.pop(number)
        if result.error is None:
            self.study.tell(trial, result.fitness)
            self._consecutive_failures = 0
        else:
            self.study.tell(trial, state=TrialState.FAIL)
            self._consecutive_failures += 1
            self._last_error = result.error
        kill_point("told")

    def _fail_inflight(self, numbers: list, why: str) -> None:
        """Fail abandoned trials now and queue their parameters for the next run."""
        for number in numbers:
            trial = self._trials.pop(int(number), None)
            if trial is not None:
                self._abandon(trial.number, trial.params, why)

    def _rerun_after_death(self, number: int, split: str) -> bool:
        """Whether a trial whose worker died runs again: a candidate that kills its worker
        every time (an OOM kill, a crash in a kernel) must not restart workers forever."""
        self._deaths[number, split] += 1
        return self._deaths[number, split] < MAX_WORKER_DEATHS

    def _rescore_heldout(self, pool: WorkerPool, reason: str) -> tuple[str, str]:
        """Score the top-k recipes on the held-out split: the search split is overfitted.
        A stop request ends it (at 7B it takes minutes): the run is then `stopped`, and a
        resume rescores what is left. A rescoring that fails is named in the run's reason
        (the search itself finished); a resume tries it again."""
        pending = self._heldout_pending()
        last_poll, stopped = 0.0, None
        failed: list[str] = []
        while pending or pool.busy:
            due = time.monotonic() - last_poll > self.config.heartbeat.interval_s
            if due or (pending and pool.idle):  # and always before starting another (k of them)
                last_poll = time.monotonic()
                request = self._stop_request()
                if request == "cancel":
                    pool.cancel()
                    self._clear_stop_requests()
                    return "stopped", "cancel requested during held-out rescoring"
                if request == "stop" and stopped is None:
                    pending = []  # the ones running finish; none more starts
                    stopped = ("stopped", "stop requested during held-out rescoring")
            if pending and not (pool.idle or pool.busy or pool.recovering):
                raise WorkersLostError("every worker is gone and Ray cannot restart any")
            while pending and pool.idle:
                row = pending.pop()
                pool.submit(row.number, row.recipe_json, split="held-out")
            for outcome in pool.wait(timeout=0.5):
                number, result = int(outcome.key), outcome.result
                if result is None:
                    if stopped is None and self._rerun_after_death(number, "held-out"):
                        pool.submit(number, outcome.recipe_json, split="held-out")
                    elif stopped is None:
                        failed.append(f"{number} (worker died {MAX_WORKER_DEATHS} times)")
                elif result.error is None:
                    self.store.record_heldout(
                        self.config.name, number, result.metrics, result.fitness
                    )
                    kill_point("heldout-stored")
                else:
                    failed.append(f"{number} ({result.error})")
            self._beat.check()
        if stopped is not None:
            self._clear_stop_requests()
            return stopped
        if failed:
            log.warning("held-out rescoring failed for trial %s", "; ".join(failed))
            return "finished", f"{reason}; held-out rescoring failed for trial {'; '.join(failed)}"
        return "finished", reason

    def _heldout_pending(self) -> list[TrialRow]:
        """The top-k trials not yet re-scored on the held-out split."""
        k = self.config.budget.heldout_top_k
        return [r for r in self.store.best(self.config.name, top=k) if r.heldout is None]


@functools.lru_cache(maxsize=64)
def _merge_similarity(
    base: str, sources: tuple[str, ...], weights: Weights, candidates: tuple[int, ...]
) -> tuple[float, ...]:
    return tuple(merge_similarity(base, list(sources), weights, list(candidates)))


def _holds_result(row: TrialRow | None) -> bool:
    """Whether an evomerge row holds a finished result (not an interrupted attempt)."""
    if row is None or row.state == "RUNNING":
        return False
    if row.state == "COMPLETE":
        return row.fitness is not None
    return not is_reasked(row.error)
