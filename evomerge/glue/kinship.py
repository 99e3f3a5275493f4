"""Which models of a zoo can merge with which: weight similarity, clusters, and the reason a
model stands apart (Model-GLUE's first step).

Similarity is Model-GLUE's: for each attention and MLP weight matrix of the decoder layers,
the cosine similarity of each column (input feature) of the two models' matrices, averaged
over the columns and then over the matrices. Fine-tunes of one base sit near 1 (the zoo's
experts: above 0.99); models from another initialisation near 0. Checkpoints are read one
tensor at a time, so a zoo of 7B models needs a few tensors of memory, not a model.

Pairs that cannot merge at all (another architecture, other tensor shapes, another
tokenizer) get no similarity and a reason; clusters are formed by complete linkage at the
threshold, so every pair inside a cluster is similar, not just a chain of neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

from evomerge.layout import Layout
from evomerge.models import Checkpoint, ids_differing, vocab_of

DEFAULT_THRESHOLD = 0.95


@dataclass(frozen=True)
class ZooAnalysis:
    """The similarity matrix of a set of models, their clusters, and who stands apart why."""

    names: tuple[str, ...]
    matrix: tuple[tuple[float | None, ...], ...]  # None: the pair cannot merge (see reasons)
    reasons: dict[tuple[str, str], str]  # (a, b) with a before b: why the pair cannot merge
    clusters: tuple[tuple[str, ...], ...]
    threshold: float

    def similarity(self, a: str, b: str) -> float | None:
        return self.matrix[self.names.index(a)][self.names.index(b)]

    def apart(self) -> dict[str, str]:
        """Models in a cluster of their own, with the reason they merge with no other."""
        out = {}
        for (name,) in (c for c in self.clusters if len(c) == 1):
            others = [n for n in self.names if n != name]
            if not others:
                continue
            scored = [(self.similarity(name, o), o) for o in others]
            comparable = [(s, o) for s, o in scored if s is not None]
            if comparable:
                s, o = max(comparable)
                out[name] = (
                    f"weights unlike every other model's (most similar: {o}, {max(s, 0):.3f} < "
                    f"{self.threshold}): another initialisation"
                )
            else:
                out[name] = "; ".join(
                    self.reasons[tuple(sorted((name, o), key=self.names.index))] for o in others
                )
        return out

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "matrix": [list(r) for r in self.matrix],
            "clusters": [list(c) for c in self.clusters],
            "threshold": self.threshold,
            "apart": self.apart(),
        }


def check_threshold(threshold: float) -> float:
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return threshold


def _mismatch(a: Checkpoint, b: Checkpoint, vocabs: dict[Path, dict | None]) -> str | None:
    """Why two checkpoints cannot merge, or None."""
    if a.config.model_type != b.config.model_type:
        return f"other architectures ({a.config.model_type} and {b.config.model_type})"
    sa, sb = a.shapes(), b.shapes()
    if sa != sb:
        differ = sorted(k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k))
        return f"other tensor shapes ({len(differ)} differ, e.g. {differ[0]})"
    va, vb = vocabs[a.path], vocabs[b.path]
    if va is not None and vb is not None and (differ := ids_differing(va, vb)):
        return f"other tokenizers ({differ} token ids differ)"
    return None


def column_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over columns of the cosine similarity of a[:, j] and b[:, j] (float64)."""
    a, b = a.double(), b.double()
    dot = (a * b).sum(0)
    norm = a.norm(dim=0) * b.norm(dim=0)
    cos = torch.where(norm > 0, dot / norm.clamp_min(1e-300), torch.zeros_like(dot))
    return float(cos.mean())


def _matrices(ck: Checkpoint) -> list[str]:
    """The decoder layers' weight matrices: attention and MLP (norms and biases left out)."""
    parts = Layout.of(ck.config).parts(ck.files, str(ck.path))
    shapes = ck.shapes()
    return [n for n, part in parts.items() if isinstance(part, int) and len(shapes[n]) == 2]


def _clusters(names: list[str], sim: dict[tuple[str, str], float], threshold: float):
    """Complete linkage: join the two clusters whose least similar pair is the most similar,
    while that pair is at or above the threshold."""
    clusters = [[n] for n in names]

    def link(x: list[str], y: list[str]) -> float:
        return min(sim.get((a, b), sim.get((b, a), -1.0)) for a in x for b in y)

    while len(clusters) > 1:
        best, i, j = max(
            (link(x, y), i, j) for (i, x), (j, y) in combinations(enumerate(clusters), 2)
        )
        if best < threshold:
            break
        clusters[i] += clusters.pop(j)
    order = {n: k for k, n in enumerate(names)}
    return tuple(
        sorted((tuple(sorted(c, key=order.get)) for c in clusters), key=lambda c: order[c[0]])
    )


def analyse(
    models: Mapping[str, str | Path],
    threshold: float = DEFAULT_THRESHOLD,
    progress: Callable[[str], None] | None = None,
) -> ZooAnalysis:
    """Similarity of every mergeable pair of `models` (name → checkpoint folder), clusters at
    `threshold`; FileNotFoundError or ValueError naming a model that cannot be read."""
    check_threshold(threshold)
    if len(models) < 2:
        raise ValueError(f"give at least two models to compare, got {len(models)}")
    names = list(models)
    cks = {}
    for name, path in models.items():
        try:
            cks[name] = Checkpoint.open(path)
            _matrices(cks[name])
        except (OSError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
    vocabs = {ck.path: vocab_of(ck.path) for ck in cks.values()}
    reasons, sim = {}, {}
    pairs = []
    for a, b in combinations(names, 2):
        why = _mismatch(cks[a], cks[b], vocabs)
        if why is None:
            pairs.append((a, b))
        else:
            reasons[(a, b)] = why
    for (a, b), value in _similarities(cks, pairs, progress).items():
        sim[(a, b)] = value
    matrix = tuple(
        tuple(1.0 if a == b else sim.get((a, b), sim.get((b, a))) for b in names) for a in names
    )
    return ZooAnalysis(tuple(names), matrix, reasons, _clusters(names, sim, threshold), threshold)


def _similarities(
    cks: Mapping[str, Checkpoint],
    pairs: list[tuple[str, str]],
    progress: Callable[[str], None] | None,
) -> dict[tuple[str, str], float]:
    """Mean column cosine over the weight matrices, for each pair; each tensor is read once
    per model."""
    if not pairs:
        return {}
    involved = sorted({n for p in pairs for n in p}, key=list(cks).index)
    tensors = _matrices(cks[involved[0]])
    total = dict.fromkeys(pairs, 0.0)
    for i, tensor in enumerate(tensors):
        if progress and i % max(1, len(tensors) // 10) == 0:
            progress(f"similarity: tensor {i + 1}/{len(tensors)} ({tensor})")
        read = {n: cks[n].read(tensor) for n in involved}
        for a, b in pairs:
            total[(a, b)] += column_cosine(read[a], read[b])
    return {p: v / len(tensors) for p, v in total.items()}


def merge_similarity(
    base: str | Path,
    sources: list[str | Path],
    weights: tuple[float, ...],
    candidates: list[int],
) -> list[float]:
    """Similarity (the same measure) of the task-arithmetic merge base + Σ w_i (source_i -
    base) to each source of `candidates`, one tensor at a time: Model-GLUE's `similarity`
    selection picks its next model by it."""
    ck_base = Checkpoint.open(base)
    cks = [Checkpoint.open(s) for s in sources]
    tensors = _matrices(ck_base)
    total = [0.0] * len(candidates)
    for tensor in tensors:
        b = ck_base.read(tensor).double()
        read = [ck.read(tensor).double() for ck in cks]
        merged = b + sum(w * (r - b) for w, r in zip(weights, read, strict=True) if w)
        for k, c in enumerate(candidates):
            total[k] += column_cosine(merged, read[c])
    return [t / len(tensors) for t in total]
