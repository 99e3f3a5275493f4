"""Model-GLUE's heuristic selection: which sources of a cluster to merge, and with what weight.

`average`: score each source alone, then add them best-first to a running average, keeping a
source only if the merge's fitness rises. (Model-GLUE keeps one that does not lower it; on a
proxy of a few dozen rows ties are common, and a tie kept the harmful fine-tune at a small
coefficient on one CPU's test zoo: a source that adds nothing measurable is left out.)
`coefficient`: the same, but each step tries the new source at every coefficient c of a grid
(merge = (1 - c) * merge + c * source) and keeps the best c. `similarity`: `coefficient`,
taking next the source whose weights are most (or least) similar to the merge so far.
Merges are in the study's method (task vectors, for task arithmetic), and the shares of a
merge can be scaled: an average of task vectors (scale 1) dilutes each skill, where task
arithmetic of fine-tunes keeps them at about 0.8 a source. A harmful source (one whose
addition lowers every merge) is dropped, with the fitness that dropped it as the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))

Weights = tuple[float, ...]


def key(weights: Sequence[float]) -> Weights:
    """Candidates are looked up by their weights, rounded past float noise."""
    return tuple(round(float(w), 6) for w in weights)


class Needed(Exception):
    """The replay reached candidates that have no score yet."""

    def __init__(self, candidates: list[Weights]) -> None:
        super().__init__(f"{len(candidates)} candidate(s) to score")
        self.candidates = candidates


@dataclass
class Selection:
    """The outcome of a finished heuristic: the merge's weights and each source's fate."""

    weights: Weights
    fitness: float
    kept: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # source -> why

    def to_dict(self) -> dict:
        return {
            "weights": list(self.weights),
            "fitness": self.fitness,
            "kept": self.kept,
            "dropped": self.dropped,
        }


class Scores:
    """The fitness of scored candidates; asking for unscored ones raises `Needed`."""

    def __init__(self, known: Mapping[Weights, float]) -> None:
        self._known = dict(known)

    def all(self, candidates: Sequence[Weights]) -> list[float]:
        missing = [c for c in map(key, candidates) if c not in self._known]
        if missing:
            raise Needed(list(dict.fromkeys(missing)))
        return [self._known[key(c)] for c in candidates]


def _one_hot(n: int, i: int) -> Weights:
    return tuple(1.0 if j == i else 0.0 for j in range(n))


def _start(names: Sequence[str], scores: Scores) -> tuple[list[int], list[float]]:
    """Round one: every source alone; the order best-first (ties: the order given)."""
    solo = scores.all([_one_hot(len(names), i) for i in range(len(names))])
    order = sorted(range(len(names)), key=lambda i: (-solo[i], i))
    return order, solo


def _fmt(x: float) -> str:
    return "failed" if x == -math.inf else f"{x:.4f}"


def average(names: Sequence[str], scores: Scores, scale: float) -> Selection:
    n = len(names)
    order, solo = _start(names, scores)
    first = order[0]
    kept, weights, best = [first], _one_hot(n, first), solo[first]
    dropped = {}
    for i in order[1:]:
        trial = [*kept, i]
        candidate = key(scale / len(trial) if j in trial else 0.0 for j in range(n))
        (fitness,) = scores.all([candidate])
        if fitness > best:
            kept, weights, best = trial, candidate, fitness
        else:
            dropped[names[i]] = (
                f"the average with it scored {_fmt(fitness)}, not above {best:.4f} without it"
            )
    return Selection(weights, best, [names[i] for i in kept], dropped)


Closeness = Callable[[Weights, Sequence[int]], list[float]]
"""Weight similarity of the merge with `weights` to each of the sources given by index."""


def coefficient(
    names: Sequence[str],
    scores: Scores,
    scale: float,
    pick: Callable[[Weights, list[int]], int] | None = None,
) -> Selection:
    """Sources join best-first (or in the order `pick` chooses from the merge so far), each
    at the best coefficient of the grid."""
    n = len(names)
    order, solo = _start(names, scores)
    first = order[0]
    kept, shares, best = [first], _one_hot(n, first), solo[first]
    weights, remaining = shares, order[1:]
    dropped = {}
    while remaining:
        i = pick(weights, remaining) if pick else remaining[0]
        remaining.remove(i)
        mixed = [[(1 - c) * w + (c if j == i else 0.0) for j, w in enumerate(shares)] for c in GRID]
        grid = [key(scale * w for w in m) for m in mixed]
        fitness = scores.all(grid)
        top = max(range(len(GRID)), key=lambda g: (fitness[g], -g))
        if fitness[top] > best:
            kept, shares, weights, best = [*kept, i], mixed[top], grid[top], fitness[top]
        else:
            dropped[names[i]] = (
                f"its best coefficient ({GRID[top]}) scored {_fmt(fitness[top])}, not above "
                f"{best:.4f} without it"
            )
    return Selection(weights, best, [names[i] for i in kept], dropped)


def similarity(
    names: Sequence[str], scores: Scores, scale: float, closeness: Closeness, lowest: bool
) -> Selection:
    """`coefficient`, but the next source is the one most (or, `lowest`, least) similar in
    weights to the merge so far."""

    def pick(weights: Weights, remaining: list[int]) -> int:
        sims = closeness(weights, remaining)
        ranked = sorted(range(len(remaining)), key=lambda k: (sims[k], -k), reverse=not lowest)
        return remaining[ranked[0]]

    return coefficient(names, scores, scale, pick)


def replay(
    heuristic: str,
    names: Sequence[str],
    known: Mapping[Weights, float],
    scale: float = 1.0,
    closeness: Closeness | None = None,
    lowest: bool = False,
) -> Selection | list[Weights]:
    """The finished selection, or the candidates (weights) the heuristic needs scored next.

    Each source alone is scored at weight 1 (the model itself); a merge of k sources gives
    them shares that sum to 1, times `scale` (1: the plain average of the models).
    `similarity` needs `closeness`."""
    scores = Scores(known)
    try:
        if heuristic == "average":
            return average(names, scores, scale)
        if heuristic == "coefficient":
            return coefficient(names, scores, scale)
        if heuristic == "similarity" and closeness is not None:
            return similarity(names, scores, scale, closeness, lowest)
        raise ValueError(f"unknown selection {heuristic!r} (or similarity without closeness)")
    except Needed as need:
        return need.candidates
