"""build(): validation before any write, in-place writes, and bit-for-bit determinism."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge import build
from evomerge.recipe import Recipe
from tests.fixtures_models import NAMES


def good(ss, method="ties", **kw) -> Recipe:
    groups = ss.groups(2)
    k = len(kw.get("sources", NAMES))
    params = {"weight": ((0.5,) * k,) * len(groups), "density": ((0.6,) * k,) * len(groups)}
    fields = dict(method=method, base="base", sources=NAMES, groups=groups, params=params, seed=3)
    return Recipe(**(fields | kw))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def per_group(ss, value, width=3, granularity=2):
    return ((value,) * width,) * len(ss.groups(granularity))


BAD = {
    "unknown method": (dict(method="tie"), r"unknown merge method 'tie'"),
    "source not loaded": (dict(sources=("a", "zoo:nope", "c")), r"recipe.sources: .*'zoo:nope'"),
    "wrong base": (dict(base="a"), r"recipe.base: ties merges task vectors against .*'base'"),
    "base as source": (dict(sources=("a", "base", "c")), r"the base 'base' is not a source"),
    "density out of range": ("density", r"params.density\[layers.0-1\] \(b\) = 1.5 is outside"),
    "missing weight": ("no weight", r"ties needs 'weight'"),
    "unknown parameter": ("t", r"ties has no parameter\(s\) \['t'\]"),
    "shared given per source": ("sce", r"params.select_topk\[embed\]: select_topk is shared"),
    "groups miss a layer": ("groups", r"recipe.groups: no group holds \[3\]"),
    "groups overlap": ("overlap", r"recipe.groups: 1 is in two groups"),
    "della epsilon": ("della", r"density 0.1 \+/- epsilon 0.15 must stay inside"),
    "linear weights sum to 0": ("linear", r"weights sum to 0"),
    "unknown option": (dict(options={"normalise": True}), r"no option\(s\) \['normalise'\]"),
    "option type": (dict(options={"normalize": 1.0}), r"options.normalize: must be true or false"),
    "slerp sources": ("slerp two", r"slerp takes at least 1 and at most 1 source"),
}


def bad_recipe(ss, case):
    change, _ = BAD[case]
    if isinstance(change, dict):
        return good(ss, **change)
    r = good(ss)
    params = dict(r.params)
    if change == "density":
        groups = ss.groups(2)
        params["density"] = tuple(
            (0.6, 1.5, 0.6) if g == "layers.0-1" else (0.6,) * 3 for g in groups
        )
        return r.model_copy(update={"params": params})
    if change == "no weight":
        return good(ss, params={"density": params["density"]})
    if change == "t":
        return good(ss, params=params | {"t": per_group(ss, 0.5, 1)})
    if change == "sce":
        return good(ss, method="sce", params={"select_topk": per_group(ss, 0.5)})
    if change == "groups":
        groups = ("embed", "layers.0-2", "norm", "lm_head")
        return good(ss, groups=groups, params={"weight": ((0.5,),) * 4})
    if change == "overlap":
        groups = ("embed", "layers.0-1", "layers.1-3", "norm", "lm_head")
        return good(ss, groups=groups, params={"weight": ((0.5,),) * 5})
    if change == "della":
        return good(
            ss, method="della", params={"weight": per_group(ss, 1.0), "density": per_group(ss, 0.1)}
        )
    if change == "linear":
        return good(ss, method="linear", base=None, params={"weight": per_group(ss, 0.0)})
    if change == "slerp two":
        return good(ss, method="slerp", sources=("a", "b"), params={"t": per_group(ss, 0.5, 1)})
    raise AssertionError(case)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_raise_before_writing(case, tiny_sources):
    model = tiny_sources.new_model()
    build(good(tiny_sources), tiny_sources, model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=BAD[case][1]):
        build(bad_recipe(tiny_sources, case), tiny_sources, model)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_into_must_fit(tiny_sources):
    with pytest.raises(ValueError, match=r"into: .* is torch.bfloat16 but recipe.dtype is float32"):
        build(good(tiny_sources), tiny_sources, tiny_sources.new_model("bfloat16"))
    with pytest.raises(ValueError, match="into: the model has no parameter"):
        build(good(tiny_sources), tiny_sources, torch.nn.Linear(2, 2))


def test_builds_in_place(tiny_family, tiny_sources):
    model = tiny_sources.new_model()
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    before = snapshot(model)
    build(good(tiny_sources), tiny_sources, model)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    if tiny_family.arch == "qwen2":
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "task_arithmetic"])
def test_same_recipe_same_bits(method, tiny_llama):
    """Twice, after another candidate, and whatever the group layout that says the same."""
    from evomerge.models import SourceSet

    ss = SourceSet.load(tiny_llama.base, tiny_llama.sources, names=NAMES, base_name="base")
    params = {"weight": per_group(ss, 0.5, 3, 1)}
    if method != "task_arithmetic":
        params["density"] = per_group(ss, 0.4, 3, 1)
    fine = Recipe(
        method=method, base="base", sources=NAMES, groups=ss.groups(1), params=params, seed=11
    )
    coarse = fine.model_copy(
        update={
            "groups": ss.groups(4),
            "params": {k: v[:1] + v[1:2] + v[-2:] for k, v in params.items()},
        }
    )
    model = ss.new_model()
    build(fine, ss, model)
    first = snapshot(model)
    build(good(ss, seed=99), ss, model)
    build(fine, ss, model)
    again = snapshot(model)
    build(coarse, ss, model)
    same_layout = snapshot(model)
    for k in first:
        assert torch.equal(first[k], again[k]) and torch.equal(first[k], same_layout[k]), k


def test_same_bits_in_another_process(tiny_llama, tmp_path):
    """Another process, one torch thread instead of the default: the same bits."""
    from evomerge.models import SourceSet

    ss = SourceSet.load(tiny_llama.base, tiny_llama.sources, names=NAMES, base_name="base")
    recipes = {m: good(ss, method=m) for m in ("dare_ties", "ties", "breadcrumbs_ties")}
    script = textwrap.dedent(
        f"""
        import sys, torch
        from safetensors.torch import save_file
        from evomerge.merge import build
        from evomerge.models import SourceSet
        from evomerge.recipe import Recipe
        torch.set_num_threads(1)
        ss = SourceSet.load({str(tiny_llama.base)!r}, {[str(p) for p in tiny_llama.sources]!r},
                            names={list(NAMES)!r}, base_name="base")
        for path in sys.argv[1:]:
            model = ss.new_model()
            build(Recipe.load(path), ss, model)
            save_file({{k: v.contiguous() for k, v in model.state_dict().items()
                        if k != "lm_head.weight" or not model.config.tie_word_embeddings}},
                      path + ".safetensors")
        """
    )
    paths = []
    for name, recipe in recipes.items():
        recipe.save(tmp_path / f"{name}.json")
        paths.append(str(tmp_path / f"{name}.json"))
    subprocess.run([sys.executable, "-c", script, *paths], check=True)
    for name, recipe in recipes.items():
        theirs = load_file(tmp_path / f"{name}.json.safetensors")
        model = ss.new_model()
        build(recipe, ss, model)
        mine = model.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name
