"""Zoo analysis (Model-GLUE's clustering) on tiny random families built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.glue.kinship import analyse, column_cosine
from tests.fixtures_models import CONFIGS, load_state, make_family, save_model, tiny_tokenizer


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Two llama families (two initialisations), a qwen2 model, the llama base with another
    tokenizer, and a llama with a wider MLP."""
    root = tmp_path_factory.mktemp("kinship")
    one = make_family(root / "one", "llama", n_sources=2, seed=0)
    two = make_family(root / "two", "llama", n_sources=1, seed=1)
    qwen = make_family(root / "qwen", "qwen2", n_sources=0, seed=2)
    llama = CONFIGS["llama"]
    other_tok = save_model(
        llama, load_state(one.base), root / "other_tok", tokenizer=tiny_tokenizer(prefix="x")
    )
    wide_config = type(llama)(**{**llama.to_dict(), "intermediate_size": 96})
    torch.manual_seed(3)
    wide_state = AutoModelForCausalLM.from_config(wide_config).state_dict()
    return {
        "base": one.base,
        "a": one.sources[0],
        "b": one.sources[1],
        "stranger": two.base,
        "stranger_ft": two.sources[0],
        "qwen": qwen.base,
        "other_tok": other_tok,
        "wide": save_model(wide_config, wide_state, root / "wide"),
    }


def test_column_cosine_is_the_mean_over_columns() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    assert column_cosine(a, b) == pytest.approx(0.0)  # columns: +1 and -1
    assert column_cosine(a, a) == pytest.approx(1.0)
    c = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    expected = (1 / 2**0.5 + 0) / 2  # column 0: (1,0)·(1,1); column 1: (0,2)·(1,0)
    assert column_cosine(a, c) == pytest.approx(expected)


def test_families_cluster_and_the_rest_stand_apart_with_reasons(zoo) -> None:
    result = analyse(zoo)
    assert result.clusters[0] == ("base", "a", "b")
    assert ("stranger", "stranger_ft") in result.clusters
    assert result.similarity("base", "a") > 0.95
    assert abs(result.similarity("base", "stranger")) < 0.2
    assert result.similarity("base", "qwen") is None
    apart = result.apart()
    assert set(apart) == {"qwen", "other_tok", "wide"}
    assert "other architectures (llama and qwen2)" in apart["qwen"]
    assert "other tokenizers" in result.reasons[("base", "other_tok")]
    assert "other tensor shapes" in result.reasons[("base", "wide")]
    assert "mlp" in result.reasons[("base", "wide")]
    # other_tok has the base's weights: only its tokenizer keeps it apart
    assert "other tokenizers" in apart["other_tok"]


def test_threshold_splits_and_joins(zoo) -> None:
    family = {k: zoo[k] for k in ("base", "a", "b", "stranger")}
    assert analyse(family, threshold=1.0).clusters == (("base",), ("a",), ("b",), ("stranger",))
    assert len(analyse(family, threshold=0.5).clusters) == 2
    assert "another initialisation" in analyse(family).apart()["stranger"]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_threshold_outside_the_unit_interval_is_refused(zoo, bad) -> None:
    with pytest.raises(ValueError, match="threshold must be in"):
        analyse({k: zoo[k] for k in ("base", "a")}, threshold=bad)


def test_unloadable_checkpoint_is_named(zoo, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"^broken: .*no model\.safetensors"):
        analyse({"base": zoo["base"], "broken": broken})
    with pytest.raises(ValueError, match="at least two"):
        analyse({"base": zoo["base"]})


def test_cli_prints_matrix_and_clusters(zoo) -> None:
    args = ["zoo", "analyse", *(f"{k}={zoo[k]}" for k in ("base", "a", "stranger", "qwen"))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "base, a" in result.output and "qwen" in result.output
    as_json = CliRunner().invoke(app, [*args, "--json"])
    data = json.loads(as_json.stdout)
    assert data["clusters"] == [["base", "a"], ["stranger"], ["qwen"]]
    assert data["matrix"][0][3] is None
    bad = CliRunner().invoke(app, [*args, "--threshold", "2"])
    assert bad.exit_code == 2 and "threshold" in bad.output
