"""Architectures evomerge has no table for (Qwen3, Gemma 2 and 3, Phi-3, OLMo 2): groups found
from the model, every method against mergekit, export, data-flow routes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.dataflow import PathForCausalLM
from evomerge.dataflow.model import DEPARTS
from evomerge.export import export_checkpoint
from evomerge.merge import METHODS
from evomerge.models import SourceSet
from evomerge.recipe import EMBED, LM_HEAD, NORM, DataFlow
from tests.fixtures_models import (
    MORE,
    Family,
    family_sources,
    family_states,
    load_state,
    make_family,
)
from tests.test_export import run_mergekit
from tests.test_merge_methods import assert_same, mergekit_merge, ours, recipe_for

IDS = torch.randint(4, 96, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=MORE)
def family(request, tmp_path_factory) -> Family:
    return make_family(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def sources(family) -> SourceSet:
    return family_sources(family)


@pytest.fixture(scope="module")
def states(family) -> dict[str, dict[str, torch.Tensor]]:
    return family_states(family)


def test_groups_come_from_the_model(family, sources, states):
    parts = {s.name: s.part for s in sources.slots}
    assert set(parts) == set(states["base"])
    assert parts["model.embed_tokens.weight"] == EMBED and parts["model.norm.weight"] == NORM
    assert ("lm_head.weight" in parts) != sources.config.tie_word_embeddings
    assert parts.get("lm_head.weight", LM_HEAD) == LM_HEAD
    layer = {name.split(".", 3)[3] for name in parts if name.startswith("model.layers.2.")}
    assert all(parts[f"model.layers.2.{t}"] == 2 for t in layer)
    extras = {"qwen3": "self_attn.q_norm.weight", "olmo2": "self_attn.k_norm.weight"}
    extras |= {"gemma2": "post_feedforward_layernorm.weight", "phi3": "self_attn.qkv_proj.weight"}
    extras |= {"gemma3_text": "pre_feedforward_layernorm.weight"}
    assert extras[family.arch] in layer
    reference = AutoModelForCausalLM.from_pretrained(family.base)
    with torch.no_grad():
        assert torch.equal(sources.new_model()(IDS).logits, reference(IDS).logits)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_matches_mergekit(method, sources, states):
    """Per-group, per-source parameters; random methods at density 1."""
    recipe = recipe_for(method, sources)
    assert_same(ours(recipe, sources), mergekit_merge(recipe, sources, states))


def test_mergekit_rebuilds_the_export(sources, tmp_path):
    recipe = recipe_for("ties", sources, granularity=3)
    out = export_checkpoint(recipe, sources, tmp_path / "ours")
    config_yaml = (out / "mergekit_config.yml").read_text()
    assert "# Exact: mergekit rebuilds this model" in config_yaml
    theirs = run_mergekit(config_yaml, tmp_path / "mergekit")
    ours_ = load_state(out)
    assert set(ours_) == set(theirs)
    assert_same(ours_, theirs)


def test_dataflow_routes(family):
    """A path through A's own layers is A, exactly; through B's layers it runs. Families
    whose model departs from embed-layers-norm-head are refused, saying how."""
    load = AutoModelForCausalLM.from_pretrained
    a, b = (load(p).eval() for p in (family.base, family.sources[0]))
    n = a.config.num_hidden_layers
    identity = DataFlow(models=("a", "b"), path=tuple((0, i) for i in range(n)), scales=(1.0,) * n)
    if family.arch in DEPARTS:
        with pytest.raises(ValueError, match=rf"not support '{family.arch}': .*soft-cap"):
            PathForCausalLM.from_models(identity, [a, b])
        return
    with torch.no_grad():
        model = PathForCausalLM.from_models(identity, [a, b])
        assert torch.equal(model(input_ids=IDS).logits, a(input_ids=IDS).logits)
        hops = ((0, 0), (1, 1), (1, 2), (0, n - 1))
        routed = DataFlow(models=("a", "b"), path=hops, scales=(1.0, 0.9, 1.1, 1.0))
        logits = PathForCausalLM.from_models(routed, [a, b])(input_ids=IDS).logits
    assert logits.shape == (2, 20, 96) and torch.isfinite(logits).all()
