"""DFS and PS+DFS studies end to end: real zoo, real Ray workers, real databases, export."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import optuna
import pytest
import typer
from transformers import AutoModelForCausalLM, AutoTokenizer

import evomerge.dataflow  # noqa: F401  (registers the path model with the Auto classes)
from evomerge.config import StudyConfig
from evomerge.coordinator import Coordinator
from evomerge.export import export_recipe
from evomerge.fitness import Evaluator
from evomerge.recipe import Recipe
from storage import Store

DFS = """
name: {name}
zoo: test
method: dataflow
sources: [zoo:add, zoo:reverse]
dataflow: {{repeats: 2, scales: pair}}
fitness: {{tasks: [zoo:add, zoo:reverse], limit: 16, heldout_limit: 16}}
optimizer: {{population: 4}}
budget: {{trials: {trials}, heldout_top_k: 2}}
workers: {{count: 2, cpus_per_worker: 0.5, torch_threads: 1}}
heartbeat: {{interval_s: 0.5, stale_after_s: 3}}
"""

PS_DFS = """
name: psdfs
zoo: test
base: zoo:base
sources: [zoo:add, zoo:reverse]
method: task_arithmetic
granularity: 2
search: {weight: {low: 0, high: 1}}
dataflow: {b: zoo:reverse, repeats: 2, scales: hop, trials: 4}
fitness: {tasks: [zoo:add, zoo:reverse], limit: 16, heldout_limit: 16}
optimizer: {population: 4}
budget: {trials: 4, heldout_top_k: 1}
workers: {count: 2, cpus_per_worker: 0.5, torch_threads: 1}
"""


def test_dataflow_study_records_routes_and_exports_the_scored_model(
    zoo_dir, ray_local, store, tmp_path
):
    cfg = StudyConfig.from_yaml(DFS.format(name="dfs", trials=6))
    store.create_study(cfg.name, cfg.to_yaml(), optuna_study_name=cfg.name, budget_trials=6)
    summary = Coordinator(cfg, store).run()
    assert summary.status == "finished" and summary.complete == 6, summary.reason
    rows = store.trials(cfg.name, state="COMPLETE")
    recipes = [Recipe.from_json(r.recipe_json) for r in rows]
    assert all(r.method == "dataflow" and r.dataflow.path[0] == (0, 0) for r in recipes)
    assert len({r.hash for r in recipes}) > 1  # CMA-ES moved the route
    best = store.best(cfg.name, top=1, method="dataflow")[0]
    assert best.heldout is not None

    out = export_recipe(Recipe.from_json(best.recipe_json), cfg, tmp_path / "best")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "PathForCausalLM"
    assert (out / "mergekit_config.yml").read_text().startswith("# mergekit passthrough")
    tasks = [t.task for t in cfg.fitness.tasks]
    search = Evaluator(tasks, [1.0, 1.0], split="search", limit=16, zoo_dir=zoo_dir)
    score = search.score(model, AutoTokenizer.from_pretrained(out))
    assert score.fitness == pytest.approx(best.fitness, abs=1e-9)
    # `evomerge eval` loads the export too, in a process that imported nothing of ours
    args = ("eval", str(out), "--task", "zoo:add", "--task", "zoo:reverse", "--limit", "16")
    scored = _cli(*args, "--zoo", "test", "--json", env=dict(os.environ))
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert json.loads(scored.stdout)[str(out)]["fitness"] == pytest.approx(best.fitness, abs=1e-9)


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_ps_dfs_chains_stage_two_and_is_queried_like_any_study(zoo_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'chain.db'}"
    env = {**os.environ, "EVOMERGE_STORAGE": url}
    cfg_path = tmp_path / "psdfs.yaml"
    cfg_path.write_text(PS_DFS)
    done = _cli("run", str(cfg_path), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"│ psdfs-dfs\s*│\s*\d+\s*│", done.stdout), done.stdout  # stage 2's best
    store = Store(url)
    stage1 = store.best("psdfs", top=1, by="heldout")[0]
    rows = store.trials("psdfs-dfs", state="COMPLETE")
    assert len(rows) == 4
    for row in rows:  # every route's model A is stage 1's best merge
        recipe = Recipe.from_json(row.recipe_json)
        assert recipe.merge_part() == Recipe.from_json(stage1.recipe_json).merge_part()
        assert recipe.dataflow.models == ("@merge", "zoo:reverse")
    # resuming the finished chain adds nothing; status, best and export work on stage 2
    again = _cli("resume", "psdfs", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(store.trials("psdfs-dfs")) == 4 and len(store.runs("psdfs-dfs")) == 2
    status = _cli("status", "psdfs-dfs", "--json", env=env)
    assert '"finished"' in status.stdout
    best = _cli("best", "psdfs-dfs", "--json", env=env)
    assert best.returncode == 0 and "dataflow" in best.stdout, best.stdout
    out = tmp_path / "export"
    exported = _cli("export", "psdfs-dfs", "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert (out / "merge_config.yml").is_file() and (out / "config.json").is_file()


def test_models_that_cannot_be_routed_are_refused_before_anything_is_written(
    zoo_dir, tiny_llama, tmp_path
):
    """A route between models of different widths is exit 2, naming B, with no study."""
    from typer.testing import CliRunner

    from evomerge.cli import app

    cfg = tmp_path / "bad.yaml"
    text = DFS.format(name="narrow", trials=2).replace(
        "[zoo:add, zoo:reverse]", f"[zoo:add, {tiny_llama.base}]", 1
    )
    cfg.write_text(text)
    url = f"sqlite:///{tmp_path / 'refused.db'}"
    result = CliRunner().invoke(app, ["run", str(cfg), "--storage", url])
    assert result.exit_code == 2, result.output
    assert "hidden size 128 (A) and 32 (B" in " ".join(result.output.split())
    assert not (tmp_path / "refused.db").exists()  # pre-flight: not even a table written


def test_a_chain_never_takes_over_a_study_that_has_its_stage_name(zoo_dir, tmp_path):
    """A PS+DFS study runs stage 2 as NAME-dfs: an unrelated study of that name (here a DFS
    study) is refused before stage 1 starts, and again when stage 2 would resume it."""
    from typer.testing import CliRunner

    from evomerge.cli import app
    from evomerge.cli.study import _next_stage

    url = f"sqlite:///{tmp_path / 'taken.db'}"
    store = Store(url)
    store.migrate()
    unrelated = StudyConfig.from_yaml(DFS.format(name="psdfs-dfs", trials=4))
    store.create_study(unrelated.name, unrelated.to_yaml(), optuna_study_name=unrelated.name)
    cfg = tmp_path / "psdfs.yaml"
    cfg.write_text(PS_DFS)
    result = CliRunner().invoke(app, ["run", str(cfg), "--storage", url])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "study 'psdfs-dfs' exists, and a later stage of 'psdfs' runs under that name" in said
    assert store.get_study("psdfs", missing_ok=True) is None
    assert "psdfs" not in optuna.get_all_study_names(store.optuna_storage())  # nothing written

    chain = StudyConfig.from_yaml(PS_DFS)
    with pytest.raises(typer.Exit):  # stage 1 finished: stage 2 would start
        _next_stage(chain, store, chain.dataflow_stage('"merge"'))
    store = Store(f"sqlite:///{tmp_path / 'own.db'}")
    store.migrate()
    own = chain.dataflow_stage('"merge of the first run"')
    store.create_study(own.name, own.to_yaml(), optuna_study_name=own.name)
    stage, new = _next_stage(chain, store, chain.dataflow_stage('"merge"'))
    assert stage == own and not new  # its own stage, resumed on the merge it started with
