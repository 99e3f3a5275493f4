"""The data-flow path model on real zoo models and on tiny llama/mistral/qwen2 families:
A's own path is A, the KV cache changes nothing, no weight is copied, export round-trips,
the evaluator and lm-eval's HFLM run on it, bad paths are clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from evomerge.dataflow import PathForCausalLM, passthrough_yaml, save_path_checkpoint
from evomerge.fitness import Evaluator, greedy
from evomerge.kvcache import cache_keyword, output_cache
from evomerge.recipe import DataFlow
from tests.fixtures_models import CONFIGS, tiny_tokenizer

# Through A and B, repeating B's layer 1 and scaling some inputs; starts/ends on A's ends.
ROUTE = ((0, 0), (1, 1), (0, 1), (1, 1), (1, 2), (0, 2), (0, 3))
SCALES = (1.0, 0.9, 1.1, 1.0, 1.2, 0.8, 1.0)
PROMPTS = ["7+5=", "QWERTY>", "cat sun fire:", "61+48=", "king:"]


# A deprecated keyword (transformers renamed the cache's in 5.24) fails here, not in a warning.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("error::FutureWarning"),
]


@pytest.fixture(scope="module")
def pair(zoo_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A = the add expert, B = the reverse expert (both 4 layers)."""
    load = AutoModelForCausalLM.from_pretrained
    return load(zoo_dir / "add").eval(), load(zoo_dir / "reverse").eval()


def identity(n_layers: int) -> DataFlow:
    return DataFlow(
        models=("a", "b"), path=tuple((0, i) for i in range(n_layers)), scales=(1.0,) * n_layers
    )


def route() -> DataFlow:
    return DataFlow(models=("a", "b"), path=ROUTE, scales=SCALES)


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, ...]:
    """(ids, mask, positions) the way `greedy` builds them."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def greedy_without_cache(model, prompts: list[list[int]], steps: int, tokenizer) -> list[str]:
    """`greedy` recomputed from scratch each step: full forward, argmax of the last logits."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, mask, _ = left_padded(prompts, pad)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            token = out.logits[:, -1].argmax(-1).masked_fill(done, pad)
            new.append(token)
            done |= token == eos
            if done.all():
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token[:, None])], dim=1)
    rows = torch.stack(new, dim=1).tolist()
    return [
        tokenizer.decode(r[: r.index(eos) if eos in r else len(r)], skip_special_tokens=True)
        for r in rows
    ]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 noise: A itself differs by ~8e-6 between cached and full logits."""
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def stepwise_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` fed one token at a time through the KV cache."""
    past, steps = None, []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            step = ids[:, t : t + 1]
            out = model(input_ids=step, use_cache=True, **{cache_keyword(model.forward): past})
            past = output_cache(out)
            steps.append(out.logits)
    return torch.cat(steps, dim=1)


# --- behaviour on the trained zoo ---------------------------------------------------------


def test_identity_path_gives_exactly_a_logits(pair, tokenizer) -> None:
    a, b = pair
    model = PathForCausalLM.from_models(identity(4), [a, b])
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    ids, mask, positions = left_padded(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, a(input_ids=ids).logits)
        batched = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
        assert torch.equal(model(**batched).logits, a(**batched).logits)
    assert greedy(model, prompts, 6, tokenizer) == greedy(a, prompts, 6, tokenizer)


def test_repeating_path_same_with_and_without_cache(pair, tokenizer) -> None:
    model = PathForCausalLM.from_models(route(), list(pair))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    cached = greedy(model, prompts, 8, tokenizer)
    assert cached == greedy_without_cache(model, prompts, 8, tokenizer)
    assert cached == [greedy(model, [p], 8, tokenizer)[0] for p in prompts]
    ids = torch.tensor([tokenizer("61+48=109 cat sun")["input_ids"]])
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    close(stepwise_logits(model, ids), full)
    # The path really differs from A, and each hop has its own cache slot.
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        assert not torch.allclose(out.logits, pair[0](input_ids=ids).logits)
    assert_one_slot_per_hop(output_cache(out), ids.shape[1])


def assert_one_slot_per_hop(cache, tokens: int) -> None:
    """Every hop wrote its own slot, once per token: a cache keyed by the layers' own
    indices (the hop view bypassed) leaves slots empty and doubles the repeated layers'."""
    assert [layer.get_seq_length() for layer in cache.layers] == [tokens] * len(ROUTE)


def test_from_models_references_the_sources_weights(pair) -> None:
    model = PathForCausalLM.from_models(route(), list(pair))
    source = {p.data_ptr() for m in pair for p in m.parameters()}
    params = list(model.parameters())
    assert params and all(p.data_ptr() in source for p in params)
    a, b = (m.model for m in pair)
    assert model.layers[1] is b.layers[1] and model.layers[2] is a.layers[1]
    assert model.embed_tokens is a.embed_tokens and model.lm_head is pair[0].lm_head
    assert len(model.layers) == len(set(ROUTE))


def test_save_and_reload_through_auto_class(pair, tokenizer, tmp_path: Path) -> None:
    model = PathForCausalLM.from_models(route(), list(pair))
    out = save_path_checkpoint(model, tokenizer, tmp_path / "path")
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = f.keys()
    layers = {k.split(".")[1] for k in names if k.startswith("layers.")}
    assert layers == {str(i) for i in range(len(set(ROUTE)))}  # each distinct layer,
    assert len(names) == len(model.state_dict())  # once
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, PathForCausalLM)
    assert loaded.config.source_names == ["a", "b"] and loaded.config.slots[1] == [1, 1]
    ids = torch.tensor([tokenizer("61+48=109 cat")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert greedy(loaded, prompts, 6, tokenizer) == greedy(model, prompts, 6, tokenizer)
    with pytest.raises(FileExistsError):
        save_path_checkpoint(model, tokenizer, out)


def test_evaluator_scores_identity_path_as_a(pair, tokenizer, zoo_dir: Path) -> None:
    evaluator = Evaluator(
        ["zoo:add", "zoo:add_choice", "zoo:text"], split="search", limit=8, zoo_dir=zoo_dir
    )
    a_score = evaluator.score(pair[0], tokenizer)
    path_score = evaluator.score(PathForCausalLM.from_models(identity(4), list(pair)), tokenizer)
    assert path_score.metrics == a_score.metrics and a_score.metrics["add"] > 0.5
    routed = evaluator.score(PathForCausalLM.from_models(route(), list(pair)), tokenizer)
    assert set(routed.metrics) == set(a_score.metrics)


def test_lm_eval_hflm_runs_the_in_memory_path_model(pair, tokenizer) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    def run(model) -> tuple[list, list]:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
        pairs = [("12+34=", "46"), ("12+34=", "47"), ("cat:", " sun")]
        ll = lm.loglikelihood(
            [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True
        )
        gen_args = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
        texts = lm.generate_until(
            [Instance("generate_until", {}, ("7+5=", gen_args), 0)], disable_tqdm=True
        )
        return ll, texts

    ll, texts = run(PathForCausalLM.from_models(identity(4), list(pair)))
    assert (ll, texts) == run(pair[0])


@pytest.mark.parametrize(
    ("path", "scales", "models", "problem"),
    [
        ((), (), 2, "empty"),
        (((0, 0), (2, 1), (0, 3)), (1.0,) * 3, 2, "model 2"),
        (((0, 0), (1, 4), (0, 3)), (1.0,) * 3, 2, "layer 4 out of range"),
        (((0, 0), (1, -1), (0, 3)), (1.0,) * 3, 2, "layer -1"),
        (((0, 1), (0, 2), (0, 3)), (1.0,) * 3, 2, r"start with A's first layer \(0, 0\)"),
        (((0, 0), (0, 1), (1, 3)), (1.0,) * 3, 2, r"end with A's last layer \(0, 3\)"),
        (((0, 0), (0, 3)), (1.0, float("nan")), 2, "not finite"),
        (((0, 0), (0, 3)), (1.0,), 2, "1 entries for 2 hops"),
        (((0, 0), (0, 3)), (1.0, 1.0), 3, "names 3 models"),
    ],
)
def test_bad_paths_are_clear_errors(pair, path, scales, models, problem) -> None:
    with pytest.raises(ValueError, match=problem):
        flow = DataFlow(models=("a", "b", "c")[:models], path=path, scales=scales)
        PathForCausalLM.from_models(flow, list(pair))


def test_models_of_different_width_cannot_be_routed(pair, tiny_llama) -> None:
    other = AutoModelForCausalLM.from_pretrained(tiny_llama.base)
    with pytest.raises(ValueError, match="hidden size 128 and 32"):
        PathForCausalLM.from_models(identity(4), [pair[0], other])


def test_passthrough_yaml_is_a_mergekit_config(zoo_dir: Path) -> None:
    from mergekit.config import MergeConfiguration

    refs = [str(zoo_dir / "add"), str(zoo_dir / "reverse")]
    for flow, approximate in ((identity(4), False), (route(), True)):
        text = passthrough_yaml(flow, refs, dtype="bfloat16")
        config = MergeConfiguration.model_validate(yaml.safe_load(text))
        assert config.merge_method == "passthrough" and config.dtype == "bfloat16"
        ranges = [(str(s.sources[0].model), tuple(s.sources[0].layer_range)) for s in config.slices]
        assert ranges == [(refs[m], (layer, layer + 1)) for m, layer in flow.path]
        header = "".join(line for line in text.splitlines() if line.startswith("#"))
        assert ("APPROXIMATION" in header) == approximate
        assert ("Exact" in header) != approximate
    with pytest.raises(ValueError, match="1 refs"):
        passthrough_yaml(route(), refs[:1])


# --- every architecture: llama, mistral (sliding window 16), qwen2 (tied embeddings) -------


def test_each_architecture_identity_cache_and_round_trip(tiny_family, tmp_path: Path) -> None:
    load = AutoModelForCausalLM.from_pretrained
    a, b = load(tiny_family.base).eval(), load(tiny_family.sources[0]).eval()
    ids = torch.randint(4, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = PathForCausalLM.from_models(identity(4), [a, b])
        assert torch.equal(same(input_ids=ids).logits, a(input_ids=ids).logits)
        model = PathForCausalLM.from_models(route(), [a, b])
        full = model(input_ids=ids, use_cache=False).logits
        close(stepwise_logits(model, ids), full)
        assert_one_slot_per_hop(output_cache(model(input_ids=ids, use_cache=True)), ids.shape[1])
        out = save_path_checkpoint(model, tiny_tokenizer(), tmp_path / tiny_family.arch)
        loaded = load(out)
        assert torch.equal(loaded(input_ids=ids).logits, full)
    tied = loaded.lm_head.weight is loaded.embed_tokens.weight
    assert tied == a.config.tie_word_embeddings
    # GenerationMixin's own cache agrees with a full forward, also past the sliding window.
    generated = model.generate(
        ids[:1, :5], max_new_tokens=20, do_sample=False, return_dict_in_generate=True
    )
    generated, cache = generated.sequences, output_cache(generated)
    assert_one_slot_per_hop(cache, generated.shape[1] - 1)  # the last token is never fed
    with torch.no_grad():
        argmax = model(input_ids=generated[:, :-1], use_cache=False).logits.argmax(-1)
    assert torch.equal(argmax[:, 4:], generated[:, 5:])


def test_route_between_architectures_keeps_each_models_rotary(tmp_path: Path) -> None:
    """A llama A and a qwen2 B (attention biases, another rope theta) on one path."""
    torch.manual_seed(0)
    b_config = copy.deepcopy(CONFIGS["qwen2"])
    b_config.rope_parameters = {"rope_type": "default", "rope_theta": 100.0}
    a, b = (AutoModelForCausalLM.from_config(c).eval() for c in (CONFIGS["llama"], b_config))
    model = PathForCausalLM.from_models(route(), [a, b])
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        close(stepwise_logits(model, ids), full)
        loaded = AutoModelForCausalLM.from_pretrained(
            save_path_checkpoint(model, tiny_tokenizer(), tmp_path / "mixed")
        )
        assert torch.equal(loaded(input_ids=ids).logits, full)
    assert type(loaded.layers[1]) is type(b.model.layers[1])
    assert not torch.equal(loaded.rotary_embs[0].inv_freq, loaded.rotary_embs[1].inv_freq)
