"""`evomerge fuse CONFIG`: a FuseLLM fusion job (evomerge.fusion), recorded in the store."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table

from evomerge.cli.app import app, console, err_console, exit_on_sigterm, fail
from evomerge.cli.study import StorageOpt, _open_store
from evomerge.config import ConfigError, HeartbeatConfig
from storage import LeaseLostError, StudyBusyError, StudyExistsError
from storage.lease import Heartbeat


@app.command()
def fuse(
    config: Annotated[Path, typer.Argument(help="fusion config YAML (see configs/fusion/)")],
    control: Annotated[
        bool, typer.Option("--control", help="the CLM-only control: λ = 1, job NAME-clm")
    ] = False,
    storage: StorageOpt = None,
) -> None:
    """Fuse the sources' knowledge into the target by continual training (FuseLLM); rerun
    the same command to resume a job from its last checkpoint."""
    from evomerge.fusion.job import FusionConfig, prepare, train, train_on_ray
    from storage import default_storage_url

    def say(line: str) -> None:
        err_console.print(f"[dim]{line}")

    try:
        cfg = FusionConfig.load(config)
        cfg = cfg.control() if control else cfg
        _zoo_parts(cfg)
        cfg.check()
    except ConfigError as e:
        raise fail(str(e), 2) from e
    url = storage or cfg.storage or default_storage_url()
    store = _open_store(url)
    job = store.fusion_job(cfg.name, missing_ok=True)
    if job is None:
        try:
            job = store.create_fusion_job(cfg.name, cfg.to_yaml(), str(cfg.out_dir()))
        except StudyExistsError:  # another `fuse` created it just now: the claim decides
            job = store.fusion_job(cfg.name)
    else:
        cfg = FusionConfig.model_validate(yaml.safe_load(job.config_yaml))
        console.print(
            f"fusion job [bold]{cfg.name}[/] exists ({job.status}): resuming it with its "
            "stored config"
        )
    stale = HeartbeatConfig()  # as a study's run: silent this long, the job is dead
    pid = os.getpid()
    exit_on_sigterm()
    try:
        store.claim_fusion_job(cfg.name, pid, socket.gethostname(), stale.stale_after_s)
    except StudyBusyError as e:
        raise fail(str(e), 3) from e
    stopping = threading.Event()

    def heartbeat() -> None:
        """The lease's beat; a stop request (`evomerge stop`, the dashboard) ends the job as
        SIGTERM does, once: `stopped`, resumed from its last checkpoint."""
        if store.fusion_heartbeat(cfg.name, pid) and not stopping.is_set():
            stopping.set()
            say("stop requested: stopping now (the job resumes from its last checkpoint)")
            os.kill(pid, signal.SIGTERM)

    beat = Heartbeat(heartbeat, stale.interval_s, f"fusion job {cfg.name}")
    beat.start()
    try:
        try:
            examples = prepare(cfg, say)
            if cfg.workers:
                model = train_on_ray(cfg, examples, Path(job.out_dir), url)
            else:
                model = train(
                    cfg,
                    examples,
                    Path(job.out_dir),
                    say,
                    on_checkpoint=lambda steps: _record(store, beat, cfg.name, steps),
                )
            evaluation = _evaluate(cfg, model, say) if cfg.evaluate else None
        finally:  # before any status is written: a stop request's SIGTERM cannot cut it short
            beat.stop()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM: resumable, not failed
        store.set_fusion_job(cfg.name, "stopped")
        again = f"evomerge fuse {config}" + (" --control" if control else "")
        console.print(f"fusion job {cfg.name!r} stopped; `{again}` resumes it from its checkpoint")
        raise
    except LeaseLostError as e:  # the job is another process's now: leave its record alone
        raise fail(f"{e}; this process stops", 3) from e
    except Exception as e:
        store.set_fusion_job(cfg.name, "failed", error=f"{type(e).__name__}: {e}")
        raise fail(f"fusion job {cfg.name!r} failed: {e}", 1) from e
    store.set_fusion_job(cfg.name, "finished", evaluation=evaluation)
    console.print(f"fusion job [bold]{cfg.name}[/]: finished; the fused model is {model}")
    if evaluation:
        console.print(_table(cfg.name, evaluation))


def _record(store, beat: Heartbeat, name: str, steps: list[dict[str, float]]) -> None:
    """A checkpoint's losses, while this process still holds the job."""
    beat.check()
    store.record_fusion_steps(name, steps)


def _zoo_parts(cfg) -> None:
    """Build the toy zoo, and its fusion part, when the config names them and they are
    missing (minutes, once; cached)."""
    refs = (cfg.target, *cfg.sources, cfg.corpus)
    if cfg.zoo is None or not any(r.startswith("zoo:") for r in refs):
        return
    from evomerge.zoo import build_zoo
    from evomerge.zoo.fusion import FUSION, build_fusion

    root = build_zoo(cfg.zoo)
    if any(r.startswith(f"zoo:{FUSION}/") for r in refs):
        build_fusion(root)


def _evaluate(cfg, fused: Path, say) -> dict[str, dict[str, float]]:
    """Held-out metrics of the fused target, the target before, and every source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness import Evaluator
    from evomerge.zoo import default_zoo_dir

    assert cfg.evaluate is not None
    zoo_dir = default_zoo_dir(cfg.zoo or "demo")
    evaluator = Evaluator(
        list(cfg.evaluate.tasks), split="held-out", limit=cfg.evaluate.limit, zoo_dir=zoo_dir
    )
    target, sources, _ = cfg.paths()
    out = {}
    models = [("fused", fused), ("target", target), *zip(cfg.sources, sources, strict=True)]
    for name, folder in models:
        say(f"scoring {name} on held-out")
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        score = evaluator.score(model, AutoTokenizer.from_pretrained(folder))
        out[name] = {**score.metrics, "mean": score.fitness}
    return out


def _table(name: str, evaluation: dict[str, dict[str, float]]) -> Table:
    columns = list(next(iter(evaluation.values())))
    table = Table("model", *columns, title=f"{name}: held-out")
    for model, metrics in evaluation.items():
        table.add_row(model, *(f"{metrics[c]:.3f}" for c in columns))
    return table
