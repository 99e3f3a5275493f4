"""The merge methods, by mergekit's names and with mergekit's semantics and defaults.

A method that is a weighted sum of the base and the task vectors (linear, task arithmetic,
SLERP, model stock, and any task-arithmetic variant at density 1 without sign consensus)
is a weighted sum of the models: it sums their own weights into the candidate with one
coefficient a model (SLERP's and model stock's from per-tensor statistics), forming no task
vector (`combine`). The sparsifying and sign-electing methods run one fused, chunked pass per
tensor. Neither waits for the device: numbers from statistics are read on the host, and
what depends on the data (top-k thresholds, kept norms) stays a tensor where it is.
"""

from __future__ import annotations

import math

import torch

from evomerge.merge import sparsify
from evomerge.merge.kernels import (
    CHUNK,
    SCAN,
    chunks,
    combine,
    keep_none,
    rng_key,
    span_buffer,
    steps,
    top_k_on_device,
)
from evomerge.merge.spec import BasePolicy, MergeMethod, OptionSpec, ParamSpec, TensorJob
from evomerge.models import TensorSlot

WEIGHT = ParamSpec(
    "weight", True, None, doc="scale of the source's task vector (linear: of the source)"
)
DENSITY = ParamSpec(
    "density", True, 1.0, 0.0, 1.0, (0.1, 1.0), doc="fraction of the task vector kept"
)
GAMMA = ParamSpec(
    "gamma", True, 0.01, 0.0, 1.0, (0.0, 0.1), doc="fraction of largest magnitudes dropped"
)
EPSILON = ParamSpec(
    "epsilon", True, 0.15, 0.0, 0.5, (0.0, 0.2), doc="keep-probability spread over ranks"
)
T = ParamSpec("t", False, None, 0.0, 1.0, doc="interpolation from base (0) to source (1)")
SELECT_TOPK = ParamSpec(
    "select_topk", False, 1.0, 0.0, 1.0, (0.1, 1.0), doc="fraction of highest-variance kept"
)
LAMBDA = OptionSpec("lambda", 1.0, "scale of the merged task vector")
INT8_MASK = OptionSpec("int8_mask", False, "mergekit's mask storage; no numerical effect")
FILTER_WISE = OptionSpec("filter_wise", False, "one interpolation ratio per output row")


def _emit(job: TensorJob, start: int, stop: int, b: torch.Tensor, delta: torch.Tensor) -> None:
    """out[start:stop] = b + delta (b: the float32 base there), cast to the candidate's dtype."""
    dst = job.out[start:stop]
    if dst.dtype == torch.float32:
        torch.add(b, delta, out=dst)
    else:
        dst.copy_(b + delta)


def _elect(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """TIES sign election into `out`: 1 where an entry's sign is its column sum's sign
    (a zero sum counts as +), else 0. Float masks: torch's CPU bool kernels are slow."""
    majority = v.sum(dim=0).sign_().add_(0.5).sign_()  # +1 or -1 per column
    return torch.mul(v, majority, out=out).gt_(0)


def _column(values: list, device: torch.device) -> torch.Tensor:
    """`values` (numbers, or 0-dim tensors on `device`) as a float32 [n, 1] column on
    `device`, with no host round trip: the numbers travel in one non-blocking copy from
    pinned memory (a blocking one waits for the device), the tensors never leave it."""
    numbers = torch.tensor([0.0 if torch.is_tensor(v) else v for v in values])
    if device.type == "cuda":  # from pageable memory a copy may wait after all
        numbers = numbers.pin_memory()
    col = numbers.to(device, non_blocking=True)
    for i, v in enumerate(values):
        if torch.is_tensor(v):
            col[i] = v
    return col.view(-1, 1)


def model_coefficients(
    slot: TensorSlot, rows, weights, *, task_vectors: bool = False
) -> list[float]:
    """Per raw weight [base, source_1, ...] coefficients of sum_i weights[i] * model(rows[i])
    (row None: the base), or with `task_vectors` of base + sum_i weights[i] * tv(rows[i])."""
    coef = [0.0] * len(slot.raw)
    for row, w in zip(rows, weights, strict=True):
        coef[0 if row is None else row + 1] += w
    if task_vectors:  # b + sum c_r (x_r - b) = (1 - sum c_r) b + sum c_r x_r
        rest = 1.0 - math.fsum(coef)
        # normalized weights leave ~1e-16 here, which would cost a pass over the base
        coef[0] += 0.0 if abs(rest) <= 1e-12 * math.fsum(map(abs, coef)) else rest
    return coef


class Linear(MergeMethod):
    """Weighted average of whole models: sum(w_i x_i) / sum(w_i) (normalize) or the sum."""

    name = "linear"
    params = (WEIGHT,)
    options = (OptionSpec("normalize", True, "divide by the sum of the weights"),)
    base_policy = BasePolicy.IGNORED

    def check_values(self, values, options, where):
        if options["normalize"] and abs(sum(values["weight"])) < 1e-8:
            raise ValueError(f"{where}: the weights sum to 0, and normalize divides by the sum")

    def merge(self, job: TensorJob) -> None:
        w = job.values["weight"]
        div = sum(w) if job.options["normalize"] else 1.0
        combine(job.slot, job.out, model_coefficients(job.slot, job.rows, [x / div for x in w]))


class Slerp(MergeMethod):
    """Spherical interpolation between recipe.base and the one source, per tensor."""

    name = "slerp"
    params = (T,)
    base_policy = BasePolicy.ENDPOINT
    min_sources = max_sources = 1

    def merge(self, job: TensorJob) -> None:
        t = job.values["t"][0]
        gram = job.slot.gram

        def coords(row: int | None) -> torch.Tensor:
            u = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
            u[0] = 1.0
            if row is not None:
                u[row + 1] = 1.0
            return u

        ua, ub = coords(job.base_row), coords(job.rows[0])
        norm_a = float(ua @ gram @ ua) ** 0.5
        norm_b = float(ub @ gram @ ub) ** 0.5
        norm_a = norm_a if norm_a > 1e-8 else 1.0
        norm_b = norm_b if norm_b > 1e-8 else 1.0
        dot = min(max(float(ua @ gram @ ub) / (norm_a * norm_b), -1.0), 1.0)
        if abs(dot) > 0.9995:
            ca, cb = 1 - t, t
        else:
            theta = math.acos(dot)
            ca = math.sin((1 - t) * theta) / math.sin(theta)
            cb = math.sin(t * theta) / math.sin(theta)
        coef = model_coefficients(job.slot, (job.base_row, job.rows[0]), (ca, cb))
        combine(job.slot, job.out, coef)


class GeneralizedTaskArithmetic(MergeMethod):
    """base + lambda * combine_i(w_i * sparsify(tv_i)), with optional TIES sign consensus."""

    def __init__(
        self, name: str, *, sparsifier: str | None, consensus: bool, normalize: bool, rescale: bool
    ) -> None:
        self.name = name
        self.sparsifier = sparsifier
        self.consensus = consensus
        extra = {"band": (GAMMA,), "della": (EPSILON,)}.get(sparsifier or "", ())
        self.params = (WEIGHT, DENSITY, *extra) if sparsifier else (WEIGHT,)
        options = [OptionSpec("normalize", normalize, "divide by the sum of the weights"), LAMBDA]
        if sparsifier:
            options.append(OptionSpec("rescale", rescale, "restore the L1 norm after pruning"))
        if consensus:
            options.append(INT8_MASK)
        self.options = tuple(options)
        self.deterministic = sparsifier not in ("random", "della")

    def check_values(self, values, options, where):
        if self.sparsifier == "della":
            for d, e in zip(values["density"], values["epsilon"], strict=True):
                if not sparsify.valid_della(d, e):
                    raise ValueError(
                        f"{where}: density {d} +/- epsilon {e} must stay inside (0, 1)"
                    )

    def _keep(self, job: TensorJob, i: int, want_l1: bool) -> sparsify.Keep:
        slot, row, d = job.slot, job.rows[i], job.values["density"][i]
        if d <= 0:
            return sparsify.MagnitudeKeep(keep_none())
        if self.sparsifier == "magnitude":
            return sparsify.magnitude(slot, row, d, want_l1)
        if self.sparsifier == "band":
            return sparsify.band(slot, row, d, job.values["gamma"][i], want_l1)
        key = rng_key(job.seed, i, slot.name)
        if self.sparsifier == "random":
            return sparsify.random(slot, row, d, key, want_l1)
        return sparsify.della(slot, row, d, job.values["epsilon"][i], key)

    def merge(self, job: TensorJob) -> None:
        w = list(job.values["weight"])
        lam, normalize = job.options["lambda"], job.options["normalize"]
        density = job.values.get("density", (1.0,) * len(w))
        pruned = [self.sparsifier is not None and d < 1 for d in density]
        total = sum(w)
        if not self.consensus and not any(pruned):
            div = total if normalize and abs(total) >= 1e-8 else 1.0
            c = [x / div * lam for x in w]
            combine(job.slot, job.out, model_coefficients(job.slot, job.rows, c, task_vectors=True))
            return
        rescale = bool(job.options.get("rescale", False))
        keeps = [self._keep(job, i, rescale) if p else None for i, p in enumerate(pruned)]
        l1 = job.slot.l1.numpy()  # statistics are on the host
        scale = [
            wi * (kp.rescale(float(l1[job.rows[i]])) if kp and rescale else 1.0)
            for i, (wi, kp) in enumerate(zip(w, keeps, strict=True))
        ]
        self._fused(job, keeps, scale, w, normalize, lam)

    def _fused(self, job, keeps, scale, w, normalize: bool, lam: float) -> None:
        """One chunked pass: prune, weight, elect signs (TIES), normalize, write."""
        slot, device = job.slot, job.slot.device
        sc, wt = _column(scale, device), _column(w, device)
        total = sum(w)
        div_all = total if abs(total) >= 1e-8 else 1.0
        by_magnitude = any(k is not None and k.by_magnitude for k in keeps)
        # Chunk buffers reused by every chunk: allocating in the loop costs more than the maths.
        size = steps(CHUNK, device)
        a_buf, d_buf, t_buf = torch.empty(3, len(w), min(size, slot.numel), device=device)
        a_buf = a_buf if by_magnitude else None
        into = span_buffer(slot, size)
        for start, stop in chunks(slot.numel, size):
            c = stop - start
            b, x = slot.span(start, stop, into, job.rows)
            d = torch.mul(x, sc, out=d_buf[:, :c])
            a = x if a_buf is None else torch.abs(x, out=a_buf[:, :c])
            for i, kp in enumerate(keeps):
                if kp is not None:
                    d[i].mul_(kp.mask_(a[i], start))
            if self.consensus:
                keep = _elect(d, t_buf[:, :c])
                mixed = d.mul_(keep).sum(dim=0)
                if normalize:
                    div = keep.mul_(wt).sum(dim=0)
                    mixed /= div.add_((div == 0).view(torch.uint8))  # mergekit: 0 -> 1
            else:
                mixed = d.sum(dim=0)
                if normalize:
                    mixed /= div_all
            if lam != 1:
                mixed *= lam
            _emit(job, start, stop, b, mixed)


def _stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """Model stock's t from Gram matrices [..., k, k] of the task vectors (mean pair cosine)."""
    k = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    i, j = torch.triu_indices(k, k, offset=1, device=gram.device)
    denom = (norms[..., i] * norms[..., j]).clamp(min=1e-6)
    cos = (gram[..., i, j] / denom).clamp(-1, 1).mean(dim=-1)
    den = 1 + (k - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, den))


class ModelStock(MergeMethod):
    """base + t * mean(tv_i), t from the angle between the task vectors (per row: filter_wise)."""

    name = "model_stock"
    options = (FILTER_WISE,)
    min_sources = 2

    def merge(self, job: TensorJob) -> None:
        slot, rows = job.slot, job.rows
        k = len(rows)
        if not job.options["filter_wise"]:
            idx = [r + 1 for r in rows]
            t = float(_stock_ratio(slot.gram[idx][:, idx]))
            coef = model_coefficients(slot, rows, [t / k] * k, task_vectors=True)
            combine(slot, job.out, coef)
            return
        cols = slot.shape[-1] if len(slot.shape) >= 2 else slot.numel
        step = max(1, steps(SCAN, slot.device) // cols)
        into = span_buffer(slot, step * cols)
        for r0 in range(0, slot.numel // cols, step):
            start, stop = r0 * cols, min(r0 + step, slot.numel // cols) * cols
            b, x = slot.span(start, stop, into, rows)
            x = x.view(k, -1, cols)
            xd = x.double()
            t = _stock_ratio(torch.einsum("irc,jrc->rij", xd, xd)).float()
            _emit(job, start, stop, b, (t[:, None] * x.mean(dim=0)).view(-1))


class SCE(MergeMethod):
    """Select (top-variance elements), Calculate (weights from mean squares), Erase (signs)."""

    name = "sce"
    params = (SELECT_TOPK,)
    options = (INT8_MASK,)

    def merge(self, job: TensorJob) -> None:
        slot, rows, k = job.slot, job.rows, len(job.rows)
        device = slot.device
        select = self._select(slot, rows, job.values["select_topk"][0])
        size = steps(CHUNK, device)
        into = span_buffer(slot, size)

        def masked(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            b, x = slot.span(start, stop, into, rows)
            if select is None:
                return b, x
            return b, x * select[0].mask_(select[1][start:stop].clone(), start)

        squares = torch.zeros(k, dtype=torch.float64, device=device)
        for start, stop in chunks(slot.numel, size):
            squares += masked(start, stop)[1].square().sum(dim=1, dtype=torch.float64)
        means = squares / slot.numel
        total = means.sum()
        weights = torch.where(total.abs() < 1e-6, torch.full_like(means, 1 / k), means / total)
        wt = weights.float().view(-1, 1)
        for start, stop in chunks(slot.numel, size):
            b, x = masked(start, stop)
            erased = _elect(x, torch.empty_like(x)).mul_(wt)
            merged = (x * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
            _emit(job, start, stop, b, merged)

    @staticmethod
    def _select(slot: TensorSlot, rows, fraction: float):
        """The top-variance selection over sources and the variance itself, or None (all)."""
        if fraction >= 1:
            return None
        var = torch.empty(slot.numel, dtype=torch.float32, device=slot.device)
        size = steps(CHUNK, slot.device)
        into = span_buffer(slot, size)
        for start, stop in chunks(slot.numel, size):
            var[start:stop] = slot.span(start, stop, into, rows)[1].var(dim=0, unbiased=False)
        # k exactly as mergekit computes it: an int64 tensor times a float is float32, which
        # rounds `count * fraction` differently from float64 for many counts; left on the
        # device, as the selection is.
        k = (var.count_nonzero() * fraction).to(torch.int64)
        return top_k_on_device(var, k), var


def _task_methods() -> tuple[MergeMethod, ...]:
    gta = GeneralizedTaskArithmetic
    return (
        gta("task_arithmetic", sparsifier=None, consensus=False, normalize=False, rescale=False),
        gta("ties", sparsifier="magnitude", consensus=True, normalize=True, rescale=False),
        gta("dare_ties", sparsifier="random", consensus=True, normalize=False, rescale=True),
        gta("dare_linear", sparsifier="random", consensus=False, normalize=False, rescale=True),
        gta("breadcrumbs_ties", sparsifier="band", consensus=True, normalize=False, rescale=False),
        gta("della", sparsifier="della", consensus=True, normalize=True, rescale=True),
    )


METHODS: dict[str, MergeMethod] = {
    m.name: m for m in (Linear(), Slerp(), *_task_methods(), ModelStock(), SCE())
}


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})"
        ) from None


def method_params(name: str) -> tuple[ParamSpec, ...]:
    """The numeric parameters of method `name`: what a search space may search."""
    return get_method(name).params
