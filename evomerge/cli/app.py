"""The typer application and the conventions every command shares."""

from __future__ import annotations

import os
import signal
import threading

import typer
from rich.console import Console

app = typer.Typer(
    name="evomerge",
    help="Evolutionary model merging: search merge recipes with CMA-ES.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
# Tokenizers' thread pool and Ray's forked workers do not mix; workers need no parallel tokenizing.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The commands draw their own progress; transformers' per-checkpoint bars would interleave.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error and return the Exit to raise (code 2: bad input)."""
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill`, a scheduler's or a container's stop) end this process as Ctrl-C
    does, through `SystemExit`, so a run or a fusion job records itself `stopped`. Ray's
    driver sets the same handler, but only where it starts Ray in the main thread; not when
    pre-flight has joined a cluster (workers.ray_address, RAY_ADDRESS)."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():  # only there can it be set
        signal.signal(signal.SIGTERM, stop)
