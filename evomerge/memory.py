"""Memory plans: what a worker's sources, statistics, candidate, build and evaluation take
in each placement, computed from safetensors headers before any weight is read, against
what the worker's device has free, and which placement `auto` picks.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import psutil
import torch

from evomerge.config import EVAL_BATCH
from evomerge.merge.kernels import CHUNK, GPU_STEPS
from evomerge.models import DTYPES, Checkpoint
from evomerge.placement import Placement, release_heap
from evomerge.tensor_stats import GRID

MARGIN = 0.9  # plan for at most this share of what the device has free
EVAL_TOKENS = 256  # tokens a row of an lm-eval task is assumed to take (its rows are not read)
GiB = 1 << 30


@dataclass(frozen=True)
class Need:
    """Bytes one worker's device holds in one placement."""

    sources: int
    statistics: int
    candidate: int
    build: int
    evaluation: int

    @property
    def total(self) -> int:
        return self.sources + self.statistics + self.candidate + self.build + self.evaluation


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's needs per placement against `available` bytes (None: not known here)."""

    params: int
    shared: int  # bytes of the mapped files the host placement reads through the page cache
    shared_statistics: int  # the statistics files in the page cache, mapped by every worker
    needs: dict[Placement, Need]
    available: int | None
    where: str  # what `available` measured
    asked: str  # the study's workers.sources
    batch: int  # sequences an evaluation scores at a time (fitness.batch_size)
    tokens: int  # the widest row an evaluation scores (a generation's prompt)
    assumed: bool  # `tokens` includes EVAL_TOKENS for lm-eval tasks, whose rows are not read

    def fits(self, placement: Placement) -> bool:
        return self.available is None or self.needs[placement].total <= MARGIN * self.available

    @property
    def choice(self) -> Placement | None:
        """The placement a worker uses (auto: device when it fits); None if it cannot fit."""
        if self.asked != "auto":
            return Placement(self.asked) if self.fits(Placement(self.asked)) else None
        return next((p for p in (Placement.DEVICE, Placement.HOST) if self.fits(p)), None)

    def lines(self) -> list[str]:
        have = "unknown" if self.available is None else f"{self.available / GiB:.2f} GiB"
        big = self.params >= 1e9
        size = f"{self.params / 1e9:.3g}B" if big else f"{self.params / 1e6:.3g}M"
        out = [
            f"{size} parameters a model; device memory {have} ({self.where}), "
            f"planned up to {MARGIN:.0%}; evaluation at batch {self.batch} (fitness.batch_size) "
            f"of rows up to {self.tokens} tokens "
            + (f"({EVAL_TOKENS} assumed for lm-eval tasks)" if self.assumed else "(the tasks')"),
            f"{'GiB':<10}{'sources':>10}{'stats':>10}{'candidate':>11}{'build':>10}"
            f"{'eval':>10}{'total':>10}  fits",
        ]
        for p, n in self.needs.items():
            cells = (n.sources, n.statistics, n.candidate, n.build, n.evaluation, n.total)
            gib = "".join(
                f"{c / GiB:>{w}.3f}" for c, w in zip(cells, (10, 10, 11, 10, 10, 10), strict=True)
            )
            out.append(f"{p.value:<10}{gib}  {'yes' if self.fits(p) else 'NO'}")
        out.append(
            f"host placement: {self.shared / GiB:.2f} GiB of checkpoint files in the page "
            "cache, shared by the workers of a node"
        )
        if self.shared_statistics:
            out.append(
                f"statistics: {self.shared_statistics / GiB:.3f} GiB of cached files in the page "
                "cache, shared by the workers of a node (a GPU worker keeps DARE's tables on the "
                "device)"
            )
        pick = self.choice
        out.append(
            f"workers.sources: {self.asked} -> "
            + (
                pick.value
                if pick
                else "fits no placement (try host, a bfloat16 candidate, a smaller "
                "fitness.batch_size, fewer sources or a larger device)"
            )
        )
        return out


def evaluation_bytes(
    config, item: int, batch: int, tokens: int, generate: int, likelihood: bool, hops: int
) -> int:
    """What scoring a batch of rows `tokens` wide holds beyond the weights. Likelihood
    tasks: the batch's logits in the model's dtype, one sequence's float32 copy and
    log-softmax of them, activations. Generation: each row's KV cache for the prompt and the
    new tokens on every layer a token passes (`hops`), the prompt's activations, the last
    position's logits. A study with both kinds needs the larger (they run one after the
    other)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    activations = batch * tokens * 16 * config.hidden_size
    logits = (batch * item + 8) * tokens * config.vocab_size
    scoring = logits + activations if likelihood else 0
    if not generate:
        return scoring
    kv = batch * (tokens + generate) * hops * 2 * kv_heads * head_dim * item
    return max(scoring, kv + activations + batch * 4 * config.vocab_size)


def plan_worker(
    base: str | None,
    sources: tuple[str, ...],
    routed: tuple[str, ...],
    dtype: str,
    asked: str,
    available: int | None,
    where: str,
    gpu: bool = False,
    batch: int = EVAL_BATCH,
    generate: int = 0,
    likelihood: bool = True,
    repeats: int = 0,
    longest: int | None = None,
    lm_eval: bool = False,
) -> WorkerPlan:
    """The plan of a worker merging `sources` onto `base` and routing `routed` whole models
    (`repeats`: a route's r, whose hops each keep a KV cache), scoring `batch` sequences at a
    time, generating up to `generate` tokens (0: none) and/or scoring `likelihood` tasks,
    whose widest row is `longest` tokens (`fitness.longest_sequence`) and, with `lm_eval`
    tasks, at least EVAL_TOKENS."""
    tokens = max(longest or 0, EVAL_TOKENS if lm_eval or longest is None else 0)
    assumed = tokens == EVAL_TOKENS and (lm_eval or longest is None)
    merged = [Checkpoint.open(p) for p in ((base, *sources) if base else ())]
    whole = [Checkpoint.open(p) for p in routed]
    shapes = (merged or whole)[0].shapes()
    numels = [torch.Size(s).numel() for s in shapes.values()]
    params = sum(numels)
    item = DTYPES[dtype].itemsize
    candidate = (
        params * item
        + sum(sum(torch.Size(s).numel() for s in c.shapes().values()) for c in whole) * item
    )
    config = (merged or whole)[0].config
    hops = config.num_hidden_layers
    if repeats:  # a route: A's layers then B's, r times
        hops = repeats * (hops + whole[-1].config.num_hidden_layers)
    evaluation = evaluation_bytes(config, item, batch, tokens, generate, likelihood, hops)
    s = len(sources)
    if not merged:
        none = Need(0, 0, candidate, 0, evaluation)
        return WorkerPlan(
            params,
            0,
            0,
            {Placement.DEVICE: none, Placement.HOST: none},
            available,
            where,
            asked,
            batch,
            tokens,
            assumed,
        )
    files = sum(c.nbytes() for c in merged)
    # L1 norms, Gram matrices and magnitude grids stay on the host (the host reads them, and
    # never waits for the device to); DARE's L1-by-draw tables go where the sources are.
    grids = sum(8 * s + 8 * (s + 1) ** 2 + s * (min(GRID, n - 1) + 1) * 20 for n in numels)
    tables = len(numels) * s * 4 * (1 << 16)
    largest = max(numels)
    # A build forms task vectors span by span: float32 span buffers (base and sources), the
    # fused pass's three per source and a scan's pieces, a step (SCAN = 2 steps) each; and
    # for the largest tensor DELLA's mask and SCE's variance (1 + 4 bytes an element).
    step = CHUNK * (GPU_STEPS if gpu else 1)
    formed = 4 * step * ((s + 1) + 3 * s + 2 * 4) + 5 * largest
    staged = 2 * (s + 1) * largest * merged[0].locate(next(iter(shapes)))[3].itemsize
    # Every worker maps the statistics from the cache (page cache, one copy a node); a GPU
    # worker copies DARE's tables to its device.
    own = tables if gpu else 0
    needs = {
        Placement.DEVICE: Need(files, own, candidate, formed, evaluation),
        Placement.HOST: Need(0, own, candidate, formed + staged, evaluation),
    }
    return WorkerPlan(
        params, files, grids + tables - own, needs, available, where, asked, batch, tokens, assumed
    )


def device_memory(gpus: float, workers: int, memory_gb: float | None) -> tuple[int | None, str]:
    """Bytes one worker may use on its device, and what that number is."""
    if memory_gb is not None:
        return int(memory_gb * GiB), "workers.memory_gb"
    if gpus > 0:
        if not torch.cuda.is_available():
            return None, "no GPU here: set workers.memory_gb to plan for the workers' GPUs"
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    available = psutil.virtual_memory().available
    return available // workers, f"host memory available, shared by {workers} worker(s)"


# What torch's CPU allocator and cuBLAS (its workspace, on a full GPU) say when an
# allocation fails: both raise a plain RuntimeError, not torch.OutOfMemoryError.
_OOM_TEXTS = ("can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory(e: BaseException) -> bool:
    """Is `e` an allocation failure?"""
    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXTS)


def device_works() -> bool:
    """Whether CUDA still answers after an error. An illegal address or a device-side assert
    poisons the process's context: every later call fails, and only a new process helps."""
    try:
        torch.ones(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
    except Exception:
        return False
    return True


def release() -> None:
    """Give back what a failed allocation's frames held, so the next trial starts clean."""
    gc.collect()
    release_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
