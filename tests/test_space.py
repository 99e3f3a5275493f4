"""SearchSpace: genome <-> Recipe, and the errors a bad search section gets."""

import pytest

from evomerge.config import StudyConfig
from evomerge.coordinator import population_size
from evomerge.recipe import layer_group_names
from evomerge.space import SearchSpace

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
