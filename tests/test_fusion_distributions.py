"""FuseLLM's distribution pass: top-k rows that match the model, cached by content."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.fusion.distributions import distributions, load, read_corpus
from evomerge.zoo.tokenizer import build_tokenizer
from tests.fixtures_models import make_family


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with the zoo's character tokenizer."""
    folder = make_family(tmp_path_factory.mktemp("fusion"), "qwen2", n_sources=0, seed=3).base
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("cat dog sun\n\n12+3=15\nABC>CBA\n")
    return path


def test_rows_are_the_models_top_k_next_token_probabilities(source, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    path = distributions(source, corpus, k=4, batch_size=2)
    lines = load(path)
    assert len(lines) == 3  # the empty line is skipped
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    tok = AutoTokenizer.from_pretrained(source)
    for text, (tokens, ids, probs) in zip(read_corpus(corpus), lines, strict=True):
        expected = tok(text)["input_ids"]
        assert tokens.tolist() == expected
        with torch.inference_mode():
            top = model(input_ids=torch.tensor([expected])).logits[0].float().softmax(-1).topk(4)
        assert ids[1:].tolist() == top.indices[:-1].tolist()
        torch.testing.assert_close(probs[1:], top.values[:-1], atol=1e-3, rtol=1e-3)
        assert ids[0, 0] == expected[0] and probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_a_second_pass_reads_the_cache(source, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    first = distributions(source, corpus, k=2)
    stamp = first.stat().st_mtime_ns
    assert distributions(source, corpus, k=2) == first and first.stat().st_mtime_ns == stamp
    assert distributions(source, corpus, k=3) != first  # k is part of the key


@pytest.mark.parametrize(("text", "error"), [(None, "not found"), ("\n \n", "empty")])
def test_a_missing_or_empty_corpus_is_refused(tmp_path, text, error) -> None:
    path = tmp_path / "c.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises((FileNotFoundError, ValueError), match=error):
        read_corpus(path)


def test_shards_on_ray_workers_give_the_same_distributions(
    source, corpus, tmp_path, monkeypatch, ray_local
) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "one"))
    alone = load(distributions(source, corpus, k=3))
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "ray"))
    sharded = load(distributions(source, corpus, k=3, workers=2))
    for (t1, i1, p1), (t2, i2, p2) in zip(alone, sharded, strict=True):
        assert torch.equal(t1, t2) and torch.equal(i1, i2)
        torch.testing.assert_close(p1, p2, atol=1e-3, rtol=0)
