"""Model-GLUE in one command: the plan from a zoo analysis, mixture studies, and `evomerge
glue` on the test zoo (cluster, select, evolve, mix, report), resumed after a SIGKILL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import evomerge.glue  # noqa: F401  (registers the mixture with the Auto classes)
from evomerge.config import ConfigError, StudyConfig
from evomerge.coordinator import Coordinator
from evomerge.fitness import Evaluator
from evomerge.glue.kinship import ZooAnalysis
from evomerge.glue.mixture import MixtureForCausalLM
from evomerge.glue.pipeline import GlueConfig, plan, selection_study
from evomerge.recipe import Recipe
from storage import Store
from tests.test_coordinator import _evomerge, register
from tests.test_dashboard import make_client
from tests.test_glue_selection import _kill_when

STUDY = {
    "method": "task_arithmetic",
    "granularity": 4,
    "search": {"weight": {"low": 0, "high": 2.4}},
    "options": {"normalize": False},
    "optimizer": {"kind": "average", "scale": 2.4, "evolve": 3},
    "fitness": {"tasks": ["zoo:add", "zoo:reverse", "zoo:translate", "zoo:upper"], "limit": 32},
    "mixture": {"layers": [2, 4], "pooling": ["mean", "last"], "prompts_per_task": 4},
    "budget": {"trials": 40, "heldout_top_k": 1},
    "workers": {"count": 2, "cpus_per_worker": 1, "torch_threads": 1},
    "heartbeat": {"interval_s": 0.5, "stale_after_s": 3},
}
FAMILY = ("base", "add", "reverse", "translate", "harmful")
MODELS = ("zoo:add", "zoo:reverse", "zoo:translate", "zoo:harmful", "zoo:stranger", "zoo:upper2")


def glue_config(**changes) -> GlueConfig:
    data = {
        "name": "g",
        "zoo": "test",
        "base": "zoo:base",
        "models": list(MODELS),
        "merge_tasks": ["zoo:add", "zoo:reverse", "zoo:translate"],
        "experts": {"zoo:upper2": ["zoo:upper"]},
        "study": STUDY,
    }
    return GlueConfig.model_validate(data | changes)


def analysis(clusters) -> ZooAnalysis:
    names = tuple(n for c in clusters for n in c)
    matrix = tuple(tuple(1.0 for _ in names) for _ in names)
    return ZooAnalysis(names, matrix, {}, tuple(clusters), 0.95)


def test_the_plan_merges_the_base_family_and_mixes_the_named_expert_of_another() -> None:
    chosen = plan(glue_config(), analysis([FAMILY, ("stranger", "upper2")]))
    assert chosen.merged == ("zoo:add", "zoo:reverse", "zoo:translate", "zoo:harmful")
    assert chosen.mixed == ("zoo:upper2",)
    assert "not mixed" in chosen.left_out["zoo:stranger"]
    stage1 = selection_study(glue_config(), chosen)
    assert stage1.base == "zoo:base" and stage1.sources == chosen.merged
    assert stage1.mixture.others == ("zoo:upper2",)
    assert stage1.mixture.prompts == (
        ("zoo:add", "zoo:reverse", "zoo:translate"),
        ("zoo:upper",),
    )
    assert stage1.later_stages() == ("g-evolve", "g-evolve-mix")


def test_an_expert_inside_the_family_is_merged_not_mixed() -> None:
    config = glue_config(experts={"zoo:add": ["zoo:add"]})
    chosen = plan(config, analysis([FAMILY, ("stranger", "upper2")]))
    assert chosen.mixed == () and "merged, so not mixed" in chosen.left_out["zoo:add"]
    assert selection_study(config, chosen).mixture is None


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parents[1].glob("configs/glue/*.yaml")), ids=lambda p: p.name
)
def test_shipped_glue_configs_make_valid_studies(path: Path) -> None:
    config = GlueConfig.load(path)
    names = {ref: name for name, ref in config.refs().items()}
    apart = tuple(names[m] for m in config.models if m in config.experts or "stranger" in m)
    family = tuple(n for n in names.values() if n not in apart)
    stage1 = selection_study(config, plan(config, analysis([family, apart])))
    assert stage1.mixture is not None and stage1.evolve_next


@pytest.mark.parametrize(
    ("changes", "clusters", "error"),
    [
        ({"experts": {"zoo:nope": ["zoo:upper"]}}, [FAMILY, ("stranger", "upper2")], "nope"),
        ({}, [("base", "add"), ("reverse", "translate", "harmful", "stranger", "upper2")], "1 "),
        ({"study": {**STUDY, "name": "x"}}, [FAMILY, ("stranger", "upper2")], "study.name"),
    ],
)
def test_glue_config_errors_name_the_problem(changes, clusters, error) -> None:
    config = glue_config(**changes)
    with pytest.raises(ConfigError, match=error):
        selection_study(config, plan(config, analysis(clusters)))


@pytest.mark.parametrize(
    ("mixture", "error"),
    [
        ({"prompts": [["zoo:add"]]}, "1 task lists for 2 experts"),
        ({"prompts": [["zoo:add"], []]}, "expert 1 has no task"),
        ({"prompts": [["zoo:add"], ["zoo:upper"]], "layers": [1, 1]}, "distinct layer"),
        ({"prompts": [["zoo:add"], ["zoo:upper"]], "others": ["zoo:x"]}, "mixes its sources"),
    ],
)
def test_mixture_study_config_errors(mixture, error) -> None:
    data = {
        "name": "m",
        "method": "mixture",
        "sources": ["zoo:add", "zoo:upper"],
        "fitness": {"tasks": ["zoo:add"]},
        "mixture": mixture,
    }
    with pytest.raises(ConfigError, match=error):
        StudyConfig.from_yaml(json.dumps(data))


MIX = """
name: mix
zoo: test
method: mixture
sources: [zoo:translate, zoo:stranger-upper, zoo:reverse]
mixture:
  prompts: [[zoo:translate], [zoo:upper], [zoo:reverse]]
  layers: [2, 4]
  pooling: [last]
  prompts_per_task: 4
fitness: {tasks: [zoo:translate, zoo:upper, zoo:reverse], limit: 32, heldout_limit: 64}
budget: {trials: 50, heldout_top_k: 1}
workers: {count: 2, cpus_per_worker: 0.5, torch_threads: 1}
"""


def test_a_mixture_study_scores_each_router_candidate_once(zoo_dir, ray_local, store) -> None:
    """Three whole models (two families) behind a router: one trial per router candidate,
    the study ends when the candidates do, and its best mixture beats each expert."""
    cfg = StudyConfig.from_yaml(MIX)
    register(store, cfg)
    summary = Coordinator(cfg, store).run()
    assert summary.status == "finished" and summary.reason == "every router candidate scored"
    rows = store.trials("mix")
    assert sorted(Recipe.from_json(r.recipe_json).mixture.layer for r in rows) == [2, 4]
    best = store.best("mix", top=1, by="heldout")[0]
    table = json.loads((zoo_dir / "zoo.json").read_text())["held_out"]
    for expert in ("translate", "stranger-upper", "reverse"):
        skills = ("translate", "upper", "reverse")
        assert best.heldout > sum(table[expert][s] for s in skills) / 3 + 0.2, expert


def test_a_mixture_of_other_tokenizers_is_refused(zoo_dir, tmp_path) -> None:
    from tests.fixtures_models import make_family

    other = make_family(tmp_path, "llama", n_sources=0).base
    text = MIX.replace("zoo:reverse]\nmixture", f"{other}]\nmixture")
    with pytest.raises(ValueError, match=r"tokenizers differ.*mixes models that share"):
        Coordinator(StudyConfig.from_yaml(text), Store(f"sqlite:///{tmp_path / 'x.db'}"))


def _write(tmp_path: Path, **changes) -> Path:
    data = glue_config(
        models=[*MODELS[:-1], "zoo:stranger-upper"],
        experts={"zoo:stranger-upper": ["zoo:upper"]},
        **changes,
    ).model_dump()
    path = tmp_path / "glue.yaml"
    path.write_text(json.dumps(data))
    return path


def test_glue_on_the_test_zoo_beats_every_model_and_resumes_to_the_same_report(
    zoo_dir, tmp_path
) -> None:
    """The whole recipe through the CLI: the mixture of the selected merge with the other
    family's expert beats every single model and every merge on held-out; a rerun scores
    nothing again; the mixture exports and loads with the Auto classes, scoring the same."""
    url = f"sqlite:///{tmp_path / 'glue.db'}"
    env = {**os.environ, "EVOMERGE_STORAGE": url, "COLUMNS": "300"}
    config = _write(tmp_path)
    proc = _evomerge("glue", str(config), "--report-json", str(tmp_path / "r.json"), env=env)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "left out zoo:stranger" in out and "dropped zoo:harmful" in out
    rows = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    singles = [r for r in rows.values() if r["kind"] == "model"]
    mixture, merges = rows["g-evolve-mix"], [rows["g"], rows["g-evolve"]]
    assert mixture["fitness"] > max(r["fitness"] for r in singles + merges)
    assert rows["g"]["fitness"] > rows["whole family merged"]["fitness"]
    assert mixture["metrics"]["upper"] > 0.8 > rows["g"]["metrics"]["upper"]

    store = Store(url)
    counts = {s: len(store.trials(s)) for s in ("g", "g-evolve", "g-evolve-mix")}
    proc = _evomerge("glue", str(config), "--report-json", str(tmp_path / "r2.json"), env=env)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert {s: len(store.trials(s)) for s in counts} == counts
    again = {r["name"]: r["fitness"] for r in json.loads((tmp_path / "r2.json").read_text())}
    assert again == {name: r["fitness"] for name, r in rows.items()}

    best = store.best("g-evolve-mix", top=1, by="heldout")[0]
    dirs = {n: tmp_path / n for n in ("configs", "exports", "runs", "models")}
    for folder in dirs.values():
        folder.mkdir()
    with make_client(url, dirs) as client:
        page = client.get(f"/studies/g-evolve-mix/trials/{best.number}").text
    assert "model-level mixture" in page and "zoo:stranger-upper" in page
    assert "add" in page and "weight" in page  # the merge that is expert 0, drawn above it
    proc = _evomerge(
        "export",
        "g-evolve-mix",
        "--trial",
        str(best.number),
        "--out",
        str(tmp_path / "mix"),
        env=env,
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mix", local_files_only=True)
    assert isinstance(model, MixtureForCausalLM)
    recipe = Recipe.from_json((tmp_path / "mix" / "recipe.json").read_text())
    assert recipe == Recipe.from_json(best.recipe_json)
    tasks = ["zoo:add", "zoo:reverse", "zoo:translate", "zoo:upper"]
    evaluator = Evaluator(tasks, split="held-out", zoo_dir=zoo_dir)
    with torch.inference_mode():
        score = evaluator.score(model.eval(), tokenizer_of(tmp_path / "mix"))
    assert score.fitness == pytest.approx(best.heldout)


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_glue_resumes_after_sigkill_in_the_mixture_stage_on_postgres(
    zoo_dir, tmp_path, pg_url
) -> None:
    """SIGKILLed while the mixture stage scores its router candidates, `evomerge glue` run
    again finishes the chain on PostgreSQL, scoring every candidate exactly once."""
    env = {**os.environ, "EVOMERGE_STORAGE": pg_url, "COLUMNS": "300"}
    config = _write(tmp_path, name="gk")
    store = Store(pg_url)
    store.migrate()
    proc = _evomerge("glue", str(config), env=env)
    _kill_when(proc, store, "gk-evolve-mix", 2)
    proc = _evomerge("glue", str(config), env=env)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    done = [r for r in store.trials("gk-evolve-mix") if r.state == "COMPLETE"]
    routers = [Recipe.from_json(r.recipe_json).mixture for r in done]
    assert len(done) == 4 and len({(m.layer, m.pooling) for m in routers}) == 4
