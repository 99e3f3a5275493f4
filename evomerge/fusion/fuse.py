"""FuseLLM's fusion functions: one target distribution per token from several sources'.

Every distribution here is sparse and already on the target's tokens: per token position,
`ids` [T, k] target token ids and `probs` [T, k] their probabilities (rows sum to 1; padding
has probability 0). A source is judged per sequence by its cross-entropy on the gold tokens:

- MinCE keeps, per sequence, the distributions of the source with the lowest cross-entropy
  (FuseLLM's best fusion function);
- AvgCE averages the sources' distributions, weighted by softmax(-cross-entropy), so a source
  that predicts the sequence better weighs more.

The fused rows keep the k most probable tokens of the union, renormalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Sparse = tuple[torch.Tensor, torch.Tensor]  # (ids [T, k] long, probs [T, k] float)
FusionKind = Literal["min_ce", "avg_ce"]
# The probability a distribution gives a gold token outside its top k, so cross-entropy is
# finite (FuseLLM clips the same way).
FLOOR = 1e-6


def gold_cross_entropy(dist: Sparse, gold: torch.Tensor) -> float:
    """Mean over positions of -log p(gold token), p from the sparse distribution."""
    ids, probs = dist
    hit = (ids == gold[:, None]).to(probs.dtype)
    p = (probs * hit).sum(-1).clamp(min=FLOOR)
    return float(-p.log().mean())


def combine(dists: Sequence[Sparse], weights: Sequence[float], k: int) -> Sparse:
    """Σ w_s · P_s over sources, per position, kept to its k most probable tokens and renormalised;
    always k columns (padding has probability 0), so lines stack in a batch. Works over the
    union of the ids met in the sequence, never the whole vocabulary: [T, 152k] floats for one
    2k-token sequence of Qwen's vocabulary would be 1.2 GB.
    """
    ids = torch.cat([d[0] for d in dists], dim=1)
    probs = torch.cat([w * d[1] for d, w in zip(dists, weights, strict=True)], dim=1)
    union, where = torch.unique(ids, return_inverse=True)
    dense = torch.zeros(ids.shape[0], len(union), dtype=probs.dtype)
    dense.scatter_add_(1, where, probs)
    top, index = dense.topk(min(k, len(union)), dim=-1)
    ids, probs = union[index], top / top.sum(-1, keepdim=True).clamp(min=FLOOR)
    if ids.shape[1] < k:  # fewer distinct tokens than k: pad with the first, at probability 0
        pad = k - ids.shape[1]
        ids = torch.cat([ids, ids[:, :1].expand(-1, pad)], dim=1)
        probs = torch.cat([probs, probs.new_zeros(len(probs), pad)], dim=1)
    return ids, probs


def fuse(dists: Sequence[Sparse], gold: torch.Tensor, kind: FusionKind, k: int) -> Sparse:
    """The fused distribution of one sequence (MinCE or AvgCE, see the module)."""
    if not dists:
        raise ValueError("fusion needs at least one source distribution")
    ces = torch.tensor([gold_cross_entropy(d, gold) for d in dists], dtype=torch.float64)
    if kind == "min_ce":
        weights = [1.0 if s == int(ces.argmin()) else 0.0 for s in range(len(dists))]
    elif kind == "avg_ce":
        weights = torch.softmax(-ces, 0).tolist()
    else:
        raise ValueError(f"fusion function must be min_ce or avg_ce, got {kind!r}")
    kept = [(d, w) for d, w in zip(dists, weights, strict=True) if w > 0]
    return combine([d for d, _ in kept], [w for _, w in kept], k)
