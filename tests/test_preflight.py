"""Bad input is refused at once, with exit code 2 naming the field or file, and nothing written.

Each case is a real `evomerge run` (or `resume`, `status`, `stop`) on a real SQLite or
PostgreSQL database, with real model folders copied from the test zoo and then broken.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app
from storage import Store

STUDY = """
name: pre
zoo: test
base: {base}
sources: [{add}, {reverse}]
method: task_arithmetic
search: {{weight: {{low: 0, high: 1}}}}
fitness: {{tasks: [{task}], limit: 4}}
budget: {{trials: 2, heldout_top_k: 0}}
workers: {{count: 1, cpus_per_worker: 0.5, torch_threads: 1}}
"""


@pytest.fixture
def models(zoo_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """Writable copies of the test zoo's base, add and reverse, and its add task."""
    out = {name: shutil.copytree(zoo_dir / name, tmp_path / name) for name in ("base", "add")}
    out["reverse"] = shutil.copytree(zoo_dir / "reverse", tmp_path / "reverse")
    out["task"] = zoo_dir / "tasks" / "add.yaml"
    return out


def write_config(tmp_path: Path, models: dict[str, Path], extra: str = "", **refs: str) -> Path:
    values = {k: str(v) for k, v in models.items()} | refs
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(**values) + extra)
    return path


def run(config: Path, db: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", str(config), "--storage", f"sqlite:///{db}"])
    return result.exit_code, " ".join(result.output.split())


def _empty_weights(m: dict[str, Path]) -> None:
    (m["add"] / "model.safetensors").write_bytes(b"")


def _garbage_weights(m: dict[str, Path]) -> None:
    (m["add"] / "model.safetensors").write_bytes(b"\xff" * 64)


def _garbage_config(m: dict[str, Path]) -> None:
    (m["reverse"] / "config.json").write_text("{not json")


def _no_tokenizer(m: dict[str, Path]) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (m["reverse"] / name).unlink()


@pytest.mark.parametrize(
    ("breakage", "field", "words"),
    [
        (_empty_weights, "sources.0", "add"),
        (_garbage_weights, "sources.0", "add"),
        (_garbage_config, "sources.1", "reverse"),
        (_no_tokenizer, "sources.1", "no tokenizer"),
    ],
    ids=["empty-safetensors", "corrupt-safetensors", "garbage-config", "no-tokenizer"],
)
def test_a_broken_model_folder_is_named_and_nothing_is_written(
    models, tmp_path, breakage: Callable[[dict[str, Path]], None], field: str, words: str
):
    breakage(models)
    db = tmp_path / "study.db"
    code, out = run(write_config(tmp_path, models), db)
    assert code == 2 and f"{field}:" in out and words in out, out
    assert "Traceback" not in out and not db.exists()


def test_sources_of_another_shape_are_refused(models, tiny_llama, tmp_path):
    db = tmp_path / "study.db"
    code, out = run(write_config(tmp_path, models, reverse=str(tiny_llama.base)), db)
    assert code == 2 and "sources.1:" in out and "shape" in out, out
    assert not db.exists()


@pytest.mark.parametrize(
    ("task", "words"), [("zoo:nope", "task file not found"), ("/nowhere/t.yaml", "/nowhere")]
)
def test_an_unknown_or_missing_task_file_is_named(models, tmp_path, task, words):
    db = tmp_path / "study.db"
    code, out = run(write_config(tmp_path, models, task=task), db)
    assert code == 2 and "fitness.tasks.0.task:" in out and words in out, out
    assert not db.exists()


@pytest.mark.parametrize(
    ("workers", "words"),
    [
        ("{count: 16, cpus_per_worker: 1}", "16 workers x 1 CPUs = 16 CPUs asked"),
        ("{count: 1, cpus_per_worker: 1000}", "one worker asks 1000 CPUs"),
        ("{count: 1, gpus_per_worker: 64}", "one worker asks 64 GPUs"),
    ],
)
def test_more_workers_than_the_machine_has_are_refused_at_once(models, tmp_path, workers, words):
    db = tmp_path / "study.db"
    start = time.monotonic()
    code, out = run(write_config(tmp_path, models, extra=f"workers: {workers}\n"), db)
    assert code == 2 and words in out and "the cluster has" in out, out
    assert time.monotonic() - start < 60 and not db.exists()


def test_an_unreachable_ray_address_is_refused_within_the_timeout(models, tmp_path):
    """A subprocess: a failed `ray.init` leaves its process's Ray half set up."""
    extra = "workers: {count: 1, ray_address: '127.0.0.1:9'}\n"
    db = tmp_path / "study.db"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "run", str(write_config(tmp_path, models, extra))],
        env={**os.environ, "EVOMERGE_STORAGE": f"sqlite:///{db}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "workers.ray_address:" in out and "127.0.0.1:9" in out, out
    assert time.monotonic() - start < 90 and not db.exists()


def test_numbers_beyond_the_store_and_non_utf8_files_are_input_errors(models, tmp_path):
    db = tmp_path / "study.db"
    code, out = run(write_config(tmp_path, models, extra="budget: {trials: 1e29}\n"), db)
    assert code == 2 and "budget.trials" in out and "Traceback" not in out, out
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(write_config(tmp_path, models).read_bytes() + "# café\n".encode("latin-1"))
    code, out = run(latin, db)
    assert code == 2 and "not UTF-8" in out and "Traceback" not in out, out
    assert not db.exists()


def test_a_read_only_sqlite_database_is_refused(models, tmp_path):
    db = tmp_path / "study.db"
    Store(f"sqlite:///{db}").migrate()
    result = CliRunner().invoke(
        app, ["run", str(write_config(tmp_path, models)), "--storage", read_only(db)]
    )
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "storage:" in out and "read-only" in out, out
    assert "Traceback" not in out
    assert Store(f"sqlite:///{db}").get_study("pre", missing_ok=True) is None


def read_only(db: Path) -> str:
    """The database opened read-only (a chmod does not stop root, who runs the CI image)."""
    return f"sqlite:///file:{db}?mode=ro&uri=true"


def test_a_postgresql_password_is_never_printed():
    url = "postgresql+psycopg://evomerge:s3cret-pw@127.0.0.1:9/nowhere"
    for args in (["status"], ["resume", "x"], ["stop", "x"]):
        result = CliRunner().invoke(app, [*args, "--storage", url])
        assert result.exit_code == 2 and "127.0.0.1" in result.output, result.output
        assert "s3cret-pw" not in result.output


def test_stop_and_cancel_from_the_command_line(store: Store, db_url: str):
    store.create_study("s", "name: s\n", optuna_study_name="s")
    url = db_url
    assert CliRunner().invoke(app, ["stop", "s", "--storage", url]).exit_code == 0
    assert store.stop_request("s") == "stop"
    assert CliRunner().invoke(app, ["stop", "s", "--cancel", "--storage", url]).exit_code == 0
    assert store.stop_request("s") == "cancel"
    missing = CliRunner().invoke(app, ["stop", "nope", "--storage", url])
    said = " ".join(missing.output.split())
    assert missing.exit_code == 2 and "no study or fusion job named 'nope'" in said


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ("{bogus: 1}", "options: task_arithmetic has no option(s) ['bogus']"),
        ("{normalize: 1}", "options.normalize: must be true or false"),
        ("{lambda: .nan}", "options.lambda: must be a finite number"),
    ],
)
def test_options_the_method_lacks_are_refused_before_any_trial(models, tmp_path, options, words):
    db = tmp_path / "study.db"
    config = write_config(tmp_path, models, extra=f"options: {options}\n")
    code, out = run(config, db)
    assert code == 2 and words in out, out
    assert not db.exists()
    plan = CliRunner().invoke(app, ["plan", str(config)])
    assert plan.exit_code == 2 and words in " ".join(plan.output.split()), plan.output


def test_mixture_models_and_prompt_tasks_are_checked_before_the_merge_stage(models, tmp_path):
    db = tmp_path / "study.db"
    mixture = "mixture: {others: [/nowhere/m], prompts: [[zoo:add], [zoo:nope]]}\n"
    code, out = run(write_config(tmp_path, models, extra=mixture), db)
    assert code == 2 and "mixture.others.0: /nowhere/m" in out, out
    assert "mixture.prompts.1.0: zoo:nope" in out and not db.exists()


def test_a_locked_sqlite_database_is_not_called_read_only(models, tmp_path):
    db = tmp_path / "study.db"
    Store(f"sqlite:///{db}").migrate()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        code, out = run(write_config(tmp_path, models), db)
    finally:
        holder.close()
    assert code == 2 and "locked by another connection" in out and "read-only" not in out, out
    assert Store(f"sqlite:///{db}").get_study("pre", missing_ok=True) is None


def test_reading_commands_name_what_is_missing_and_create_nothing(store: Store, tmp_path):
    typo = tmp_path / "typo.db"
    for args in (
        ["status"],
        ["best"],
        ["resume", "s"],
        ["stop", "s"],
        ["export", "s", "--out", str(tmp_path / "o")],
    ):
        result = CliRunner().invoke(app, [*args, "--storage", f"sqlite:///{typo}"])
        out = " ".join(result.output.split())
        assert result.exit_code == 2 and f"no database at {typo}" in out, (args, out)
    assert not typo.exists()
    for args in (["best", "nope"], ["export", "nope", "--out", str(tmp_path / "o")]):
        result = CliRunner().invoke(app, [*args, "--storage", store.url])
        assert result.exit_code == 2 and "no study named 'nope'" in result.output, result.output
        assert "Traceback" not in result.output


def test_stopping_through_a_read_only_database_says_so(tmp_path):
    db = tmp_path / "study.db"
    with Store(f"sqlite:///{db}") as store:
        store.migrate()
        store.create_study("s", "name: s\n", optuna_study_name="s")
    result = CliRunner().invoke(app, ["stop", "s", "--storage", read_only(db)])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "read-only" in out and "Traceback" not in out, out
