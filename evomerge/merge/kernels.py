"""Tensor kernels the methods share: weighted sums, exact top-k selection, keyed random bits.

Everything is exact with respect to mergekit's maths; the speed comes from doing less work:
a weighted sum streams straight into the candidate's storage, a top-k threshold is
found from precomputed magnitude order statistics plus one scan (no sort), and random masks
come from a counter-based hash (no generator state, identical on every device and process).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from evomerge.models import MagnitudeGrid, TensorSlot

CHUNK = 1 << 17  # elements per source per step of a fused pass: amortises per-op cost, fits L3
SCAN = 1 << 18  # elements per step of a single-tensor scan
GPU_STEPS = 64  # on a GPU a step is 64x longer: kernel launches cost there, not cache misses


def steps(size: int, device: torch.device) -> int:
    """Elements per step of `size` (CHUNK or SCAN) on `device`."""
    return size if device.type == "cpu" else size * GPU_STEPS


def chunks(n: int, size: int = CHUNK):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def span_buffer(slot: TensorSlot, size: int) -> torch.Tensor:
    """A buffer for `slot.span` of up to `size` elements, reused by every span of a pass."""
    return torch.empty(len(slot.raw) * min(size, slot.numel), dtype=slot.store, device=slot.device)


def _weighted_sum(
    b: torch.Tensor, tv: torch.Tensor, c_base: float, terms: list, out: torch.Tensor
) -> None:
    """out = c_base * b + sum of c * tv[r] over `terms` (r, c), in len(terms) passes."""
    if c_base == 1 and terms:
        (r, c), *terms = terms
        torch.add(b, tv[r], alpha=c, out=out)
    else:
        torch.mul(b, c_base, out=out)
    for r, c in terms:
        out.add_(tv[r], alpha=c)


def combine(slot: TensorSlot, out: torch.Tensor, c_base: float, coef: list[float]) -> None:
    """out = c_base * base + sum_r coef[r] * tv[r], span by span: each weight is read once
    and no task vector is written out, so a weighted sum moves what a copy of its inputs
    and output would. A chain of in-place adds streams better than one addmm (whose
    packing costs a copy)."""
    terms = [(r, c) for r, c in enumerate(coef) if c != 0]
    size = steps(CHUNK, slot.device)
    into = span_buffer(slot, size)
    part = (
        None
        if out.dtype == torch.float32
        else torch.empty(min(size, slot.numel), device=out.device)
    )
    for start, stop in chunks(slot.numel, size):
        b, tv = slot.span(start, stop, into)
        dst = out[start:stop] if part is None else part[: stop - start]
        _weighted_sum(b, tv, c_base, terms, dst)
        if part is not None:
            out[start:stop].copy_(dst)


@dataclass(frozen=True)
class Selection:
    """An exact top-k set by magnitude: |x| > thr, and |x| == thr at flat index < cut.

    Ties at the threshold are broken by position, so exactly k elements are kept.
    `kept_l1` is the L1 norm of the kept elements (for rescaling).
    """

    thr: float
    cut: int
    kept_l1: float

    def mask_(self, a: torch.Tensor, start: int) -> torch.Tensor:
        """Overwrite the magnitudes `a` of x[start : start + len(a)] with the keep mask (1/0)."""
        split = min(max(self.cut - start, 0), a.numel())
        a[:split].ge_(self.thr)
        a[split:].gt_(self.thr)
        return a


def keep_all(l1: float) -> Selection:
    return Selection(-math.inf, 0, l1)


def keep_none() -> Selection:
    return Selection(math.inf, 0, 0.0)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a sparse bool mask, eight bytes at a time."""
    n8 = mask.numel() // 8 * 8
    words = mask[:n8].view(torch.uint8).view(torch.int64)
    hit = words.nonzero().squeeze(1)
    pos = (hit[:, None] * 8 + torch.arange(8, device=mask.device)).reshape(-1)
    pos = pos[mask[pos]]
    if n8 < mask.numel():
        pos = torch.cat([pos, mask[n8:].nonzero().squeeze(1) + n8])
    return pos


@dataclass(frozen=True)
class Pieces:
    """A flat float32 tensor of `n` elements on `device`, read piece by piece: `at(start,
    stop)`. A task vector row is formed span by span this way, never whole."""

    at: Callable[[int, int], torch.Tensor]
    n: int
    device: torch.device

    @classmethod
    def of(cls, x: torch.Tensor) -> Pieces:
        """A tensor at hand."""
        return cls(lambda start, stop: x[start:stop].float(), x.numel(), x.device)


def _scan(x: Pieces, lo: float, hi: float, want_l1: bool):
    """Values and positions of lo <= |x| <= hi; the L1 norm of |x| > hi if wanted."""
    l1 = torch.zeros((), dtype=torch.float64, device=x.device)
    vals, pos = [], []
    for start, stop in chunks(x.n, steps(SCAN, x.device)):
        a = x.at(start, stop).abs()
        if want_l1:
            l1 += (a * (a > hi).view(torch.uint8)).sum(dtype=torch.float64)
        p = _positions((a >= lo) & (a <= hi))
        vals.append(a[p])
        pos.append(p + start)
    return torch.cat(vals), torch.cat(pos), float(l1)


def top_k(x: Pieces, k: int, grid: MagnitudeGrid, row: int, want_l1: bool) -> Selection:
    """The k largest-magnitude elements of x = tv[row]; `grid` holds its order statistics.

    The grid gives the neighbouring grid values lo <= threshold <= hi and the exact count
    above hi; one scan collects the elements in [lo, hi] (about n / GRID of them) and
    kthvalue among those gives the exact threshold.
    """
    n = x.n
    if k >= n:  # the whole row's sum, summed as it always was
        return keep_all(float(x.at(0, n).abs().sum(dtype=torch.float64)) if want_l1 else 0.0)
    if k <= 0:
        return keep_none()
    j_lo = int((grid.atleast[row] >= k).sum()) - 1  # last grid value with >= k at or above
    j_hi = int((grid.above[row] >= k).sum())  # first grid value with < k above
    lo, hi = float(grid.values[row, j_lo]), float(grid.values[row, j_hi])
    count = int(grid.above[row, j_hi])
    vals, pos, above_l1 = _scan(x, lo, hi, want_l1)
    rank = k - count  # 1-based, descending, within the bracket
    thr_t = torch.kthvalue(vals, vals.numel() - rank + 1).values
    bigger = vals > thr_t
    need = rank - int(bigger.sum())
    equal = pos[vals == thr_t]
    cut = n if need == equal.numel() else int(equal.sort().values[need - 1]) + 1
    thr = float(thr_t)
    kept = above_l1 + float(vals[bigger].sum(dtype=torch.float64)) + thr * need if want_l1 else 0.0
    return Selection(thr, cut, kept)


# lowbias32 (C. Wellons) on int32 with logical shifts; int32 products wrap on every device.
_M1, _M2 = 0x7FEB352D, 0x846CA68B - (1 << 32)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16).bitwise_and_(0xFFFF))
    x.mul_(_M1)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15).bitwise_and_(0x1FFFF))
    x.mul_(_M2)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16).bitwise_and_(0xFFFF))
    return x


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def rng_key(seed: int, position: int, tensor: str) -> tuple[int, int]:
    """The key of one (seed, source position in the recipe, tensor) stream: what the random
    draws depend on, only. Never a source's name or path: the same recipe over models copied
    to another folder must draw the same masks."""
    digest = hashlib.sha256(f"{seed}\0{position}\0{tensor}".encode()).digest()
    k1, k2 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")
    return _int32(k1), _int32(k2)


def uniform16(key: tuple[int, int], start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Uniform int16 values (each of the 65536 equally likely) for elements start..stop of
    the stream `key`: element i is half i % 2 of the hash of i // 2 (little-endian halves).

    Element i's value depends only on (key, i): any chunking gives the same draws.
    """
    first, last = start // 2, (stop + 1) // 2
    k1 = _int32(key[0] ^ (first >> 31) * 0x9E3779B9)
    lo = first & 0x7FFFFFFF
    if lo + (last - first) > 1 << 31:
        raise ValueError("uniform16: a chunk may not cross a 2**32 element boundary")
    x = torch.arange(lo, lo + last - first, dtype=torch.int32, device=device)
    halves = _mix(x.add_(key[1]).bitwise_xor_(k1)).view(torch.int16)
    return halves[start % 2 : start % 2 + stop - start]


def bernoulli(key: tuple[int, int], start: int, p: float, out: torch.Tensor) -> torch.Tensor:
    """Into the bool tensor `out`, the keep mask of elements start..start+len(out): each
    kept with probability p (rounded up to a multiple of 2**-16), from the stream `key`."""
    threshold = math.ceil(p * 65536) - 32768  # keep iff the int16 draw is below it
    if threshold > 32767:
        return out.fill_(True)
    u = uniform16(key, start, start + out.numel(), out.device)
    return torch.lt(u, threshold, out=out)
