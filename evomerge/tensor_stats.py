"""Per-tensor statistics of a SourceSet that make candidate builds cheap.

L1 norms and Gram matrices turn weighted sums and SLERP into a few scalars; magnitude rank
grids find any TIES top-k threshold with at most one scan instead of a sort. They depend
only on the checkpoints' content, so `evomerge.stats_cache` keeps them on disk between
loads, and they stay on the host, where a build reads them without waiting for a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRID = 4096  # magnitude rank grid points per (tensor, source): bracket top-k thresholds
_STAT_CHUNK = 1 << 20
_SORT_CHUNK = 1 << 22


@dataclass(frozen=True, eq=False)
class MagnitudeGrid:
    """Exact order statistics of |x| per row at GRID evenly spaced ranks.

    For grid value v_j, `above[j]` = #(|x| > v_j) and `atleast[j]` = #(|x| >= v_j). Any
    top-k threshold lies between two neighbouring grid values, so finding it exactly takes
    at most one scan for the few elements in between, never a sort.
    """

    values: torch.Tensor  # float32 [rows, G + 1], ascending
    above: torch.Tensor  # int64 [rows, G + 1]
    atleast: torch.Tensor  # int64 [rows, G + 1]

    @classmethod
    def of(cls, x: torch.Tensor) -> MagnitudeGrid:
        """The grid of each row of x [rows, n].

        Each chunk of a row is sorted on its own (non-negative floats sort like their int32
        bits, and torch sorts ints by radix, fast), then each grid value is found by a
        binary search over bit patterns, counting in the sorted chunks: exact, without
        sorting, or holding more than one copy of, the whole row.
        """
        n = x.shape[1]
        g = max(min(GRID, n - 1), 1)
        want = torch.arange(g + 1, device=x.device) * (n - 1) // g + 1  # ranks, 1-based
        rows = []
        for row in x:
            parts = [
                row[a:b].float().abs().view(torch.int32).sort().values
                for a, b in ((a, min(a + _SORT_CHUNK, n)) for a in range(0, n, _SORT_CHUNK))
            ]

            def at_most(v: torch.Tensor, parts=parts) -> torch.Tensor:
                return sum(torch.searchsorted(p, v, right=True) for p in parts)

            if len(parts) == 1:
                v = parts[0][want - 1]
            else:  # the smallest bit pattern with `want` elements at or below it
                v = torch.zeros_like(want, dtype=torch.int32)
                hi = torch.full_like(v, torch.iinfo(torch.int32).max)
                while bool((v < hi).any()):
                    mid = v + (hi - v) // 2
                    enough = at_most(mid) >= want
                    hi = torch.where(enough, mid, hi)
                    v = torch.where(enough, v, mid + 1)
            rows.append((v.view(torch.float32), n - at_most(v), n - at_most(v - 1)))
        if not rows:  # a SourceSet of the base alone
            return cls(torch.empty(0, g + 1, device=x.device), *want.new_empty(2, 0, g + 1))
        return cls(*(torch.stack(t) for t in zip(*rows, strict=True)))


def _statistics(base: torch.Tensor, tv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 norm of each task vector and the Gram matrix of (base, tv_1, ..., tv_S), in float64."""
    s = tv.shape[0]
    gram = torch.zeros(s + 1, s + 1, dtype=torch.float64, device=base.device)
    l1 = torch.zeros(s, dtype=torch.float64, device=base.device)
    for start in range(0, base.numel(), _STAT_CHUNK):
        stop = start + _STAT_CHUNK
        rows = torch.cat([base[None, start:stop], tv[:, start:stop]]).double()
        gram += rows @ rows.T
        l1 += rows[1:].abs().sum(dim=1)
    return l1, gram


@dataclass(frozen=True, eq=False)
class TensorStats:
    """The statistics of one tensor: task vectors' L1 norms, the Gram matrix of
    (base, tv_1, ..., tv_S) in float64, and each task vector's magnitude grid."""

    l1: torch.Tensor  # float64 [S]
    gram: torch.Tensor  # float64 [S + 1, S + 1]
    grid: MagnitudeGrid

    FIELDS = ("l1", "gram", "values", "above", "atleast")

    @classmethod
    def of(cls, base: torch.Tensor, tv: torch.Tensor) -> TensorStats:
        return cls(*_statistics(base, tv), MagnitudeGrid.of(tv))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor, for storing."""
        g = self.grid
        return dict(
            zip(self.FIELDS, (self.l1, self.gram, g.values, g.above, g.atleast), strict=True)
        )

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> TensorStats:
        return cls(t["l1"], t["gram"], MagnitudeGrid(t["values"], t["above"], t["atleast"]))
