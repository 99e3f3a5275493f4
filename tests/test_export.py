"""Export: the checkpoint folder, its mergekit YAML (reproduced by mergekit), the CLI."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.export import export_checkpoint, export_recipe, mergekit_yaml
from evomerge.merge import METHODS, build, get_method
from evomerge.models import SourceSet
from evomerge.recipe import Recipe, layer_group_names
from tests.fixtures_models import CONFIGS, NAMES, load_state, make_family
from tests.test_merge_methods import recipe_for


def run_mergekit(config_yaml: str, out: Path) -> dict[str, torch.Tensor]:
    config = MergeConfiguration.model_validate(yaml.safe_load(config_yaml))
    run_merge(config, str(out), MergeOptions(quiet=True))
    return load_state(out)


def test_checkpoint_folder(tiny_sources, tmp_path):
    recipe = recipe_for("ties", tiny_sources, dtype="bfloat16", seed=5)
    out = export_checkpoint(recipe, tiny_sources, tmp_path / "merged", scores={"acc": 0.625})
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "README.md",
        "recipe.json",
        "mergekit_config.yml",
        "tokenizer.json",
    } <= names
    assert Recipe.load(out / "recipe.json") == recipe
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    model = tiny_sources.new_model("bfloat16")
    build(recipe, tiny_sources, model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name  # the scored model, exactly
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == tiny_sources.tokenizer.get_vocab()
    card = (out / "README.md").read_text()
    for text in (
        "ties",
        "| acc | 0.625 |",
        "`a`",
        "| layers.2-3 | density |",
        "normalize",
        recipe.hash,
        "merge_method: ties",
    ):
        assert text in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


DETERMINISTIC = sorted(name for name, m in METHODS.items() if m.deterministic)


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_mergekit_reproduces_the_export(method, tiny_sources, tmp_path):
    """The YAML run through mergekit's own run_merge gives the exported tensors."""
    recipe = recipe_for(method, tiny_sources, granularity=3)
    out = export_checkpoint(recipe, tiny_sources, tmp_path / "ours")
    theirs = run_mergekit((out / "mergekit_config.yml").read_text(), tmp_path / "mergekit")
    ours = load_state(out)
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_yaml_layout(tiny_sources):
    paths = {n: str(p) for n, p in tiny_sources.paths.items()}
    recipe = recipe_for("breadcrumbs_ties", tiny_sources, granularity=1, options={"lambda": 0.9})
    config = yaml.safe_load(mergekit_yaml(recipe, paths))
    assert config["merge_method"] == "breadcrumbs_ties" and config["base_model"] == paths["base"]
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [
        [i, i + 1] for i in range(4)
    ]
    first = config["slices"][0]["sources"][0]["parameters"]["gamma"]
    assert first[0]["filter"] == "model.embed_tokens.weight" and "filter" not in first[-1]
    assert config["parameters"]["lambda"] == 0.9 and config["out_dtype"] == "float32"
    linear = yaml.safe_load(mergekit_yaml(recipe_for("linear", tiny_sources), paths))
    assert "base_model" not in linear  # mergekit would add the base as a weighted input
    with pytest.raises(ValueError, match=r"source_paths: no path for \['c'\]"):
        mergekit_yaml(recipe, {k: v for k, v in paths.items() if k != "c"})


def test_errors_leave_nothing(tiny_sources, tmp_path):
    bad = recipe_for("ties", tiny_sources).model_copy(update={"sources": ("a", "b", "zoo:x")})
    with pytest.raises(ValueError, match="zoo:x"):
        export_checkpoint(bad, tiny_sources, tmp_path / "bad")

    class Exploding(dict):
        def items(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # fails after the weights are saved
        export_checkpoint(
            recipe_for("ties", tiny_sources), tiny_sources, tmp_path / "late", scores=Exploding(x=1)
        )
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(recipe_for("ties", tiny_sources), tiny_sources, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_cli_merge(tiny_llama, tmp_path):
    sources = SourceSet.load(tiny_llama.base, tiny_llama.sources, names=NAMES)
    recipe = recipe_for(
        "task_arithmetic",
        sources,
        base=str(tiny_llama.base),
        sources=tuple(str(p) for p in tiny_llama.sources),
    )
    recipe.save(tmp_path / "recipe.json")
    (tmp_path / "scores.json").write_text(json.dumps({"search_fitness": 0.5}))
    runner = CliRunner()
    args = [
        "merge",
        str(tmp_path / "recipe.json"),
        "--out",
        str(tmp_path / "out"),
        "--mergekit-yaml",
        str(tmp_path / "m.yml"),
        "--scores",
        str(tmp_path / "scores.json"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "m.yml").read_text() == (
        tmp_path / "out" / "mergekit_config.yml"
    ).read_text()
    assert "search_fitness" in (tmp_path / "out" / "README.md").read_text()

    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "out", tmp_path / "out" / "model.safetensors"):
        mode = (0o777 if path.is_dir() else 0o666) & ~umask  # as mkdir and open would make
        assert stat.S_IMODE(path.stat().st_mode) == mode, path

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.output
    (tmp_path / "folder.yml").mkdir()
    yaml_dir = [*args[:3], str(tmp_path / "out2"), "--mergekit-yaml", str(tmp_path / "folder.yml")]
    result = runner.invoke(app, yaml_dir)
    assert result.exit_code == 2 and "is a folder" in " ".join(result.output.split())
    assert not (tmp_path / "out2").exists()  # refused before any work
    missing = runner.invoke(app, ["merge", str(tmp_path / "nope.json"), "--out", "x"])
    assert missing.exit_code == 2 and "recipe file not found" in missing.output
    wrong = recipe.model_copy(update={"method": "tie"})
    wrong.save(tmp_path / "wrong.json")
    result = runner.invoke(
        app, ["merge", str(tmp_path / "wrong.json"), "--out", str(tmp_path / "w")]
    )
    assert result.exit_code == 2 and "unknown merge method" in result.output
    assert not (tmp_path / "w").exists()


def test_zoo_export_matches_mergekit(zoo_dir, tmp_path):
    """Real trained relatives from the toy zoo, by `zoo:` reference, through mergekit."""
    experts = ("zoo:add", "zoo:reverse", "zoo:translate")
    for method in ("ties", "slerp"):
        srcs = experts[:1] if method == "slerp" else experts
        spec = get_method(method)
        config = json.loads((zoo_dir / "base" / "config.json").read_text())
        groups = layer_group_names(config["num_hidden_layers"], 2)
        params = {
            p.name: tuple(
                (0.3 + 0.1 * g,) * (len(srcs) if p.per_source else 1) for g in range(len(groups))
            )
            for p in spec.params
        }
        recipe = Recipe(method=method, base="zoo:base", sources=srcs, groups=groups, params=params)
        out = export_recipe(recipe, None, tmp_path / method, zoo_dir=zoo_dir)
        theirs = run_mergekit((out / "mergekit_config.yml").read_text(), tmp_path / f"mk_{method}")
        ours = load_state(out)
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_linear_of_one_model_is_that_model(tiny_llama, tmp_path):
    """A recipe that names one model loads it as a base with no task vectors."""
    src = str(tiny_llama.sources[1])
    recipe = Recipe(
        method="linear",
        sources=(src,),
        groups=layer_group_names(4, 4),
        params={"weight": ((0.7,),) * 4},
    )
    out = export_recipe(recipe, None, tmp_path / "one")
    ours, theirs = load_state(out), load_state(tiny_llama.sources[1])
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _store_tied_head(folder: Path) -> None:
    """Rewrite a tied checkpoint as real ones often are: `lm_head.weight` stored as well."""
    state = load_state(folder)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_tied_head_stored_twice_is_merged_once(tmp_path):
    """A tied model has one tensor: merged under the embedding group, the stored copy unread.
    mergekit's output, loaded as transformers loads it, is the same model."""
    fam = make_family(tmp_path, "qwen2", n_sources=2)
    for folder in (fam.base, *fam.sources):
        _store_tied_head(folder)
    sources = SourceSet.load(fam.base, fam.sources, names=NAMES[:2], base_name="base")
    assert "lm_head.weight" not in {s.name for s in sources.slots}
    recipe = recipe_for("ties", sources, sources=NAMES[:2], granularity=1)
    embed, head = (recipe.groups.index(g) for g in ("embed", "lm_head"))
    assert recipe.params["weight"][embed] != recipe.params["weight"][head]
    out = export_checkpoint(recipe, sources, tmp_path / "ours")
    run_mergekit((out / "mergekit_config.yml").read_text(), tmp_path / "mergekit")
    ours, theirs = (
        AutoModelForCausalLM.from_pretrained(p).eval() for p in (out, tmp_path / "mergekit")
    )
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.arange(4, 40).view(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ours.model.embed_tokens.weight, theirs.model.embed_tokens.weight, rtol=1e-5, atol=1e-6
    )


def test_export_says_when_mergekit_cannot_rebuild_it(tmp_path):
    """Llama with attention and MLP biases: mergekit's Llama table has no bias tensors, so
    its merge leaves them out; the YAML's header and the card say so."""
    config = LlamaConfig(**(CONFIGS["llama"].to_dict() | {"attention_bias": True}))
    fam = make_family(tmp_path, "llama", n_sources=2, config=config)
    sources = SourceSet.load(fam.base, fam.sources, names=NAMES[:2], base_name="base")
    recipe = recipe_for("task_arithmetic", sources, sources=NAMES[:2])
    out = export_checkpoint(recipe, sources, tmp_path / "ours")
    config_yaml = (out / "mergekit_config.yml").read_text()
    header = "".join(line for line in config_yaml.splitlines() if line.startswith("#"))
    assert "# NOT EXACT: mergekit's llama table lacks 16 tensor(s)" in header
    assert "model.layers.0.self_attn.k_proj.bias" in header
    assert (
        "does **not** rebuild it: mergekit's llama table lacks 16"
        in (out / "README.md").read_text()
    )
    theirs = run_mergekit(config_yaml, tmp_path / "mergekit")
    assert set(load_state(out)) - set(theirs) == {
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(4) for p in "qkvo"
    }


SOURCE_PAIR = ("zoo:add", "zoo:reverse")


def test_cli_export_of_a_failed_trial_says_it_is_unscored(zoo_dir, tmp_path):
    """A FAIL trial's recipe still builds (an out-of-memory at scoring, say), but what comes
    out was never scored: the export says so."""
    from evomerge.dashboard.sample import one_trial_study
    from storage import Store

    groups = layer_group_names(4, 2)
    weights = {"weight": ((0.5, 0.5),) * len(groups)}
    recipe = Recipe(
        method="linear", base="zoo:base", sources=SOURCE_PAIR, groups=groups, params=weights
    )
    url = f"sqlite:///{tmp_path / 'failed.db'}"
    with Store(url) as store:
        store.migrate()
        one_trial_study(store, "failed", recipe, "FAIL", error="CUDA out of memory")
    args = ["export", "failed", "--trial", "0", "--out", str(tmp_path / "out"), "--storage", url]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "trial 0 is FAIL (CUDA out of memory): the checkpoint is unscored" in said
    assert Recipe.load(tmp_path / "out" / "recipe.json") == recipe
