"""FuseLLM's fusion functions on hand-made distributions."""

from __future__ import annotations

import pytest
import torch

from evomerge.fusion.fuse import combine, fuse, gold_cross_entropy

GOLD = torch.tensor([1, 2])
GOOD = (torch.tensor([[1, 5], [2, 6]]), torch.tensor([[0.9, 0.1], [0.8, 0.2]]))
POOR = (torch.tensor([[3, 1], [2, 4]]), torch.tensor([[0.7, 0.3], [0.4, 0.6]]))


def test_cross_entropy_reads_the_gold_tokens_probability() -> None:
    expected = -(torch.tensor(0.9).log() + torch.tensor(0.8).log()) / 2
    assert gold_cross_entropy(GOOD, GOLD) == pytest.approx(float(expected))
    missing = (torch.tensor([[7, 8], [9, 10]]), GOOD[1])
    assert gold_cross_entropy(missing, GOLD) == pytest.approx(-torch.tensor(1e-6).log().item())


def test_min_ce_keeps_the_best_sources_distribution() -> None:
    ids, probs = fuse([POOR, GOOD], GOLD, "min_ce", k=2)
    assert ids.tolist() == GOOD[0].tolist()
    torch.testing.assert_close(probs, GOOD[1])


def test_avg_ce_weighs_sources_by_their_cross_entropy() -> None:
    ids, probs = fuse([POOR, GOOD], GOLD, "avg_ce", k=4)
    ce = torch.tensor([gold_cross_entropy(POOR, GOLD), gold_cross_entropy(GOOD, GOLD)])
    w = torch.softmax(-ce.double(), 0)
    row0 = dict(zip(ids[0].tolist(), probs[0].tolist(), strict=True))
    assert row0[1] == pytest.approx(float(w[0] * 0.3 + w[1] * 0.9))  # both give token 1 mass
    assert row0[3] == pytest.approx(float(w[0] * 0.7))
    assert probs.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    assert w[1] > w[0]


def test_combine_keeps_the_top_k_of_the_union_renormalised() -> None:
    ids, probs = combine([GOOD, POOR], [0.5, 0.5], k=1)
    assert ids.tolist() == [[1], [2]] and probs.tolist() == [[1.0], [1.0]]


def test_an_unknown_fusion_function_is_refused() -> None:
    with pytest.raises(ValueError, match="min_ce or avg_ce"):
        fuse([GOOD], GOLD, "max", k=2)  # type: ignore[arg-type]


def test_a_line_with_fewer_tokens_than_k_still_has_k_columns() -> None:
    ids, probs = fuse([GOOD], GOLD, "min_ce", k=5)
    assert ids.shape == probs.shape == (2, 5)
    assert probs[:, 2:].sum() == 0 and probs.sum(-1).tolist() == pytest.approx([1.0, 1.0])
