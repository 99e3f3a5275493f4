"""Model-GLUE's heuristic selection: which sources of a cluster to merge, and with what weight.

`average`: score each source alone, then add them best-first to a running average, keeping a
source only if the merge's fitness does not drop. `coefficient`: the same, but each step
tries the new source at every coefficient c of a grid (merge = (1 - c) * merge + c * source)
and keeps the best c. Merges are in the study's method (task vectors, for task arithmetic),
and the shares of a merge can be scaled: an average of task vectors (scale 1) dilutes each
skill, where task arithmetic of fine-tunes keeps them at about 0.8 a source. A harmful
source (one whose addition lowers every merge) is dropped, with the fitness that dropped it
as the reason.

A heuristic is straight-line code over `score(weights)`: it is replayed from the start each
time the coordinator asks for work, against the study's finished trials, so it needs no
state of its own: a resumed study picks up where the store says, and a candidate scored in
an earlier run is never scored again. When the replay reaches a candidate not scored yet it
stops and says which candidates it needs (a whole round at once, so workers run in parallel).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

HEURISTICS = ("average", "coefficient")
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
        if fitness >= best:
            kept, weights, best = trial, candidate, fitness
        else:
            dropped[names[i]] = (
                f"the average with it scored {_fmt(fitness)} < {best:.4f} without it"
            )
    return Selection(weights, best, [names[i] for i in kept], dropped)


def coefficient(names: Sequence[str], scores: Scores, scale: float) -> Selection:
    n = len(names)
    order, solo = _start(names, scores)
    first = order[0]
    kept, shares, best = [first], _one_hot(n, first), solo[first]
    weights = shares
    dropped = {}
    for i in order[1:]:
        mixed = [[(1 - c) * w + (c if j == i else 0.0) for j, w in enumerate(shares)] for c in GRID]
        grid = [key(scale * w for w in m) for m in mixed]
        fitness = scores.all(grid)
        top = max(range(len(GRID)), key=lambda g: (fitness[g], -g))
        if fitness[top] >= best:
            kept, shares, weights, best = [*kept, i], mixed[top], grid[top], fitness[top]
        else:
            dropped[names[i]] = (
                f"its best coefficient ({GRID[top]}) scored {_fmt(fitness[top])} < {best:.4f} "
                "without it"
            )
    return Selection(weights, best, [names[i] for i in kept], dropped)


RUNNERS: dict[str, Callable[[Sequence[str], Scores, float], Selection]] = {
    "average": average,
    "coefficient": coefficient,
}


def replay(
    heuristic: str, names: Sequence[str], known: Mapping[Weights, float], scale: float = 1.0
) -> Selection | list[Weights]:
    """The finished selection, or the candidates (weights) the heuristic needs scored next.

    Each source alone is scored at weight 1 (the model itself); a merge of k sources gives
    them shares that sum to 1, times `scale` (1: the plain average of the models)."""
    try:
        return RUNNERS[heuristic](names, Scores(known), scale)
    except Needed as need:
        return need.candidates
