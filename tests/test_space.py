"""SearchSpace: genome <-> Recipe, and the errors a bad search section gets."""

import pytest

from evomerge.config import StudyConfig
from evomerge.coordinator import population_size
from evomerge.recipe import layer_group_names
from evomerge.space import DataFlowSpace, SearchSpace

BASE = """
name: s
base: zoo:base
sources: [zoo:a, zoo:b, zoo:c]
method: ties
fitness: {tasks: [zoo:add]}
"""


def space(extra: str, layers: int = 4, granularity: int = 1) -> SearchSpace:
    cfg = StudyConfig.from_yaml(BASE + extra)
    return SearchSpace(cfg, layer_group_names(layers, granularity))


def test_per_layer_per_source_dimensions_and_round_trip():
    sp = space("search: {weight: {low: 0, high: 1}, density: {low: 0.1, high: 1}}")
    groups = 4 + 3  # decoder layers, embed, norm, lm_head
    assert sp.dim == 2 * 3 * groups
    genome = {k: round(0.1 + 0.8 * i / sp.dim, 6) for i, k in enumerate(sp.distributions)}
    recipe = sp.decode(genome)
    assert len(recipe.params["weight"]) == groups and len(recipe.params["weight"][0]) == 3
    assert sp.encode(recipe) == genome
    assert recipe.value("density", "layers.2", 1) == genome["density/layers.2/zoo:b"]


def test_values_are_not_folded():
    """Distinct genomes give distinct recipes: no abs()/clamp mirror images."""
    sp = space("search: {weight: {low: -1, high: 1}}")
    a = sp.decode(dict.fromkeys(sp.distributions, 0.4))
    b = sp.decode(dict.fromkeys(sp.distributions, -0.4))
    assert a.hash != b.hash and a.value("weight", "embed", 0) == -b.value("weight", "embed", 0)


def test_fixed_and_default_values_fill_unsearched_parameters():
    sp = space("search: {weight: {low: 0, high: 1}}\nfixed: {density: 0.6}", granularity=2)
    recipe = sp.decode(dict.fromkeys(sp.distributions, 0.5))
    assert recipe.params["density"][0] == (0.6, 0.6, 0.6)
    assert recipe.groups == ("embed", "layers.0-1", "layers.2-3", "norm", "lm_head")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("search: {t: {low: 0, high: 1}}", "search.t"),
        ("search: {density: {low: 0, high: 2}}", "valid range"),
        ("search: {density: {low: 0.1, high: 1}}", "needs a value for ['weight']"),
    ],
)
def test_bad_search_sections(extra, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        space(extra)


def test_population_follows_the_paper():
    assert population_size(10) == 4 + 6  # floor(3 ln 10) = 6
    assert population_size(126) == 4 + 14


DFS = """
name: d
method: dataflow
sources: [zoo:add, zoo:translate]
fitness: {tasks: [zoo:add]}
"""


def dfs_space(extra: str = "", la: int = 4, lb: int = 4) -> DataFlowSpace:
    return DataFlowSpace(StudyConfig.from_yaml(DFS + extra), la, lb)


@pytest.mark.parametrize(("scales", "n_scales"), [("matrix", 8 * 8), ("pair", 4), ("hop", 8 * 3)])
def test_dataflow_genome_is_the_papers_indicator_array_and_scales(scales, n_scales):
    sp = dfs_space(f"dataflow: {{scales: {scales}}}")
    assert sp.dim == 8 * 3 + n_scales  # T = M * r indicators
    recipe = sp.decode(sp.initial_params())
    # the paper's start: A's layers in order in the first repetition, nothing else
    assert recipe.dataflow.path == ((0, 0), (0, 1), (0, 2), (0, 3))
    assert recipe.dataflow.scales == (1.0,) * 4
    assert recipe.method == "dataflow" and recipe.sources == ("zoo:add", "zoo:translate")


def test_dataflow_can_start_from_bs_layers():
    """`start: b`: B's layers between A's first and last, nothing else."""
    sp = dfs_space("dataflow: {scales: pair, start: b}")
    assert sp.decode(sp.initial_params()).dataflow.path == (
        (0, 0),
        *((1, i) for i in range(4)),
        (0, 3),
    )


def test_dataflow_decode_routes_through_b_with_the_matrix_scales():
    sp = dfs_space("dataflow: {repeats: 2}")
    on = {0, 5, 6, 11}  # A0, B1, B2 in repetition 1; A3 in repetition 2
    genome = {k: (0.3 if int(k[3:]) in on else -0.3) for k in sp.distributions if k[:3] == "in/"}
    genome |= {k: 1.0 for k in sp.distributions if k.startswith("scale/")}
    genome["scale/5-6"] = 0.5  # B1 -> B2 (indices in A's then B's layers)
    genome["scale/6-3"] = 1.5  # B2 -> A3
    flow = sp.decode(genome).dataflow
    assert flow.path == ((0, 0), (1, 1), (1, 2), (0, 3))
    assert flow.scales == (1.0, 1.0, 0.5, 1.5)


def test_dataflow_path_always_starts_and_ends_with_as_first_and_last_layers():
    sp = dfs_space("dataflow: {scales: pair}")
    none_on = {k: (-1.0 if k[:3] == "in/" else 1.0) for k in sp.distributions}
    assert sp.decode(none_on).dataflow.path == ((0, 0), (0, 3))
    only_b = dict(none_on) | {"in/4": 0.5}
    assert sp.decode(only_b).dataflow.path == ((0, 0), (1, 0), (0, 3))


def test_ps_dfs_stage_two_routes_stage_ones_merge():
    cfg = StudyConfig.from_yaml(
        BASE
        + "search: {weight: {low: 0, high: 1}}\n"
        + "dataflow: {b: zoo:c, trials: 7, scales: pair}\n"
    )
    assert cfg.next_stage and not cfg.is_dataflow
    merge = space("search: {weight: {low: 0, high: 1}}").decode(
        dict.fromkeys(space("search: {weight: {low: 0, high: 1}}").distributions, 0.25)
    )
    stage = cfg.dataflow_stage(merge.to_json())
    assert stage.name == "s-dfs" and stage.budget.trials == 7 and stage.is_dataflow
    assert not stage.next_stage
    sp = DataFlowSpace(StudyConfig.from_yaml(stage.to_yaml()), 4, 4)
    recipe = sp.decode(sp.initial_params())
    assert recipe.merge_part() == merge
    assert recipe.dataflow.models == ("@merge", "zoo:c")
