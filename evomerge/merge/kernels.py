"""Tensor kernels the methods share: weighted sums, exact top-k selection, keyed random bits.

Everything is exact with respect to mergekit's maths; the speed comes from doing less work:
a weighted sum streams straight into the candidate's storage, a top-k threshold is found
from precomputed magnitude order statistics plus at most one scan (no sort), and random
masks come from a counter-based hash (no generator state, identical on every device and
process). Nothing on a GPU waits for the device: see `fixed_shapes`.
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
    return torch.empty(
        len(slot.raw) * min(size, slot.numel), dtype=torch.float32, device=slot.device
    )


def combine(slot: TensorSlot, out: torch.Tensor, coef: list[float]) -> None:
    """out = sum_m coef[m] * x_m over the raw weights x = [base, source_1, ...], in float32,
    span by span, then cast to the candidate's dtype.

    A weighted sum of task vectors is one of the models (b + sum c_r (x_r - b) is
    (1 - sum c_r) b + sum c_r x_r; `model_coefficients` turns one into the other), so it
    forms no task vector: one pass over each span per nonzero term, each reading one model's
    weights, where forming them first took 2S + 1 (on the CPU, issue 4's floor of twice the
    copy is met only this way). A chain of in-place adds streams better than one addmm (whose
    packing costs a copy)."""
    terms = [(slot.raw[m], c) for m, c in enumerate(coef) if c != 0]
    if not terms:
        out.zero_()
        return
    (first, c0), *rest = terms
    size = steps(SCAN, slot.device)  # one accumulator, like a scan: longer steps stream better
    part = (
        None
        if out.dtype == torch.float32
        else torch.empty(min(size, slot.numel), dtype=torch.float32, device=out.device)
    )
    for start, stop in chunks(slot.numel, size):
        dst = out[start:stop] if part is None else part[: stop - start]
        if first.dtype == torch.float32:
            torch.mul(first[start:stop], c0, out=dst)
        else:  # widen first: a bf16 product would round to bf16
            dst.copy_(first[start:stop]).mul_(c0)
        for x, c in rest:
            dst.add_(x[start:stop], alpha=c)  # float32 += any float: summed in float32
        if part is not None:  # an add with a bf16 output takes torch's slow mixed-dtype loop
            out[start:stop].copy_(dst)


# Device types on which an op whose output size depends on the data (nonzero, boolean
# indexing) or a number read back from a tensor costs nothing. On a GPU each one is a host
# round trip: the host waits for every kernel queued before it, per tensor and source.
DYNAMIC_SHAPES = frozenset({"cpu"})


def fixed_shapes(device: torch.device) -> bool:
    """Must kernels on `device` keep every shape known to the host and leave numbers on it?"""
    return device.type not in DYNAMIC_SHAPES


Scalar = float | torch.Tensor  # a Python number, or a 0-dim tensor left on the device


@dataclass(frozen=True)
class Selection:
    """An exact top-k set by magnitude: |x| > thr, and |x| == thr at flat index < cut.

    Ties at the threshold are broken by position, so exactly k elements are kept.
    `kept_l1` is the L1 norm of the kept elements (for rescaling). Where shapes are fixed
    (`fixed_shapes`), `thr`, `cut` and `kept_l1` may be 0-dim tensors on the device.
    """

    thr: Scalar
    cut: int | torch.Tensor
    kept_l1: Scalar

    def mask_(self, a: torch.Tensor, start: int) -> torch.Tensor:
        """Overwrite the magnitudes `a` of x[start : start + len(a)] with the keep mask (1/0)."""
        if isinstance(self.cut, int):
            split = min(max(self.cut - start, 0), a.numel())
            a[:split].ge_(self.thr)
            a[split:].gt_(self.thr)
            return a
        # The cut is on the device: |x| >= thr before it, |x| >= the next float after it.
        thr = self.thr if torch.is_tensor(self.thr) else a.new_full((), self.thr)
        after = torch.nextafter(thr, torch.full_like(thr, math.inf))
        at = torch.arange(
            start, start + a.numel(), dtype=_index(start + a.numel()), device=a.device
        )
        return a.ge_(torch.where(at < self.cut, thr, after))


def _index(n: int) -> torch.dtype:
    """The narrowest integer type for positions below n: a step's worth of them is a buffer."""
    return torch.int32 if n < 1 << 31 else torch.int64


def keep_all(l1: Scalar) -> Selection:
    return Selection(-math.inf, 0, l1)


def keep_none() -> Selection:
    return Selection(math.inf, 0, 0.0)


def _positions(mask: torch.Tensor, cap: int) -> torch.Tensor:
    """Positions of the True entries of a 1-D mask, of which there are at most `cap`.

    Where shapes are fixed: exactly `cap` of them, padded with -1 (a shape the host knows
    without asking the device). Elsewhere only the True ones, found eight bytes at a time.
    """
    if fixed_shapes(mask.device):
        return torch.nonzero_static(mask, size=cap, fill_value=-1).squeeze(1)
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

    def magnitudes(self):
        """(start, |x[start:stop]|) step by step."""
        for start, stop in chunks(self.n, steps(SCAN, self.device)):
            yield start, self.at(start, stop).abs()


def _l1(a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (a * keep.view(torch.uint8)).sum(dtype=torch.float64)


def _between(x: Pieces, lo: float, hi: float, count: int, want_l1: bool):
    """Values and positions of the `count` elements with lo < |x| < hi (padding: value -1,
    position n), and the L1 norm of |x| >= hi if wanted."""
    l1 = torch.zeros((), dtype=torch.float64, device=x.device)
    vals, pos = [], []
    for start, a in x.magnitudes():
        if want_l1:
            l1 += _l1(a, a >= hi)
        p = _positions((a > lo) & (a < hi), min(count, a.numel()))
        vals.append(torch.where(p >= 0, a[p.clamp(min=0)], -1.0))
        pos.append(torch.where(p >= 0, p + start, x.n))
    return torch.cat(vals), torch.cat(pos), l1


def _at(x: Pieces, thr: float, need: int, equal: int, want_l1: bool) -> Selection:
    """The top k when the threshold `thr` is a grid value: all of |x| > thr and the first
    `need` of the `equal` elements with |x| == thr. A scan only finds where those end (and
    the kept L1): none when every equal element is kept and no L1 is wanted."""
    if need == equal and not want_l1:
        return Selection(thr, x.n, 0.0)
    cut = _Cut(thr, need, x.n, x.device)
    l1 = torch.zeros((), dtype=torch.float64, device=x.device)
    for start, a in x.magnitudes():
        if want_l1:
            l1 += _l1(a, a > thr)
        if need < equal:
            cut.step(start, a)
    return _selection(x, thr, x.n if need == equal else cut.at, l1 + thr * need, want_l1)


class _Cut:
    """Where the `need`-th element equal to `thr` is, counted step by step on the device:
    the position after it (`at`), or n until it is found."""

    def __init__(self, thr: Scalar, need: int | torch.Tensor, n: int, device) -> None:
        self.thr, self.need, self.n = thr, need, n
        self.at = torch.full((), n, dtype=torch.int64, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)

    def step(self, start: int, a: torch.Tensor) -> None:
        """Count the elements of x[start : start + len(a)], given as `a`."""
        count = (a == self.thr).cumsum(0, dtype=_index(self.n)).add_(self.seen)
        last = torch.searchsorted(count, self.need)  # the first place the count reaches need
        found = (last < a.numel()) & (self.seen < self.need)
        self.at = torch.where(found, last + start + 1, self.at)
        self.seen = count[-1]


def _selection(x: Pieces, thr: Scalar, cut, kept: torch.Tensor, want_l1: bool) -> Selection:
    """Where shapes are fixed, what the data decided stays on the device; elsewhere it is
    read back (free there), for the cheaper mask of a known cut."""
    if fixed_shapes(x.device):
        return Selection(thr, cut, kept if want_l1 else 0.0)
    return Selection(float(thr), int(cut), float(kept) if want_l1 else 0.0)


def top_k(x: Pieces, k: int, grid: MagnitudeGrid, row: int, want_l1: bool) -> Selection:
    """The k largest-magnitude elements of x = tv[row]; `grid` (on the host) holds its order
    statistics.

    The grid gives the neighbouring grid values lo <= threshold <= hi and the exact counts
    at and above each. A threshold at a grid value needs no search; one strictly between
    them is the kthvalue of the elements in between (about n / GRID of them, gathered in one
    scan). Nothing here waits for the device: what the host decides, it decides from the
    grid, and what depends on the data stays a tensor.
    """
    n = x.n
    if k >= n:  # the whole row's sum, summed as it always was
        return keep_all(x.at(0, n).abs().sum(dtype=torch.float64) if want_l1 else 0.0)
    if k <= 0:
        return keep_none()
    values, above, atleast = (t[row].numpy() for t in (grid.values, grid.above, grid.atleast))
    j_lo = int((atleast >= k).sum()) - 1  # last grid value with >= k at or above
    j_hi = int((above >= k).sum())  # first grid value with < k above
    lo, hi = float(values[j_lo]), float(values[j_hi])
    if atleast[j_hi] >= k:
        return _at(x, hi, k - int(above[j_hi]), int(atleast[j_hi] - above[j_hi]), want_l1)
    if above[j_lo] < k:
        return _at(x, lo, k - int(above[j_lo]), int(atleast[j_lo] - above[j_lo]), want_l1)
    count = int(above[j_lo] - atleast[j_hi])  # lo < |x| < hi: at most about n / GRID
    vals, pos, l1 = _between(x, lo, hi, count, want_l1)
    rank = k - int(atleast[j_hi])  # 1-based, descending, among those in between
    thr = torch.kthvalue(vals, vals.numel() - rank + 1).values
    bigger = vals > thr
    need = rank - bigger.sum()
    equal = torch.where(vals == thr, pos, n).sort().values
    cut = equal.index_select(0, need.sub(1).view(1)).squeeze(0).add_(1)
    return _selection(x, thr, cut, l1 + _l1(vals, bigger) + thr * need, want_l1)


def _from_top(hist: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bin where a count from the highest bin down reaches k, and the count above it."""
    down = hist.flip(0)
    at_or_above = down.cumsum(0)
    j = torch.searchsorted(at_or_above, k).view(1)  # counted from the top
    above = (at_or_above.index_select(0, j) - down.index_select(0, j)).squeeze(0)
    return hist.numel() - 1 - j.squeeze(0), above


def top_k_on_device(x: torch.Tensor, k: torch.Tensor) -> Selection:
    """The k largest of the non-negative flat x, exactly, ties by position, where k is a
    0-dim int64 tensor on x's device: for a tensor formed per candidate (SCE's variances),
    which has no grid and whose k the host does not know. A radix select on the float bits
    (non-negative floats order like their int32 bits): a histogram of the top 16 bits, one
    of the low 15 inside the bin that holds the k-th, and a running count for the cut; three
    passes, none of which waits for the device.
    """
    n, device = x.numel(), x.device
    bits = x.view(torch.int32)
    size = steps(SCAN, device)
    ones = torch.ones(min(size, n), dtype=torch.int64, device=device)
    high = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for start, stop in chunks(n, size):
        high.index_add_(0, (bits[start:stop] >> 15).long(), ones[: stop - start])
    b, above_b = _from_top(high, k)
    low = torch.zeros((1 << 15) + 1, dtype=torch.int64, device=device)  # the last: other bins
    for start, stop in chunks(n, size):
        v = bits[start:stop]
        key = torch.where((v >> 15) == b, v & 0x7FFF, 1 << 15)
        low.index_add_(0, key.long(), ones[: stop - start])
    lo, above_thr = _from_top(low[:-1], k - above_b)
    thr = ((b << 15) | lo).to(torch.int32).view(torch.float32)
    cut = _Cut(thr, k - above_b - above_thr, n, device)
    for start, stop in chunks(n, size):
        cut.step(start, x[start:stop])
    none = k <= 0
    return Selection(torch.where(none, math.inf, thr), torch.where(none, 0, cut.at), 0.0)


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
    """Into the float32 tensor `out`, the keep mask (1/0) of elements start..start+len(out):
    each kept with probability p (rounded up to a multiple of 2**-16), from the stream `key`.

    A float mask, compared in float32 (which holds every int16 exactly): on the CPU an int16
    comparison into bool runs unvectorised, 2.5x the widening copy and the float compare
    together, and a float multiplier is cheaper to apply than a byte one."""
    threshold = math.ceil(p * 65536) - 32768  # keep iff the int16 draw is below it
    if threshold > 32767:
        return out.fill_(1)
    u = uniform16(key, start, start + out.numel(), out.device)
    return out.copy_(u).lt_(threshold)
