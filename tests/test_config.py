"""StudyConfig: defaults, validation errors that name the field, the stored snapshot."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.config import ConfigError, StudyConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MINIMAL = """
name: t1
base: zoo:base
sources: [zoo:a, zoo:b]
method: task_arithmetic
search: {weight: {low: 0, high: 1}}
fitness: {tasks: [zoo:arith]}
"""


def test_minimal_config_gets_the_papers_defaults():
    cfg = StudyConfig.from_yaml(MINIMAL)
    assert cfg.granularity == 1
    assert cfg.optimizer.population is None  # 4 + floor(3 ln n) once n is known
    assert cfg.fitness.tasks[0].task == "zoo:arith" and cfg.fitness.tasks[0].weight == 1.0
    assert cfg.budget.trials == 100 and cfg.workers.count == 1


def test_snapshot_round_trips():
    cfg = StudyConfig.from_yaml(MINIMAL)
    assert StudyConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ("granularity: 0", "granularity"),
        ("search: {weight: {low: 1, high: 0}}", "search.weight"),
        ("budget: {trials: -3}", "budget.trials"),
        ("budget: {trials: 1e29}", "budget.trials"),
        ("optimizer: {seed: -1}", "optimizer.seed"),
        ("optimizer: {population: 3}", "optimizer.population"),
        ("workers: {count: two}", "workers.count"),
        ("sources: [zoo:a, zoo:a]", "sources repeat"),
        ("colour: blue", "colour"),
        ("name: 'bad name!'", "name"),
    ],
)
def test_bad_fields_are_named(patch, field):
    text = MINIMAL + patch + "\n"
    with pytest.raises(ConfigError) as e:
        StudyConfig.from_yaml(text, source="cfg.yaml")
    assert field in str(e.value) and "cfg.yaml" in str(e.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        StudyConfig.from_yaml("name: [unclosed")
    with pytest.raises(ConfigError, match="not found"):
        StudyConfig.load(tmp_path / "nope.yaml")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes((MINIMAL + "# café\n").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text"):
        StudyConfig.load(latin)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    StudyConfig.load(path)


@pytest.mark.parametrize(
    ("command", "config", "said"),
    [
        ("run", "glue/demo.yaml", "a glue config, not a study one: run it with `evomerge glue"),
        (
            "plan",
            "fusion/demo.yaml",
            "a fusion config, not a study one: run it with `evomerge fuse",
        ),
        ("glue", "demo.yaml", "a study config, not a glue one: run it with `evomerge run"),
        ("fuse", "glue/demo.yaml", "a glue config, not a fusion one: run it with `evomerge glue"),
    ],
)
def test_a_config_given_to_the_wrong_command_is_named_as_what_it_is(
    command, config, said, tmp_path
):
    db = tmp_path / "none.db"
    storage = ["--storage", f"sqlite:///{db}"] if command != "plan" else []
    args = [command, str(CONFIGS / config), *storage]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert not db.exists()


DFS = """
name: d1
method: dataflow
sources: [zoo:a, zoo:b]
fitness: {tasks: [zoo:arith]}
"""


def test_dataflow_config_takes_the_papers_settings():
    cfg = StudyConfig.from_yaml(DFS)
    assert cfg.is_dataflow and cfg.dataflow.repeats == 3 and cfg.dataflow.scales == "matrix"
    assert StudyConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (DFS.replace("[zoo:a, zoo:b]", "[zoo:a]"), "exactly two models"),
        (DFS + "search: {weight: {low: 0, high: 1}}\n", "search"),
        (DFS + "dataflow: {b: zoo:c}\n", "dataflow.b"),
        (DFS + "dataflow: {scales: cube}\n", "dataflow.scales"),
        (DFS + "dataflow: {repeats: 0}\n", "dataflow.repeats"),
        (MINIMAL + "dataflow: {repeats: 2}\n", "dataflow.b"),
        (MINIMAL.replace("base: zoo:base\n", ""), "base"),
        (MINIMAL.replace("search: {weight: {low: 0, high: 1}}\n", ""), "search"),
    ],
)
def test_bad_dataflow_fields_are_named(text, field):
    with pytest.raises(ConfigError) as e:
        StudyConfig.from_yaml(text, source="cfg.yaml")
    assert field in str(e.value)


SELECT_MIX = """
name: g
base: zoo:base
sources: [zoo:a, zoo:b]
method: task_arithmetic
search: {weight: {low: 0, high: 2}}
optimizer: {kind: average, scale: 2, evolve: 3}
mixture: {others: [zoo:c], prompts: [[zoo:add], [zoo:reverse]]}
fitness: {tasks: [zoo:add, zoo:reverse]}
"""
PS_DFS = """
name: s
base: zoo:base
sources: [zoo:a, zoo:b]
method: ties
search: {weight: {low: 0, high: 1}}
dataflow: {b: zoo:c, trials: 7}
fitness: {tasks: [zoo:add]}
"""


def test_a_chain_knows_its_stages_and_no_other_study_of_their_names() -> None:
    """Each stage, stored and read back, is its parent's; a study that only has its name,
    or a stage of another parent, is not."""
    select = StudyConfig.from_yaml(SELECT_MIX)
    assert select.later_stages() == ("g-evolve", "g-evolve-mix")
    evolve = StudyConfig.from_yaml(select.evolve_stage((0.5, 1.25)).to_yaml())
    mix = StudyConfig.from_yaml(evolve.mixture_stage('"merge"', 4).to_yaml())
    ps = StudyConfig.from_yaml(PS_DFS)
    dfs = StudyConfig.from_yaml(ps.dataflow_stage('"merge"').to_yaml())
    alone = StudyConfig.from_yaml(PS_DFS.replace("dataflow: {b: zoo:c, trials: 7}\n", ""))
    assert ps.later_stages() == ("s-dfs",) and alone.later_stages() == ()
    assert evolve.is_stage_of(select) and mix.is_stage_of(evolve) and dfs.is_stage_of(ps)
    assert not mix.is_stage_of(select) and not dfs.is_stage_of(select)
    named_alike = StudyConfig.from_yaml(PS_DFS.replace("name: s", "name: s-dfs"))
    assert not named_alike.is_stage_of(ps)
    other_models = StudyConfig.from_yaml(PS_DFS.replace("zoo:b]", "zoo:d]"))
    assert not dfs.is_stage_of(other_models.model_copy(update={"name": "s"}))
