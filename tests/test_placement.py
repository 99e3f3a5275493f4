"""Placements: every merge method builds today's bits from either placement, statistics come
back from the on-disk cache, and the host placement holds no private copy of the weights."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from evomerge import stats_cache, tensor_stats
from evomerge.merge import METHODS, build, kernels, resolve
from evomerge.models import SourceSet, TensorSlot, _form
from evomerge.placement import Placement
from evomerge.recipe import Recipe
from tests.fixtures_models import NAMES, make_family
from tests.test_merge_methods import recipe_for

PLACEMENTS = [p.value for p in Placement]
# The GPU cases run where one is (the host placement then streams through pinned buffers).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@dataclass(frozen=True, eq=False)
class WholeSlot(TensorSlot):
    """A slot whose base and task vectors are formed whole up front, as builds did before
    spans: every span and piece a method reads is a view of them."""

    @cached_property
    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _form(self.raw)

    def piece(self, row: int, start: int, stop: int) -> torch.Tensor:
        return self.whole[1][row, start:stop]

    def span(self, start: int, stop: int, into=None, rows=None) -> tuple[torch.Tensor, ...]:
        b, tv = self.whole
        tv = tv if rows is None else tv[list(rows)]
        return b[start:stop], tv[:, start:stop]


def resident_build(recipe: Recipe, sources: SourceSet) -> dict[str, torch.Tensor]:
    """The build as it was before placements: every tensor's float32 base and task vectors
    formed whole and resident at once, merged tensor by tensor."""
    model = sources.new_model(recipe.dtype)
    plan = resolve(recipe, sources)
    params = dict(model.named_parameters(remove_duplicate=False))
    slots = [sources.slots[i] for i in range(len(sources.slots))]
    resident = [WholeSlot(*(getattr(s, f.name) for f in fields(TensorSlot))) for s in slots]
    with torch.no_grad():
        for slot in resident:
            plan.method.merge(plan.job(slot, params[slot.name].detach().view(-1)))
    return {k: v.clone() for k, v in model.state_dict().items()}


def placed_build(recipe: Recipe, sources: SourceSet) -> dict[str, torch.Tensor]:
    model = sources.new_model(recipe.dtype)
    build(recipe, sources, model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bits(mine: dict, theirs: dict) -> None:
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def _load(base, sources, placement, names=NAMES, base_name="base", device="cpu") -> SourceSet:
    return SourceSet.load(
        base, sources, names=names, base_name=base_name, placement=placement, device=device
    )


def fix_shapes(monkeypatch) -> None:
    """Run the kernels as they run on a GPU: shapes the host knows, numbers left on the device."""
    monkeypatch.setattr(kernels, "DYNAMIC_SHAPES", frozenset())


def coarse_grid(monkeypatch) -> None:
    """Magnitude grids of 8 points (a new statistics cache key): the tiny models' top-k
    thresholds then fall between grid values too, not only on them."""
    monkeypatch.setattr(tensor_stats, "GRID", 8)
    monkeypatch.setattr(stats_cache, "GRID", 8)


@pytest.mark.parametrize("shapes", ["dynamic", "fixed"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_placement_builds_the_same_bits(
    method, placement, device, shapes, tiny_family, monkeypatch
):
    coarse_grid(monkeypatch)
    reference = _load(tiny_family.base, tiny_family.sources, Placement.DEVICE, device=device)
    placed = _load(tiny_family.base, tiny_family.sources, placement, device=device)
    recipe = recipe_for(method, reference, fixed={"density": 0.6}, seed=3)
    expected = resident_build(recipe, reference)
    if shapes == "fixed":
        fix_shapes(monkeypatch)
    assert_bits(placed_build(recipe, placed), expected)
    assert_bits(placed_build(recipe, placed), expected)  # again, after the first build's caches


# What reads a number or a data-dependent shape back from a tensor: on a GPU, each waits for
# every kernel queued before it.
_WAITS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy"}
_DYNAMIC = {"nonzero", "argwhere", "masked_select", "unique", "bincount", "repeat_interleave"}


class HostWaits(TorchFunctionMode):
    """Records every torch call that would make the host wait for a GPU: a number read back
    from a tensor, an output whose size depends on the data, boolean indexing."""

    def __init__(self, host: set[int]) -> None:
        super().__init__()
        self.host, self.seen = host, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        tensor = args[0] if args and torch.is_tensor(args[0]) else None
        on_host = tensor is not None and tensor.untyped_storage().data_ptr() in self.host
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
        if (name in _WAITS and not on_host) or name in _DYNAMIC:
            self.seen.append(name)
        elif torch.is_tensor(index) and index.dtype == torch.bool:
            self.seen.append(f"{name}[bool]")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_builds_never_wait_for_the_device(placement, tiny_family, monkeypatch):
    """The weighted sums, the TIES/DARE family and SCE, as a GPU runs them, read no number
    back from the device: a candidate's build is queued whole. The statistics (host memory)
    are what the host reads. SLERP and model stock compute a ratio from a Gram matrix on the
    host, which this check cannot tell from a read-back on the CPU (the GPU test covers them)."""
    fix_shapes(monkeypatch)
    coarse_grid(monkeypatch)
    monkeypatch.setattr(kernels, "SCAN", 1 << 10)  # many steps per tensor
    monkeypatch.setattr(kernels, "CHUNK", 1 << 10)
    sources = _load(tiny_family.base, tiny_family.sources, placement)
    host = {
        t.untyped_storage().data_ptr()
        for slot in sources.slots
        for t in (slot.l1, slot.gram, slot.grid.values, slot.grid.above, slot.grid.atleast)
    }
    cases = [(m, {}) for m in ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")]
    cases += [("della", {}), ("ties", {"rescale": True}), ("breadcrumbs_ties", {"rescale": True})]
    cases += [("model_stock", {"filter_wise": True}), ("sce", {})]
    for method, options in cases:
        recipe = recipe_for(method, sources, fixed={"density": 0.6}, seed=3, options=options)
        placed_build(recipe, sources)  # the first build of a seed writes its DARE tables
        with HostWaits(host) as waits:
            placed_build(recipe, sources)
        assert waits.seen == [], f"{method} {options} waits: {set(waits.seen)}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_gpu_build_never_synchronizes(placement, tiny_family):
    """On a GPU: torch itself refuses any synchronizing call during a build."""
    sources = _load(tiny_family.base, tiny_family.sources, placement, device="cuda")
    for method in sorted(METHODS):
        recipe = recipe_for(method, sources, fixed={"density": 0.6}, seed=3)
        model = sources.new_model(recipe.dtype)
        build(recipe, sources, model)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            build(recipe, sources, model)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_host_builds_keep_cuda_reserved_memory_flat(tiny_family):
    """Build after build, the host placement's staged copies reuse the allocator's blocks:
    what the worker reserves on its GPU stops growing after the first builds."""
    sources = _load(tiny_family.base, tiny_family.sources, Placement.HOST, device="cuda")
    recipe = recipe_for("ties", sources, fixed={"density": 0.6}, seed=3)
    model = sources.new_model(recipe.dtype)
    reserved = []
    for _ in range(8):
        build(recipe, sources, model)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[2:] == [reserved[2]] * 6, reserved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_placement_builds_the_same_bits_on_bf16_shards(
    placement, device, tiny_llama_bf16_sharded
):
    fam = tiny_llama_bf16_sharded
    reference = _load(fam.base, fam.sources, Placement.DEVICE, names=NAMES[:2], device=device)
    placed = _load(fam.base, fam.sources, placement, names=NAMES[:2], device=device)
    for method in sorted(METHODS):
        srcs = NAMES[:1] if method == "slerp" else NAMES[:2]
        recipe = recipe_for(method, reference, sources=srcs, dtype="bfloat16", seed=5)
        assert_bits(placed_build(recipe, placed), resident_build(recipe, reference))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_placement_builds_the_same_bits_on_the_zoo(placement, zoo_dir):
    from evomerge.zoo import resolve_model

    experts = ("zoo:add", "zoo:reverse", "zoo:translate")
    paths = [resolve_model(e, zoo_dir) for e in experts]
    base = resolve_model("zoo:base", zoo_dir)
    reference = _load(base, paths, Placement.DEVICE, names=experts, base_name="zoo:base")
    placed = _load(base, paths, placement, names=experts, base_name="zoo:base")
    for method in sorted(METHODS):
        recipe = recipe_for(
            method,
            reference,
            base=None if method == "linear" else "zoo:base",
            sources=experts[:1] if method == "slerp" else experts,
            fixed={"density": 0.5},
        )
        assert_bits(placed_build(recipe, placed), resident_build(recipe, reference))


def test_statistics_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    fam = make_family(tmp_path / "one", "llama", seed=11)
    first = _load(fam.base, fam.sources, Placement.HOST)
    files = list((tmp_path / "cache" / "stats").glob("*.safetensors"))
    assert len(files) == 1
    moved = tmp_path / "moved"
    (tmp_path / "one").rename(moved)  # the key is the content, not the paths
    second = _load(moved / "base", [moved / p.name for p in fam.sources], Placement.DEVICE)
    assert list((tmp_path / "cache" / "stats").glob("*.safetensors")) == files
    for a, b in zip(first.entries, second.entries, strict=True):
        assert torch.equal(a.stats.gram, b.stats.gram) and torch.equal(a.stats.l1, b.stats.l1)
        assert torch.equal(a.stats.grid.values, b.stats.grid.values)
    other = make_family(tmp_path / "two", "llama", seed=12)  # same shapes, other weights
    _load(other.base, other.sources, Placement.HOST)
    assert len(list((tmp_path / "cache" / "stats").glob("*.safetensors"))) == 2


def test_an_unwritable_statistics_cache_is_warned_and_builds_the_same_bits(
    tmp_path, monkeypatch, tiny_llama
):
    """A cache that cannot be written (here its stats folder is a file; read-only or full
    disks alike) costs the cache, never the run: the statistics and DARE's tables stay in
    the worker's memory, with a warning, and the build's bits are the cached build's."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "ok"))
    cached = _load(tiny_llama.base, tiny_llama.sources, Placement.HOST)
    recipe = recipe_for("dare_ties", cached, fixed={"density": 0.6}, seed=3)
    expected = placed_build(recipe, cached)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "stats").write_text("not a folder")
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "broken"))
    with pytest.warns(UserWarning, match="cannot write the statistics cache"):
        uncached = _load(tiny_llama.base, tiny_llama.sources, Placement.HOST)
    with pytest.warns(UserWarning, match="cannot write the statistics cache"):
        assert_bits(placed_build(recipe, uncached), expected)


def _mapped_file(address: int) -> str:
    """The file mapped at `address` in this process ("" for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, stop = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < stop:
            return fields[5] if len(fields) == 6 else ""
    raise AssertionError(f"{address:#x} is not mapped")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_build_streams_each_tensor_once(placement, device, tiny_llama, monkeypatch):
    """A build reads every tensor's weights once, the merge's own read: with the host
    placement on a GPU each read is a copy of every source to the device."""
    sources = _load(tiny_llama.base, tiny_llama.sources, placement, device=device)
    streamed = []
    stream = sources.weights.stream

    def counted(names):
        for name, tensors in zip(names, stream(names), strict=True):
            streamed.append(name)
            yield tensors

    recipe = recipe_for("ties", sources, fixed={"density": 0.5})
    model = sources.new_model(recipe.dtype)
    monkeypatch.setattr(sources.weights, "stream", counted)
    build(recipe, sources, model)
    assert streamed == [e.name for e in sources.entries]


def test_host_placement_maps_the_files_and_copies_nothing(tiny_llama):
    """Host weights are the page cache's pages of the checkpoint files (shared by every
    process that maps them); device weights are the worker's own memory."""
    host = _load(tiny_llama.base, tiny_llama.sources, Placement.HOST)
    device = _load(tiny_llama.base, tiny_llama.sources, Placement.DEVICE)
    names = [e.name for e in host.entries]
    for name, mapped, owned in zip(
        names, host.weights.stream(names), device.weights.stream(names), strict=True
    ):
        files = {_mapped_file(t.data_ptr()) for t in mapped}
        assert all(f.endswith(".safetensors") for f in files), name
        assert {_mapped_file(t.data_ptr()) for t in owned} & files == set(), name


def test_dare_tables_live_in_files_a_second_worker_maps(tmp_path, monkeypatch, tiny_llama):
    """DARE's kept-L1-by-draw tables are written beside the statistics and used mapped from
    there (page cache, not a worker's memory); another worker of the node finds them, and
    builds the same bits from them."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    first = _load(tiny_llama.base, tiny_llama.sources, Placement.HOST)
    recipe = recipe_for("dare_ties", first, fixed={"density": 0.6}, seed=3)
    expected = placed_build(recipe, first)
    tables = [e.cache.get(("l1_by_draw", row)) for e in first.entries for row in range(3)]
    assert all(t is not None for t in tables)
    assert all(_mapped_file(t[1].data_ptr()).endswith(".safetensors") for t in tables)
    second = _load(tiny_llama.base, tiny_llama.sources, Placement.DEVICE)
    found = [e.cache.get(("l1_by_draw", row)) for e in second.entries for row in range(3)]
    assert all(torch.equal(a[1], b[1]) and a[0] == b[0] for a, b in zip(tables, found, strict=True))
    assert_bits(placed_build(recipe, second), expected)
