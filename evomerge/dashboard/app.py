"""The dashboard's FastAPI application: server-rendered pages over one study database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import platformdirs
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from evomerge.cli.study import CONFIGS_DIR
from evomerge.config import HeartbeatConfig
from evomerge.dashboard import best, fusion, similarity, studies, trials
from evomerge.dashboard.context import HERE, Context, make_templates
from evomerge.dashboard.guard import Guard
from evomerge.dashboard.launch import LaunchBusy, Launcher, stop_host_runs
from evomerge.dashboard.paths import PathRefused
from evomerge.dashboard.queries import Queries
from storage import StorageError, Store, UnknownStudyError, UnknownTrialError
from storage.db import make_engine

MAX_BODY_BYTES = 1 << 20
# How long a dashboard that stops its host's runs waits for them (docker-compose.yml gives
# its container 60 s between SIGTERM and SIGKILL).
STOP_RUNS_WAIT_S = 45.0


def create_app(
    storage_url: str,
    *,
    token: str | None = None,
    model_roots: tuple[Path, ...] = (),
    export_dir: Path = Path("exports"),
    configs_dir: Path = CONFIGS_DIR,
    run_dir: Path | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    ray_address: str | None = None,
    stop_runs_on_exit: bool = False,
) -> FastAPI:
    """The dashboard on `storage_url`.

    `token`: required on every request (always set it when binding beyond loopback).
    `model_roots`: folders a study started here may take models and task files from.
    `export_dir`: where checkpoints are exported. `configs_dir`: the configs offered on the
    New-study page. `run_dir`: logs and config snapshots of the commands started here.
    `ray_address`: the Ray cluster a study started here may name in `workers.ray_address`.
    `stop_runs_on_exit`: on shutdown, stop every live run of this host (a container's
    dashboard; see `stop_host_runs`).
    """
    store = Store(storage_url)
    store.migrate()
    stale_after_s = HeartbeatConfig().stale_after_s

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if stop_runs_on_exit:
            await asyncio.to_thread(stop_host_runs, store, stale_after_s, STOP_RUNS_WAIT_S)

    app = FastAPI(
        title="evomerge dashboard",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.ctx = Context(
        store=store,
        queries=Queries(make_engine(storage_url)),
        launcher=Launcher(
            storage_url, run_dir or platformdirs.user_state_path("evomerge") / "runs", store
        ),
        templates=make_templates(),
        model_roots=tuple(Path(r).resolve() for r in model_roots),
        export_dir=Path(export_dir).resolve(),
        configs_dir=Path(configs_dir).resolve(),
        # A `running` study whose run has been silent this long is shown as interrupted.
        stale_after_s=stale_after_s,
        ray_address=ray_address,
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for module in (studies, trials, best, similarity, fusion):
        app.include_router(module.router)
    app.add_middleware(Guard, token=token, max_body=max_body_bytes)
    for error, status in (
        (UnknownStudyError, 404),
        (UnknownTrialError, 404),
        (PathRefused, 400),
        (LaunchBusy, 409),  # a second click while the first command starts up
        (RequestValidationError, 400),
        (StorageError, 503),
    ):
        app.add_exception_handler(error, _error_page(status))
    return app


def _error_page(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
    """An exception handler that answers with the error page and `status`."""

    async def handler(request: Request, exc: Exception) -> Response:
        ctx: Context = request.app.state.ctx
        if isinstance(exc, RequestValidationError):
            message = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in exc.errors())
        else:
            message = str(exc)
        return ctx.render(request, "error.html", status, status=status, message=message)

    return handler
