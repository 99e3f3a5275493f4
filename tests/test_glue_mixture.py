"""Model-GLUE's model-level mixture: routing, exactness, generation, export, refusals.

Experts are tiny random checkpoints of two architectures (Llama and Qwen2 with tied
embeddings) sharing one tokenizer: a mixture does not need its experts to merge.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import evomerge.glue  # noqa: F401  (registers the mixture with the Auto classes)
from evomerge.fitness import greedy
from evomerge.glue.mixture import MixtureForCausalLM, mix
from evomerge.recipe import MERGED, MIXTURE, Mixture, Recipe
from tests.fixtures_models import CONFIGS, make_family, tiny_tokenizer

PROMPTS = (("w5 w6 w7", "w5 w7 w8 w6"), ("w60 w61 w70", "w80 w62 w61 w90"))


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixture")
    llama = make_family(root / "llama", "llama", n_sources=0, seed=1).base
    qwen = make_family(root / "qwen2", "qwen2", n_sources=0, seed=2).base
    return llama, qwen


def _models(paths) -> list:
    return [AutoModelForCausalLM.from_pretrained(p).eval() for p in paths]


def _mixture(**kw) -> Mixture:
    return Mixture(**{"experts": ("a", "b"), "layer": 2, "prompts": PROMPTS, **kw})


def _ids(tok, texts: list[str]) -> torch.Tensor:
    return torch.tensor([tok(t)["input_ids"] for t in texts])


def test_a_one_hot_route_gives_exactly_the_experts_log_probabilities(experts) -> None:
    """Each gate's own prompts route to it, and the mixture's logits are then the routed
    expert's log-softmax, bit for bit."""
    tok = tiny_tokenizer()
    models = _models(experts)
    mixture = MixtureForCausalLM.from_models(_mixture(), models, tok)
    with torch.inference_mode():
        for e, prompts in enumerate(PROMPTS):
            ids = _ids(tok, [prompts[0]])
            out = mixture(input_ids=ids)
            assert out.cache.routing.tolist() == [[1.0 if i == e else 0.0 for i in range(2)]]
            expected = F.log_softmax(models[e](input_ids=ids).logits.float(), -1)
            assert torch.equal(out.logits, expected)


def test_top_two_mixes_the_distributions_by_the_routing_weights(experts) -> None:
    tok = tiny_tokenizer()
    models = _models(experts)
    mixture = MixtureForCausalLM.from_models(_mixture(top_k=2, temperature=0.5), models, tok)
    ids = _ids(tok, ["w5 w61 w7 w62"])
    with torch.inference_mode():
        out = mixture(input_ids=ids)
        w = out.cache.routing[0]
        assert w.sum().item() == pytest.approx(1.0) and (w > 0).all()
        probs = sum(w[e] * models[e](input_ids=ids).logits.float().softmax(-1) for e in range(2))
    torch.testing.assert_close(out.logits.exp(), probs)


def test_generation_keeps_each_rows_experts_through_the_cache(experts) -> None:
    """Batched greedy decoding (left-padded, KV cache) of the mixture equals each row's
    routed expert decoding alone, and Hugging Face's generate agrees."""
    tok = tiny_tokenizer()
    models = _models(experts)
    mixture = MixtureForCausalLM.from_models(_mixture(pooling="last"), models, tok)
    prompts = [tok(p[0])["input_ids"] for p in PROMPTS]
    mixed = greedy(mixture, prompts, 6, tok)
    alone = [greedy(models[e], [prompts[e]], 6, tok)[0] for e in range(2)]
    assert mixed == alone
    for e in range(2):
        hf = mixture.generate(torch.tensor([prompts[e]]), max_new_tokens=6, do_sample=False)
        own = models[e].generate(torch.tensor([prompts[e]]), max_new_tokens=6, do_sample=False)
        assert hf.tolist() == own.tolist()


def test_exported_mixture_loads_offline_with_auto_classes(experts, tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    mixture = MixtureForCausalLM.from_models(_mixture(), _models(experts), tok)
    mixture.save_pretrained(tmp_path / "mix")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mix", local_files_only=True)
    assert type(loaded) is MixtureForCausalLM
    assert loaded.config.expert_names == ["a", "b"]
    ids = _ids(tok, ["w5 w6 w61 w9", "w60 w7 w70 w90"])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(input_ids=ids).logits, mixture(input_ids=ids).logits)
    torch.testing.assert_close(loaded.router, mixture.router)


def test_experts_of_another_vocabulary_are_refused(experts, tmp_path: Path) -> None:
    config = CONFIGS["llama"].__class__(**{**CONFIGS["llama"].to_dict(), "vocab_size": 128})
    other = make_family(tmp_path, "llama", n_sources=0, config=config).base
    with pytest.raises(ValueError, match="share one tokenizer"):
        MixtureForCausalLM.from_models(_mixture(), _models([experts[0], other]), tiny_tokenizer())


def test_a_mixture_is_a_recipe_like_any_other() -> None:
    mixture = _mixture()
    recipe = Recipe(method=MIXTURE, sources=("a", "b"), groups=(), mixture=mixture)
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert recipe.summary()["router"] == "layer 2 mean top-1"
    plain = Recipe(method="linear", base="x", sources=("a",), groups=("embed",))
    assert "mixture" not in plain.to_json()  # recipes stored before mixtures keep their hash
    merged = Recipe(
        method="linear",
        base="x",
        sources=("a",),
        groups=("embed",),
        params={"weight": ((1.0,),)},
        mixture=_mixture(experts=(MERGED, "b")),
    )
    assert merged.merge_part().mixture is None
    with pytest.raises(ValueError, match="starts at '@merge'"):
        merged.model_copy(update={"mixture": _mixture()}).model_validate(
            merged.model_copy(update={"mixture": _mixture()}).model_dump()
        )
    with pytest.raises(ValueError, match="2 lists for 3 experts"):
        _mixture(experts=("a", "b", "c"))
    with pytest.raises(ValueError, match="no prompt"):
        _mixture(prompts=(("w5",), ()))


def test_mix_names_an_expert_that_is_not_loaded(experts) -> None:
    models = _models(experts)
    with pytest.raises(ValueError, match="'c' is not loaded"):
        mix(_mixture(experts=(MERGED, "c")), models[0], {"b": models[1]}, tiny_tokenizer())


def test_router_training_sends_more_gate_prompts_to_their_expert(experts) -> None:
    """Centroid gates misroute some of their own prompts when prompts overlap; training the
    router alone lowers the routing loss and misroutes none more."""
    tok = tiny_tokenizer()
    models = _models(experts)
    prompts = (
        ("w5 w6 w7", "w5 w60 w8", "w9 w61 w5", "w5 w6 w62 w7"),
        ("w60 w61 w70", "w60 w5 w61", "w6 w60 w90", "w80 w62 w61 w7"),
    )

    def routed(steps: int) -> tuple[int, float]:
        mixture = _mixture(prompts=prompts, pooling="mean", temperature=0.1, train_steps=steps)
        model = MixtureForCausalLM.from_models(mixture, models, tok)
        right, loss = 0, 0.0
        with torch.inference_mode():
            for e, texts in enumerate(prompts):
                for text in texts:
                    ids = _ids(tok, [text])
                    hidden = model.experts[0](input_ids=ids, output_hidden_states=True)
                    h = F.normalize(hidden.hidden_states[2].mean(1), dim=-1)
                    scores = h @ model.router.T / 0.1
                    loss += F.cross_entropy(scores, torch.tensor([e])).item()
                    right += int(model(input_ids=ids).cache.routing[0].argmax()) == e
        return right, loss

    (before, loss_before), (after, loss_after) = routed(0), routed(200)
    assert loss_after < loss_before and after >= before
