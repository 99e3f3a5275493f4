"""Command: dashboard."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from evomerge.cli.app import app, console, fail
from evomerge.cli.study import CONFIGS_DIR, StorageOpt, _storage_url


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def dashboard(
    host: Annotated[str, typer.Option("--host", help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    storage: StorageOpt = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="EVOMERGE_TOKEN",
            help="required on every request; needed to bind beyond loopback",
        ),
    ] = None,
    model_root: Annotated[
        list[Path] | None,
        typer.Option("--model-root", help="folder studies started here may use (repeatable)"),
    ] = None,
    export_dir: Annotated[
        Path, typer.Option("--export-dir", help="where checkpoints are exported")
    ] = Path("exports"),
    configs_dir: Annotated[
        Path, typer.Option("--configs-dir", help="configs offered on the New-study page")
    ] = CONFIGS_DIR,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            envvar="RAY_ADDRESS",
            help="the Ray cluster studies started here may name in workers.ray_address",
        ),
    ] = None,
    stop_runs_on_exit: Annotated[
        bool,
        typer.Option(
            "--stop-runs-on-exit",
            help="on SIGTERM, stop this host's live runs first (a container's dashboard)",
        ),
    ] = False,
) -> None:
    """Serve the web dashboard: watch, start, stop, resume, query and export studies."""
    import uvicorn

    from evomerge.dashboard import create_app
    from storage.db import masked

    if not is_loopback(host) and not token:
        raise fail(f"binding {host} needs a token: pass --token or set EVOMERGE_TOKEN", 2)
    url = _storage_url(storage)
    try:
        web = create_app(
            url,
            token=token,
            model_roots=tuple(model_root or ()),
            export_dir=export_dir,
            configs_dir=configs_dir,
            ray_address=ray_address,
            stop_runs_on_exit=stop_runs_on_exit,
        )
    except Exception as e:
        raise fail(f"cannot open storage {masked(url)}: {e}", 2) from e
    shown = f"http://{host}:{port}/" + ("?token=…" if token else "")
    console.print(f"evomerge dashboard on [bold]{shown}[/] (storage {masked(url)})")
    # Open requests get 5 s to finish at shutdown, so a slow one cannot spend the container's
    # grace period before the runs are stopped (--stop-runs-on-exit).
    uvicorn.run(web, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
