"""Which elements of one task vector a sparsifying method keeps (mergekit's sparsify.py).

Each `Keep` answers, chunk by chunk, which elements survive, and knows the L1 norm of the
survivors (mergekit's `rescale` matches the L1 norm of the pruned task vector to the
original). Random keeps draw from the stream of (recipe seed, source position, tensor)
only, so the candidates of a study share their random numbers and differ only by their parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from evomerge.merge.kernels import (
    SCAN,
    Pieces,
    Scalar,
    Selection,
    bernoulli,
    chunks,
    steps,
    top_k,
    uniform16,
)
from evomerge.models import TensorSlot

RESCALE_EPS = 1e-7  # below this L1 norm mergekit leaves a pruned tensor unscaled


class Keep:
    """Kept elements of one task vector, chunk by chunk."""

    kept_l1: Scalar
    by_magnitude = False  # does `mask_` read the magnitudes it is given?

    def mask_(self, a: torch.Tensor, start: int) -> torch.Tensor:
        """A 1/0 multiplier for elements start..start+len(a); `a` holds their magnitudes
        when `by_magnitude` (and may be overwritten)."""
        raise NotImplementedError

    def rescale(self, l1: float) -> Scalar:
        """mergekit's L1 rescale factor of the pruned task vector (a tensor on the device
        when the kept norm is one: deciding on the host would wait for the device)."""
        kept = self.kept_l1
        if l1 < RESCALE_EPS:
            return 1.0
        if torch.is_tensor(kept):
            return torch.where(kept < RESCALE_EPS, 1.0, l1 / kept)
        return 1.0 if kept < RESCALE_EPS else l1 / kept


@dataclass(frozen=True)
class MagnitudeKeep(Keep):
    """The top `k = max(1, int(density * n))` magnitudes (TIES)."""

    sel: Selection
    by_magnitude = True

    @property
    def kept_l1(self) -> Scalar:
        return self.sel.kept_l1

    def mask_(self, a: torch.Tensor, start: int) -> torch.Tensor:
        return self.sel.mask_(a, start)


@dataclass(frozen=True)
class BandKeep(Keep):
    """Magnitudes ranked inside a band: the top `k_hi` minus the top `k_lo` (breadcrumbs)."""

    upper: Selection
    lower: Selection
    by_magnitude = True

    @property
    def kept_l1(self) -> Scalar:
        return self.upper.kept_l1 - self.lower.kept_l1

    def mask_(self, a: torch.Tensor, start: int) -> torch.Tensor:
        # The lower selection (the outliers) is inside the upper one.
        return self.upper.mask_(a.clone(), start).sub_(self.lower.mask_(a, start))


@dataclass(frozen=True)
class StoredKeep(Keep):
    """A mask computed up front (random and DELLA keeps)."""

    stored: torch.Tensor  # bool [n]
    kept_l1: Scalar

    def mask_(self, a: torch.Tensor, start: int) -> torch.Tensor:
        return self.stored[start : start + a.numel()].view(torch.uint8)


def task_vector(slot: TensorSlot, row: int) -> Pieces:
    """Task vector `row` of `slot`, formed span by span as a scan reads it."""
    return Pieces(partial(slot.piece, row), slot.numel, slot.device)


def magnitude(slot: TensorSlot, row: int, density: float, want_l1: bool) -> Keep:
    k = max(1, int(density * slot.numel))
    return MagnitudeKeep(top_k(task_vector(slot, row), k, slot.grid, row, want_l1))


def band(slot: TensorSlot, row: int, density: float, gamma: float, want_l1: bool) -> Keep:
    """mergekit's magnitude_outliers: drop the top `gamma` fraction, then the smallest."""
    n = slot.numel
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    x = task_vector(slot, row)
    return BandKeep(
        top_k(x, n - n_bot, slot.grid, row, want_l1),
        top_k(x, n - n_bot - target, slot.grid, row, want_l1),
    )


@dataclass(frozen=True)
class RandomKeep(Keep):
    """DARE: each element kept with probability `density`, drawn from the stream `key` as
    the fused pass goes (a draw is cheaper to redo than a mask is to store and reload)."""

    key: tuple[int, int]
    density: float
    kept_l1: Scalar

    def mask_(self, a: torch.Tensor, start: int) -> torch.Tensor:
        out = torch.empty(a.shape, dtype=torch.float32, device=a.device)
        return bernoulli(self.key, start, self.density, out)


def l1_by_draw(slot: TensorSlot, row: int, key: tuple[int, int]) -> torch.Tensor:
    """Sum of |tv[row]| per 16-bit draw value of the stream `key` (draws sorted as ints).

    The L1 norm kept at any density is then a prefix sum, so DARE's rescale needs no pass
    over the tensor. Computed by the first candidate of a seed, kept on the slot.
    """
    cached = slot.cache.get(("l1_by_draw", row))
    if cached is not None and cached[0] == key:
        return cached[1]
    device = slot.device
    table = torch.zeros(1 << 16, dtype=torch.float64, device=device)
    for start, stop in chunks(slot.numel, steps(SCAN, device)):
        draws = uniform16(key, start, stop, device).int().add_(1 << 15)
        x = slot.piece(row, start, stop)
        table.index_add_(0, draws, x.double().abs())  # bincount would ask the device its max
    slot.cache[("l1_by_draw", row)] = (key, table.float())
    return slot.cache[("l1_by_draw", row)][1]


def random(slot: TensorSlot, row: int, density: float, key: tuple[int, int], want_l1: bool) -> Keep:
    kept = 0.0
    if want_l1:
        below = min(math.ceil(density * (1 << 16)), 1 << 16)  # draws kept: those < threshold
        kept = l1_by_draw(slot, row, key)[:below].sum(dtype=torch.float64)
    return RandomKeep(key, density, kept)


def della(slot: TensorSlot, row: int, density: float, epsilon: float, key: tuple[int, int]) -> Keep:
    """DELLA's MagPrune: keep probability rises linearly with magnitude rank in each row,
    from density - epsilon (smallest) to density + epsilon (largest)."""
    device = slot.device
    cols = slot.shape[-1] if len(slot.shape) >= 2 else slot.numel
    rows = slot.numel // cols
    step = max(1, steps(SCAN, device) // cols)
    stored = torch.empty(slot.numel, dtype=torch.bool, device=device)
    kept = torch.zeros((), dtype=torch.float64, device=device)
    ranks_of = torch.arange(cols, device=device).expand(step, cols)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        start, stop = r0 * cols, r1 * cols
        a = slot.piece(row, start, stop).abs().view(r1 - r0, cols)
        order = a.argsort(dim=1)
        rank = torch.empty_like(order).scatter_(1, order, ranks_of[: r1 - r0])
        rank_norm = (rank.float() / max(cols - 1, 1)).clamp_(0, 1)
        probs = (density - epsilon) + rank_norm * 2 * epsilon
        u = uniform16(key, start, stop, device).view(r1 - r0, cols).float()
        m = u < probs.mul_(65536).sub_(32768)  # u uniform in -32768..32767
        stored[start:stop] = m.view(-1)
        kept += (a * m.view(torch.uint8)).sum(dtype=torch.float64)
    return StoredKeep(stored, kept)


def valid_della(density: float, epsilon: float) -> bool:
    """mergekit refuses epsilon unless density +/- epsilon stays inside (0, 1)."""
    return not 0 < density < 1 or (density - epsilon > 0 and density + epsilon < 1)
