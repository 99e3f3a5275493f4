"""SourceSet: loading, layer-group tables, statistics, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, T5Config

from evomerge.layout import Layout
from evomerge.models import SourceSet
from evomerge.recipe import EMBED, LM_HEAD, NORM
from tests.fixtures_models import (
    CONFIGS,
    NAMES,
    load_state,
    make_family,
    perturbed,
    save_model,
    tiny_tokenizer,
)


def test_task_vectors_and_groups(tiny_family, tiny_sources, tiny_states):
    ss = tiny_sources
    assert ss.names == NAMES and ss.base_name == "base" and ss.num_layers == 4
    assert ss.groups(3) == ("embed", "layers.0-2", "layers.3", "norm", "lm_head")
    assert set(ss.paths) == {"base", *NAMES} and ss.paths["a"] == tiny_family.sources[0]
    parts = {s.name: s.part for s in ss.slots}
    assert parts["model.embed_tokens.weight"] == EMBED
    assert parts["model.norm.weight"] == NORM
    assert parts["model.layers.2.mlp.down_proj.weight"] == 2
    tied = tiny_family.arch == "qwen2"
    assert ("lm_head.weight" in parts) != tied
    if not tied:
        assert parts["lm_head.weight"] == LM_HEAD
    if tiny_family.arch == "qwen2":
        assert parts["model.layers.1.self_attn.q_proj.bias"] == 1
    assert set(parts) == set(tiny_states["base"])
    for slot in ss.slots:
        base = tiny_states["base"][slot.name].reshape(-1)
        b, tv = slot.span(0, slot.numel)
        assert torch.equal(b, base)
        for i, name in enumerate(NAMES):
            assert torch.equal(tv[i], tiny_states[name][slot.name].reshape(-1) - base)
            assert torch.equal(slot.piece(i, 3, slot.numel), tv[i, 3:])
        rows = torch.cat([b[None], tv]).double()
        torch.testing.assert_close(slot.gram, rows @ rows.T)
        torch.testing.assert_close(slot.l1, tv.double().abs().sum(dim=1))


def test_group_order_is_embed_layers_norm_head(tiny_sources):
    rank = {EMBED: -1, NORM: 100, LM_HEAD: 101}
    keys = [rank.get(s.part, s.part) for s in tiny_sources.slots]
    assert keys == sorted(keys)


def test_new_model_holds_the_base(tiny_family, tiny_sources):
    model = tiny_sources.new_model()
    reference = AutoModelForCausalLM.from_pretrained(tiny_family.base)
    ids = torch.arange(12).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    if tiny_family.arch == "qwen2":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    half = tiny_sources.new_model("bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype"):
        tiny_sources.new_model("int8")
    assert tiny_sources.tokenizer.get_vocab() == tiny_tokenizer().get_vocab()


def test_bfloat16_sharded_task_vectors_are_exact(tiny_llama_bf16_sharded):
    fam = tiny_llama_bf16_sharded
    assert len(list(fam.base.glob("*.safetensors"))) > 1
    ss = SourceSet.load(fam.base, fam.sources, names=NAMES[:2], base_name="base")
    src = load_state(fam.sources[1])
    for slot in ss.slots:
        b, tv = slot.span(0, slot.numel)
        rebuilt = (b + tv[1]).to(torch.bfloat16)
        assert torch.equal(rebuilt, src[slot.name].reshape(-1))
        assert torch.equal(slot.piece(1, 0, slot.numel), tv[1])


def test_layouts_are_found_from_the_model():
    """Groups come from the module tree transformers builds: no per-architecture table."""
    llama = Layout.of(LlamaConfig(**CONFIGS["llama"].to_dict() | {"attention_bias": True}))
    assert llama.params["model.layers.3.self_attn.o_proj.bias"] == 3
    assert llama.params["lm_head.weight"] == LM_HEAD and not llama.tied
    assert llama.tensors(NORM) == ("model.norm.weight",)
    assert "model.layers.0.self_attn.q_proj.bias" not in Layout.of(CONFIGS["mistral"]).params
    qwen2 = Layout.of(CONFIGS["qwen2"])
    assert qwen2.params["model.layers.1.self_attn.v_proj.bias"] == 1
    assert qwen2.tied == {"lm_head.weight"} and qwen2.tensors(LM_HEAD) == ()
    with pytest.raises(ValueError, match=r"x: tensor model.layers.3.rotary.inv_freq fits no"):
        llama.parts([*llama.params, "model.layers.3.rotary.inv_freq"], "x")


# --- refusals --------------------------------------------------------------------------


def _copy(src: Path, dst: Path, edit=None) -> Path:
    """A copy of a checkpoint folder, its tensors passed through `edit`."""
    shutil.copytree(src, dst)
    if edit is not None:
        state = edit(load_state(dst))
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _load(base, *sources):
    return SourceSet.load(base, list(sources))


def test_missing_folder_and_checkpoint(tmp_path, tiny_llama):
    with pytest.raises(FileNotFoundError, match=r"model folder not found: .*nowhere"):
        _load(tmp_path / "nowhere", tiny_llama.sources[0])
    bare = _copy(tiny_llama.sources[0], tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"bare: no model.safetensors"):
        _load(tiny_llama.base, bare)


def test_refuses_other_architecture(tmp_path, tiny_llama):
    qwen = make_family(tmp_path, "qwen2", n_sources=0)
    with pytest.raises(ValueError, match=r"qwen2.*llama.*architectures must match"):
        _load(tiny_llama.base, qwen.base)


def test_refuses_other_shapes(tmp_path, tiny_llama):
    config = CONFIGS["llama"].to_dict() | {"intermediate_size": 48}
    wide = type(CONFIGS["llama"])(**config)
    model = AutoModelForCausalLM.from_config(wide)
    save_model(wide, model.state_dict(), tmp_path / "wide")
    with pytest.raises(ValueError, match=r"architectures differ: intermediate_size is 48"):
        _load(tiny_llama.base, tmp_path / "wide")

    def reshape(state):
        name = "model.layers.1.self_attn.o_proj.weight"
        state[name] = state[name][:, :16].contiguous()
        return state

    bad = _copy(tiny_llama.sources[0], tmp_path / "bad_shape", reshape)
    with pytest.raises(ValueError, match=r"shape mismatch for model.layers.1.self_attn.o_proj"):
        _load(tiny_llama.base, bad)


def test_refuses_missing_tensor_and_nan(tmp_path, tiny_llama):
    def drop(state):
        del state["model.layers.2.mlp.gate_proj.weight"]
        return state

    def poison(state):
        state["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
        return state

    missing = _copy(tiny_llama.sources[0], tmp_path / "missing", drop)
    with pytest.raises(ValueError, match=r"missing \['model.layers.2.mlp.gate_proj.weight'\]"):
        _load(tiny_llama.base, missing)
    with pytest.raises(ValueError, match=r"base .* lacks tensor.*gate_proj"):
        _load(missing, tiny_llama.base)
    nan = _copy(tiny_llama.sources[0], tmp_path / "nan", poison)
    with pytest.raises(ValueError, match=r"nan: tensor model.layers.0.mlp.up_proj.weight has NaN"):
        _load(tiny_llama.base, nan)


def test_refuses_other_vocabulary_or_tokenizer(tmp_path, tiny_llama):
    bigger = type(CONFIGS["llama"])(**(CONFIGS["llama"].to_dict() | {"vocab_size": 128}))
    save_model(
        bigger,
        AutoModelForCausalLM.from_config(bigger).state_dict(),
        tmp_path / "v128",
        tokenizer=tiny_tokenizer(128),
    )
    with pytest.raises(ValueError, match=r"vocabularies differ: vocab_size is 128"):
        _load(tiny_llama.base, tmp_path / "v128")
    state = perturbed(load_state(tiny_llama.base), seed=5)
    save_model(CONFIGS["llama"], state, tmp_path / "retok", tokenizer=tiny_tokenizer(prefix="t"))
    with pytest.raises(ValueError, match=r"tokenizers differ: .*retok.* disagree on"):
        _load(tiny_llama.base, tmp_path / "retok")


def test_refuses_unsupported_architecture_and_repeated_names(tmp_path, tiny_llama):
    gpt2 = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=96)
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2': .*model.layers.N"):
        _load(tmp_path / "gpt2", tiny_llama.base)
    for config, why in (
        (BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2), "model.layers"),
        (T5Config(num_layers=1, d_model=16, num_heads=2), "encoder-decoder"),
    ):
        config.save_pretrained(tmp_path / config.model_type)
        save_file({"x": torch.zeros(1)}, tmp_path / config.model_type / "model.safetensors")
        with pytest.raises(ValueError, match=rf"unsupported architecture '{config.model_type}'"):
            _load(tmp_path / config.model_type, tiny_llama.base)
        with pytest.raises(ValueError, match=why):
            _load(tmp_path / config.model_type, tiny_llama.base)
    with pytest.raises(ValueError, match=r"model names repeat"):
        SourceSet.load(tiny_llama.base, tiny_llama.sources[:2], names=["x", "x"])
    with pytest.raises(ValueError, match=r"model names repeat"):
        SourceSet.load(tiny_llama.base, tiny_llama.sources[:1], names=["b"], base_name="b")


def test_unknown_tensor_fits_no_group(tmp_path, tiny_llama):
    def extra(state):
        state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        return state

    odd = _copy(tiny_llama.base, tmp_path / "odd", extra)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.extra.weight fits no llama"):
        _load(odd, tiny_llama.sources[0])
    index = json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}})
    (odd / "model.safetensors.index.json").write_text(index)
    with pytest.raises(FileNotFoundError, match=r"shard files missing"):
        _load(odd, tiny_llama.base)
