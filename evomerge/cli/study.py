"""Commands that run and query studies: run, resume, status, best, export, demo."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from evomerge.cli.app import app, console, exit_on_sigterm, fail
from evomerge.cli.plan import refuse_unfit
from evomerge.config import ConfigError, HeartbeatConfig, StudyConfig
from evomerge.killpoints import kill_point

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"

StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", envvar="EVOMERGE_STORAGE", help="SQLAlchemy URL of the study DB"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _storage_url(option: str | None, config: StudyConfig | None = None) -> str:
    from storage import default_storage_url

    return option or (config.storage if config else None) or default_storage_url()


def _open_store(url: str, *, create: bool = True):
    """The store at `url`, migrated; exit 2 naming it when it cannot be opened. Commands
    that only read or resume studies pass create=False: a misspelt SQLite path is then an
    error, not a new empty database."""
    from storage import StorageError, Store
    from storage.db import masked, sqlite_file

    with _storage_errors():
        db = None if create else sqlite_file(url)
        if db is not None and not db.exists():
            raise fail(
                f"no database at {db} (check --storage or EVOMERGE_STORAGE; `evomerge run` "
                "creates one)",
                2,
            )
        try:
            store = Store(url)
            store.migrate()
        except StorageError:
            raise  # its message names the URL already
        except Exception as e:
            raise fail(f"cannot open storage {masked(url)}: {e}", 2) from e
    return store


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Exit 2 with the store's own message (an unknown study, a locked or read-only
    database) instead of a traceback."""
    from storage import StorageError

    try:
        yield
    except StorageError as e:
        raise fail(str(e), 2) from e


def _preflight(config: StudyConfig, url: str) -> None:
    """Exit 2 naming every problem pre-flight finds, before anything is written."""
    from evomerge.preflight import problems

    found = problems(config, url)
    if found:
        lines = "\n".join(f"  {p}" for p in found)
        raise fail(f"study {config.name!r} cannot start:\n{lines}", 2)


def _drive(config: StudyConfig, store, *, new: bool, stop_from: tuple[str, ...] = ()) -> None:
    """Validate, register (for a new study) and run one study with a live progress bar;
    `stop_from`: the chain's earlier stages, whose stop requests stop it too."""
    from evomerge.coordinator import Coordinator
    from evomerge.coordinator import Progress as RunProgress
    from storage import StudyBusyError
    from workers.pool import WorkersLostError, WorkerStartError

    exit_on_sigterm()
    if new:
        if store.get_study(config.name, missing_ok=True) is not None:
            raise fail(f"study {config.name!r} exists; use `evomerge resume {config.name}`", 2)
        for later in config.later_stages():  # refused now, not after hours of stage 1
            if store.get_study(later, missing_ok=True) is not None:
                raise fail(
                    f"study {later!r} exists, and a later stage of {config.name!r} runs under "
                    "that name: give this study another name (--study)",
                    2,
                )
    try:
        coordinator = Coordinator(config, store, stop_from=stop_from)
    except (FileNotFoundError, ValueError) as e:
        raise fail(str(e), 2) from e
    if new:
        store.create_study(
            config.name,
            config.to_yaml(),
            optuna_study_name=config.name,
            budget_trials=config.budget.trials,
        )
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(config.name, total=config.budget.trials, info="starting workers")

        def show(p: RunProgress) -> None:
            best = "-" if p.best_fitness is None else f"{p.best_fitness:.4f} (#{p.best_number})"
            bar.update(
                task, completed=p.complete, info=f"best {best}  busy {p.busy}  fail {p.failed}"
            )

        coordinator.on_progress = show
        try:
            summary = coordinator.run()
        except StudyBusyError as e:
            raise fail(str(e), 3) from e
        except (WorkerStartError, WorkersLostError) as e:  # recorded as the run's exit reason
            raise fail(f"study {config.name!r} failed: {e}", 1) from e
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM: the run is recorded stopped
            console.print(f"study {config.name!r} stopped; `evomerge resume {config.name}` goes on")
            raise
    console.print(
        f"study [bold]{summary.study}[/]: {summary.status} ({summary.reason}); "
        f"{summary.complete} complete, {summary.failed} failed in {summary.seconds:.0f} s"
    )
    if summary.status == "failed":
        raise fail(f"study {summary.study!r} failed: {summary.reason}", 1)
    chain = (*stop_from, config.name)
    if summary.status == "finished" and config.next_stage:
        kill_point("stage-1-finished")
        _drive_dataflow_stage(config, store, chain)
    if summary.status == "finished" and config.evolve_next:
        _drive_evolve_stage(config, store, chain)
    if summary.status == "finished" and config.mix_next:
        _drive_mixture_stage(config, store, chain)


def _drive_evolve_stage(config: StudyConfig, store, chain: tuple[str, ...]) -> None:
    """Model-GLUE's heuristic, then evolutionary selection: CMA-ES from the selection's merge."""
    from evomerge.recipe import Recipe

    best = store.best(config.name, top=1)
    if not best:
        raise fail(f"study {config.name!r} has no complete trial to start from", 1)
    weights = Recipe.from_json(best[0].recipe_json).params["weight"][0]
    stage, new = _next_stage(config, store, config.evolve_stage(weights))
    console.print(
        f"stage 2 (evolutionary): [bold]{stage.name}[/] starts CMA-ES at trial "
        f"{best[0].number}'s weights {list(weights)}"
    )
    _drive(stage, store, new=new, stop_from=chain)


def _drive_dataflow_stage(config: StudyConfig, store, chain: tuple[str, ...]) -> None:
    """PS+DFS: route stage 1's best merge with `dataflow.b`."""
    assert config.dataflow is not None
    what = f"routes it with {config.dataflow.b}"
    _drive_on_best(config, store, config.dataflow_stage, what, chain)


def _drive_mixture_stage(config: StudyConfig, store, chain: tuple[str, ...]) -> None:
    """Merge+mix (Model-GLUE): mix the best merge with `mixture.others`."""
    from transformers import AutoConfig

    assert config.mixture is not None and config.base is not None
    layers = AutoConfig.from_pretrained(config.model_paths()[config.base]).num_hidden_layers
    others = ", ".join(config.mixture.others)

    def stage(merge_json: str) -> StudyConfig:
        return config.mixture_stage(merge_json, layers)

    _drive_on_best(config, store, stage, f"mixes it with {others}", chain)


def _drive_on_best(config: StudyConfig, store, make_stage, what: str, chain) -> None:
    """The next stage of a chain, on this study's best recipe (held-out score first)."""
    best = [r for r in store.best(config.name, top=1, by="heldout") if r.heldout is not None]
    best = best or store.best(config.name, top=1)
    if not best:
        raise fail(f"study {config.name!r} has no complete trial to build on", 1)
    stage, new = _next_stage(config, store, make_stage(best[0].recipe_json))
    console.print(
        f"next stage: [bold]{stage.name}[/] takes trial {best[0].number}'s merge and {what}"
    )
    _drive(stage, store, new=new, stop_from=chain)


def _next_stage(config: StudyConfig, store, made: StudyConfig) -> tuple[StudyConfig, bool]:
    """The chain's next stage, and whether it is new: the stored one when an earlier run
    started it (a resume), else `made`. A study of that name that this chain did not make
    is refused, never taken over."""
    existing = store.get_study(made.name, missing_ok=True)
    if existing is None:
        return made, True
    stored = StudyConfig.from_yaml(existing.config_yaml, source=f"study {made.name!r}")
    if not stored.is_stage_of(config):
        raise fail(
            f"study {made.name!r} exists and is not the next stage of {config.name!r}, which "
            "runs its next stage under that name: rename one of the two studies",
            2,
        )
    return stored, False


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="study config YAML")],
    study: Annotated[str | None, typer.Option("--study", help="study name")] = None,
    storage: StorageOpt = None,
) -> None:
    """Start a new study from a config."""
    try:
        cfg = StudyConfig.load(config, name=study)
    except ConfigError as e:
        raise fail(str(e), 2) from e
    url = _storage_url(storage, cfg)
    _preflight(cfg, url)
    refuse_unfit(cfg)
    store = _open_store(url)
    _drive(cfg, store, new=True)
    _print_chain_best(store, cfg)


@app.command()
def resume(study: str, storage: StorageOpt = None) -> None:
    """Continue an interrupted or stopped study from its database state."""
    url = _storage_url(storage)
    store = _open_store(url, create=False)
    row = store.get_study(study, missing_ok=True)
    if row is None:
        raise fail(f"no study named {study!r} in {store.url}", 2)
    cfg = StudyConfig.from_yaml(row.config_yaml, source=f"study {study!r}")
    _preflight(cfg, url)
    _drive(cfg, store, new=False)
    _print_chain_best(store, cfg)


def _print_chain_best(store, config: StudyConfig) -> None:
    """The best of the study, and of each later stage of its chain (PS+DFS's routes, ...)."""
    from evomerge.chain import later_stages

    for name in (config.name, *later_stages(store, config)):
        _print_best(store, name, top=3)


@app.command()
def stop(
    study: str,
    cancel: Annotated[
        bool, typer.Option("--cancel", help="abandon running trials now (re-asked on resume)")
    ] = False,
    storage: StorageOpt = None,
) -> None:
    """Ask a study's live run to stop: running trials finish first, unless --cancel. A fusion
    job stops at once and resumes from its last checkpoint."""
    store = _open_store(_storage_url(storage), create=False)
    if store.get_study(study, missing_ok=True) is None:
        if store.fusion_job(study, missing_ok=True) is None:
            raise fail(f"no study or fusion job named {study!r} in {store.url}", 2)
        with _storage_errors():
            store.request_fusion_stop(study)
        console.print(f"stop requested for fusion job {study}")
        return
    with _storage_errors():
        store.request_stop(study, "cancel" if cancel else "stop")
    console.print(f"{'cancel' if cancel else 'stop'} requested for study {study}")


@app.command()
def status(
    study: Annotated[str | None, typer.Argument()] = None,
    storage: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Studies and fusion jobs in the database, or one's runs and counts (works during a
    run)."""
    store = _open_store(_storage_url(storage), create=False)
    stale_after_s = HeartbeatConfig().stale_after_s  # silent this long: dead (as the dashboard)
    rows = [
        r
        for r in store.list_studies(stale_after_s=stale_after_s)
        if study is None or r.name == study
    ]
    jobs = [
        j
        for j in store.list_fusion_jobs(stale_after_s=stale_after_s)
        if study is None or j.name == study
    ]
    if study is not None and not rows and not jobs:
        raise fail(f"no study or fusion job named {study!r} in {store.url}", 2)
    runs = store.runs(study) if study and rows else []
    steps = {j.name: len(store.fusion_steps(j.name)) for j in jobs}
    if as_json:
        out = {
            "studies": [_plain(r) for r in rows],
            "runs": [_plain(r) for r in runs],
            "fusion_jobs": [  # its config is `fuse`'s input, not its status
                {k: v for k, v in _plain(j).items() if k != "config_yaml"}
                | {"steps": steps[j.name]}
                for j in jobs
            ],
        }
        console.print_json(json.dumps(out, default=str))
        return
    table = Table("study", "status", "complete/budget", "failed", "best", "last activity")
    for r in rows:
        best = "-" if r.best_fitness is None else f"{r.best_fitness:.4f}"
        table.add_row(
            r.name,
            r.status,
            f"{r.trials_complete}/{'-' if r.budget_trials is None else r.budget_trials}",
            str(r.trials_failed),
            best,
            str(r.last_activity or "-"),
        )
    if rows or not jobs:
        console.print(table)
    if jobs:
        ft = Table("fusion job", "status", "steps", "process", "last activity", "error")
        for j in jobs:
            process = f"pid {j.pid} on {j.host}" if j.pid is not None else "-"
            last = max(t for t in (j.updated_at, j.heartbeat_at) if t is not None)
            ft.add_row(j.name, j.status, str(steps[j.name]), process, str(last), j.error or "")
        console.print(ft)
    if runs:
        rt = Table("run", "status", "pid", "host", "started", "ended", "heartbeat", "exit")
        for r in runs:
            rt.add_row(
                str(r.id),
                r.status,
                str(r.pid),
                r.host,
                str(r.started_at),
                str(r.ended_at or "-"),
                str(r.heartbeat_at),
                r.exit_reason or "",
            )
        console.print(rt)


def _plain(row: object) -> dict:
    return row.model_dump() if hasattr(row, "model_dump") else dict(vars(row))


def _print_best(
    store, study: str | None, top: int, as_json: bool = False, method: str | None = None
) -> list:
    rows = store.best(study, top=top, method=method)
    if as_json:
        console.print_json(json.dumps([_plain(r) for r in rows], default=str))
        return rows
    from evomerge.recipe import Recipe

    table = Table("study", "trial", "fitness", "held-out", "method", "recipe (means)")
    for r in rows:
        summary = Recipe.from_json(r.recipe_json).summary()
        held = "-" if r.heldout is None else f"{r.heldout:.4f}"
        params = {k: v for k, v in summary.items() if k not in ("method", "hash")}
        table.add_row(
            r.study, str(r.number), f"{r.fitness:.4f}", held, summary["method"], json.dumps(params)
        )
    console.print(table)
    return rows


@app.command()
def best(
    study: Annotated[str | None, typer.Argument(help="a study; all studies when left out")] = None,
    top: Annotated[int, typer.Option("--top", min=1)] = 5,
    method: Annotated[str | None, typer.Option("--method")] = None,
    storage: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The best recipes of a study (or across studies), by search fitness."""
    store = _open_store(_storage_url(storage), create=False)
    with _storage_errors():
        _print_best(store, study, top, as_json, method)


@app.command("export")
def export_trial(
    study: str,
    out: Annotated[Path, typer.Option("--out", help="checkpoint folder to write")],
    trial: Annotated[int | None, typer.Option("--trial", help="default: the best")] = None,
    mergekit_yaml: Annotated[Path | None, typer.Option("--mergekit-yaml")] = None,
    storage: StorageOpt = None,
) -> None:
    """Write a trial's merged model as a Hugging Face checkpoint (and mergekit YAML)."""
    from evomerge.export import export_recipe
    from evomerge.recipe import Recipe

    store = _open_store(_storage_url(storage), create=False)
    with _storage_errors():
        rows = store.best(study, top=1) if trial is None else [store.trial(study, trial)]
    if not rows or rows[0] is None:
        missing = "complete trial" if trial is None else f"trial {trial}"
        raise fail(f"study {study!r} has no {missing}", 2)
    row = rows[0]
    if row.state != "COMPLETE":
        why = f" ({row.error})" if row.error else ""
        said = f"trial {row.number} is {row.state}{why}: the checkpoint is unscored"
        console.print(said, highlight=False, markup=False)
    cfg = StudyConfig.from_yaml(store.get_study(study).config_yaml)
    scores = {
        "search": row.metrics,
        "search_fitness": row.fitness,
        "held-out": row.heldout_metrics,
        "held-out_fitness": row.heldout,
    }
    try:
        export_recipe(Recipe.from_json(row.recipe_json), cfg, out, scores, mergekit_yaml)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise fail(str(e), 2) from e
    console.print(f"exported trial {row.number} of {study} to {out}")


@app.command()
def demo(
    storage: StorageOpt = None,
    study: Annotated[str | None, typer.Option("--study")] = None,
) -> None:
    """Build the toy zoo if missing, run the demo search, and compare with every source."""
    from evomerge.demo import run_demo

    url = _storage_url(storage)
    run_demo(CONFIGS_DIR / "demo.yaml", _open_store(url), study, _drive)
