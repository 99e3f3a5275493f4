"""Every method against mergekit's own maths, and the statistics of the random ones."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from mergekit import merge_methods as mk
from mergekit.merge_methods import PerGroupValues, merge_state_dicts
from mergekit.merge_methods.base import MISSING, ParameterScope

from evomerge.merge import METHODS, build, get_method, kernels, method_params, resolve, sparsify
from evomerge.merge.kernels import (
    Pieces,
    bernoulli,
    rng_key,
    top_k,
    top_k_on_device,
    uniform16,
)
from evomerge.models import MagnitudeGrid, SourceSet
from evomerge.recipe import Recipe
from tests.fixtures_models import NAMES, load_state

RANGES = {
    "weight": (0.1, 1.0),
    "density": (0.25, 0.75),
    "gamma": (0.0, 0.05),
    "epsilon": (0.05, 0.2),
    "t": (0.0, 1.0),
    "select_topk": (0.2, 0.9),
}


def varied_params(method: str, groups, k: int, seed: int = 0, **fixed) -> dict:
    """Different values in every group (and for every source): a real per-group test."""
    rng = random.Random(seed)
    params = {}
    for spec in method_params(method):
        width = k if spec.per_source else 1
        if spec.name in fixed:
            params[spec.name] = ((fixed[spec.name],) * width,) * len(groups)
            continue
        lo, hi = RANGES[spec.name]
        params[spec.name] = tuple(
            tuple(round(rng.uniform(lo, hi), 4) for _ in range(width)) for _ in groups
        )
    return params


def recipe_for(method: str, ss: SourceSet, granularity: int = 2, **kw) -> Recipe:
    groups = ss.groups(granularity)
    srcs = kw.pop("sources", ("a",) if method == "slerp" else NAMES)
    fixed = kw.pop("fixed", {})
    if not get_method(method).deterministic:
        fixed = {"density": 1.0} | fixed
    return Recipe(
        method=method,
        base=kw.pop("base", None if method == "linear" else "base"),
        sources=srcs,
        groups=groups,
        params=kw.pop("params", None) or varied_params(method, groups, len(srcs), **fixed),
        **kw,
    )


def ours(recipe: Recipe, sources: SourceSet) -> dict[str, torch.Tensor]:
    model = sources.new_model(recipe.dtype)
    build(recipe, sources, model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def mergekit_merge(recipe: Recipe, sources: SourceSet, states, **kw) -> dict[str, torch.Tensor]:
    """mergekit's merge_state_dicts with the recipe's per-group values, tensor by tensor."""
    plan = resolve(recipe, sources)
    method = get_method(recipe.method)
    members = list(recipe.sources)
    if recipe.base is not None and recipe.base not in members:
        members.insert(0, recipe.base)
    models = {name: states[name] for name in members}
    names = list(models[members[0]])
    part = {s.name: s.part for s in sources.slots}
    parameters: dict = dict(plan.options)
    for spec in method.params:
        per_tensor = []
        for tensor in names:
            values = plan.values[plan.group_of[part[tensor]]][spec.name]
            per_tensor.append(
                dict(zip(recipe.sources, values, strict=True)) if spec.per_source else values[0]
            )
        parameters[spec.name] = PerGroupValues(per_tensor)
    return merge_state_dicts(
        models, recipe.method, parameters=parameters, base=recipe.base, dtype=torch.float32, **kw
    )


def assert_same(a: dict, b: dict, **tol) -> None:
    assert set(a) >= set(b)
    for name in b:
        torch.testing.assert_close(
            a[name],
            b[name],
            msg=lambda m, name=name: f"{name}: {m}",
            **(tol or dict(rtol=1e-5, atol=1e-6)),
        )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_matches_mergekit(method, tiny_sources, tiny_states):
    """Per-group, per-source parameters; random methods at density 1."""
    recipe = recipe_for(method, tiny_sources)
    assert_same(ours(recipe, tiny_sources), mergekit_merge(recipe, tiny_sources, tiny_states))


OPTION_CASES = [
    ("ties", {"rescale": True, "normalize": False, "lambda": 0.7, "int8_mask": True}),
    ("breadcrumbs_ties", {"rescale": True, "normalize": True}),
    ("task_arithmetic", {"normalize": True, "lambda": 1.3}),
    ("linear", {"normalize": False}),
    ("model_stock", {"filter_wise": True}),
    ("dare_linear", {"normalize": True, "lambda": 0.5}),
]


@pytest.mark.parametrize(("method", "options"), OPTION_CASES)
def test_options_match_mergekit(method, options, tiny_llama):
    sources = SourceSet.load(tiny_llama.base, tiny_llama.sources, names=NAMES, base_name="base")
    states = {"base": load_state(tiny_llama.base)} | {
        n: load_state(p) for n, p in zip(NAMES, tiny_llama.sources, strict=True)
    }
    recipe = recipe_for(method, sources, options=options)
    assert_same(ours(recipe, sources), mergekit_merge(recipe, sources, states))


def test_zoo_matches_mergekit(zoo_dir):
    """The trained toy zoo: a base and experts fine-tuned from it, by `zoo:` reference."""
    from evomerge.zoo import resolve_model

    experts = ("zoo:add", "zoo:reverse", "zoo:translate")
    sources = SourceSet.load(
        resolve_model("zoo:base", zoo_dir),
        [resolve_model(e, zoo_dir) for e in experts],
        names=experts,
        base_name="zoo:base",
    )
    states = {n: load_state(p) for n, p in sources.paths.items()}
    for method in ("ties", "breadcrumbs_ties", "sce", "slerp", "model_stock"):
        recipe = recipe_for(
            method, sources, base="zoo:base", sources=experts[:1] if method == "slerp" else experts
        )
        assert_same(ours(recipe, sources), mergekit_merge(recipe, sources, states))


def test_subsets_endpoints_and_negative_weights(tiny_sources, tiny_states):
    """Sources in another order or a subset, the base as a linear source or a SLERP endpoint,
    negative task-arithmetic weights."""
    cases = [
        recipe_for("ties", tiny_sources, sources=("c", "a")),
        recipe_for("linear", tiny_sources, sources=("b", "base")),
        recipe_for("slerp", tiny_sources, base="a", sources=("base",)),
        recipe_for("slerp", tiny_sources, base="b", sources=("c",), granularity=1),
        recipe_for(
            "task_arithmetic", tiny_sources, params=None, fixed={"weight": -0.4}, granularity=4
        ),
    ]
    for recipe in cases:
        assert_same(ours(recipe, tiny_sources), mergekit_merge(recipe, tiny_sources, tiny_states))


def test_slerp_covers_both_branches(tiny_sources):
    """The fixtures hold tensors on both sides of mergekit's 0.9995 collinearity threshold."""
    cosines = []
    for slot in tiny_sources.slots:
        g = slot.gram
        a2, b2, ab = g[0, 0], g[0, 0] + 2 * g[0, 1] + g[1, 1], g[0, 0] + g[0, 1]
        cosines.append(float(ab / (a2.sqrt() * b2.sqrt())))
    assert min(cosines) < 0.999 and max(cosines) > 0.9995


def test_bfloat16_sharded_checkpoints(tiny_llama_bf16_sharded):
    """bf16 shards, bf16 candidate. TIES at density 1: with bf16 task vectors, magnitudes tie
    at a top-k threshold, and mergekit's unstable argsort breaks such ties arbitrarily."""
    fam = tiny_llama_bf16_sharded
    sources = SourceSet.load(fam.base, fam.sources, names=NAMES[:2], base_name="base")
    states = {"base": load_state(fam.base)} | {
        n: load_state(p) for n, p in zip(NAMES[:2], fam.sources, strict=True)
    }
    for method in ("ties", "linear", "slerp"):
        srcs = NAMES[:1] if method == "slerp" else NAMES[:2]
        recipe = recipe_for(method, sources, sources=srcs, dtype="bfloat16", fixed={"density": 1})
        theirs = mergekit_merge(recipe, sources, states, out_dtype=torch.bfloat16)
        mine = ours(recipe, sources)
        assert all(mine[k].dtype == torch.bfloat16 for k in theirs)
        mismatched = sum(int((mine[k] != theirs[k]).sum()) for k in theirs)
        total = sum(t.numel() for t in theirs.values())
        assert mismatched / total < 0.01  # float32 rounding can flip a bf16 rounding
        assert_same(mine, theirs, rtol=1e-2, atol=1e-5)


def test_weighted_sums_of_bf16_weights_sum_in_float32(tiny_llama_bf16_sharded):
    """A weighted sum reads the bf16 weights themselves (no task vectors formed), so every
    product and sum must be float32: a float32 candidate is within float32 rounding of the
    float64 sum, far inside one bf16 step (2^-8 relative)."""
    fam = tiny_llama_bf16_sharded
    sources = SourceSet.load(fam.base, fam.sources, names=NAMES[:2], base_name="base")
    states = {"base": load_state(fam.base)} | {
        n: load_state(p) for n, p in zip(NAMES[:2], fam.sources, strict=True)
    }
    slot = sources.slots[0]
    base = states["base"][slot.name].double()
    models = [states[n][slot.name].double() for n in NAMES[:2]]
    for method in ("task_arithmetic", "linear"):
        recipe = recipe_for(method, sources, sources=NAMES[:2], granularity=1)
        plan = resolve(recipe, sources)
        w = plan.values[plan.group_of[slot.part]]["weight"]
        if method == "linear":
            want = sum(wi * m for wi, m in zip(w, models, strict=True)) / sum(w)
        else:
            want = base + sum(wi * (m - base) for wi, m in zip(w, models, strict=True))
        mine = ours(recipe, sources)[slot.name]
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine.double(), want, rtol=1e-6, atol=1e-7)


# --- random sparsification -------------------------------------------------------------


def _single(method: str, sources: SourceSet, density: float, **options) -> Recipe:
    groups = sources.groups(1)
    params = {"weight": ((1.0,),) * len(groups), "density": ((density,),) * len(groups)}
    if method == "della":
        params["epsilon"] = ((0.2,),) * len(groups)
    return Recipe(
        method=method,
        base="base",
        sources=("a",),
        groups=groups,
        params=params,
        options=options,
        seed=7,
    )


def _deltas(recipe: Recipe, sources: SourceSet) -> list[tuple[torch.Tensor, torch.Tensor]]:
    merged = ours(recipe, sources)
    spans = [(s.name, s.span(0, s.numel)) for s in sources.slots]
    return [(merged[name].reshape(-1) - b, tv[0]) for name, (b, tv) in spans]


@pytest.mark.parametrize("density", [0.2, 0.6])
def test_dare_kept_fraction_and_rescale(tiny_sources, density):
    pairs = _deltas(_single("dare_linear", tiny_sources, density, rescale=True), tiny_sources)
    kept = sum(int((d != 0).sum()) for d, _ in pairs)
    total = sum(d.numel() for d, _ in pairs)
    sigma = (density * (1 - density) / total) ** 0.5
    assert abs(kept / total - density) < 5 * sigma
    for delta, tv in pairs:
        # mergekit rescales the pruned task vector back to the L1 norm of the whole one
        torch.testing.assert_close(delta.abs().sum(), tv.abs().sum(), rtol=1e-4, atol=1e-6)
        mask = delta != 0
        scale = tv.abs().sum() / tv[mask].abs().sum()
        torch.testing.assert_close(delta, tv * mask * scale, rtol=1e-4, atol=1e-6)
    pairs = _deltas(_single("dare_linear", tiny_sources, density, rescale=False), tiny_sources)
    for delta, tv in pairs:
        mask = delta != 0
        torch.testing.assert_close(delta[mask], tv[mask], rtol=1e-5, atol=1e-7)


def test_random_draws_are_common_to_the_candidates_of_a_study(tiny_sources):
    """Masks depend only on (seed, source position, tensor): not on weights or on the other
    sources; a lower density keeps a subset of what a higher one keeps."""
    slot = tiny_sources.slots[3]

    def mask(seed, position, density):
        keep = sparsify.random(slot, 0, density, rng_key(seed, position, slot.name), True)
        return keep.mask_(torch.empty(slot.numel), 0).bool()

    low, high = mask(7, 0, 0.3), mask(7, 0, 0.6)
    assert bool((low <= high).all()) and int(low.sum()) < int(high.sum())
    assert torch.equal(low, mask(7, 0, 0.3))
    assert not torch.equal(low, mask(8, 0, 0.3)) and not torch.equal(low, mask(7, 1, 0.3))
    keep = sparsify.random(slot, 0, 0.3, rng_key(7, 0, slot.name), True)
    tv = slot.piece(0, 0, slot.numel)
    assert keep.kept_l1 == pytest.approx(float(tv[low].abs().sum()), rel=1e-6)

    one = _single("dare_ties", tiny_sources, 0.4)
    pattern = [d != 0 for d, _ in _deltas(one, tiny_sources)]
    groups = one.groups
    two = one.model_copy(
        update={
            "sources": ("a", "b"),
            "params": {
                "weight": ((0.3, 0.0),) * len(groups),
                "density": ((0.4, 0.9),) * len(groups),
            },
        }
    )
    again = [d != 0 for d, _ in _deltas(two, tiny_sources)]
    assert all(torch.equal(p, q) for p, q in zip(pattern, again, strict=True))


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_same_recipe_over_copied_models_builds_the_same_bits(method, tiny_llama, tmp_path):
    """The models in another folder (named by their paths, as a study names them) draw the
    same masks: a recipe scored on a cluster exports as the same model on a laptop."""
    built = []
    for folder in (None, tmp_path / "elsewhere"):
        models = (tiny_llama.base, *tiny_llama.sources)
        if folder is not None:
            models = tuple(shutil.copytree(m, folder / m.name) for m in models)
        sources = SourceSet.load(models[0], models[1:])
        recipe = recipe_for(
            method,
            sources,
            base=sources.base_name,
            sources=sources.names,
            fixed={"density": 0.5, "epsilon": 0.1},
        )
        built.append(ours(recipe, sources))
    assert built[0].keys() == built[1].keys()
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])


def test_sce_k_rounds_as_mergekit(tiny_sources, tiny_states):
    """mergekit computes k = int(count * select_topk) in float32; float64 keeps one element
    more where the product is just under an integer."""
    n = 64 * 32  # the MLP projections
    fraction = (1000 - 1e-5) / n
    assert int(n * fraction) == 999 and int(torch.tensor(n) * fraction) == 1000
    groups = tiny_sources.groups(1)
    params = {"select_topk": ((fraction,),) * len(groups)}
    recipe = recipe_for("sce", tiny_sources, granularity=1, params=params)
    assert_same(ours(recipe, tiny_sources), mergekit_merge(recipe, tiny_sources, tiny_states))


def test_della_keep_probability_rises_with_magnitude(tiny_sources):
    density, eps = 0.5, 0.2
    pairs = _deltas(_single("della", tiny_sources, density, rescale=False), tiny_sources)
    kept = top = bottom = n_top = n_bottom = 0
    for slot, (delta, tv) in zip(tiny_sources.slots, pairs, strict=True):
        rows = delta.view(slot.shape[0], -1) if len(slot.shape) == 2 else delta.view(1, -1)
        mags = tv.view_as(rows).abs()
        rank = mags.argsort(dim=1).argsort(dim=1)
        upper = rank >= rows.shape[1] / 2
        on = rows != 0
        kept += int(on.sum())
        top, n_top = top + int((on & upper).sum()), n_top + int(upper.sum())
        bottom, n_bottom = bottom + int((on & ~upper).sum()), n_bottom + int((~upper).sum())
    total = n_top + n_bottom
    assert abs(kept / total - density) < 5 * (0.25 / total) ** 0.5
    spread = top / n_top - bottom / n_bottom  # expected: epsilon (d+e/2 vs d-e/2)
    assert abs(spread - eps) < 5 * (0.5 / min(n_top, n_bottom)) ** 0.5


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def test_random_draws_are_a_keyed_hash_of_the_index():
    """Same values as a pure-Python hash (int32 products wrap), whatever the chunking."""
    key = rng_key(3, 1, "model.layers.0.mlp.up_proj.weight")
    cpu = torch.device("cpu")
    u = uniform16(key, 0, 5001, cpu)
    for i in (0, 1, 17, 4999, 5000):
        h = _lowbias32(((i // 2 + key[1]) & 0xFFFFFFFF) ^ (key[0] & 0xFFFFFFFF))
        half = (h >> (16 * (i % 2))) & 0xFFFF
        assert int(u[i]) == half - (1 << 16 if half >= 1 << 15 else 0)
    for cut in (1, 1234, 1235):
        parts = torch.cat([uniform16(key, 0, cut, cpu), uniform16(key, cut, 5001, cpu)])
        assert torch.equal(u, parts)
    n = 200_000
    for p in (0.1, 0.5, 0.93):
        frac = float(bernoulli(key, 0, p, torch.empty(n)).mean())
        assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert bool(bernoulli(key, 0, 1 - 1e-9, torch.empty(n)).bool().all())
    assert not bool(bernoulli(key, 0, 0.0, torch.empty(n)).bool().any())
    draws = uniform16(key, 7, 7 + n, cpu)  # kept: the draws below 65536 p - 32768
    assert torch.equal(bernoulli(key, 7, 0.3, torch.empty(n)).bool(), draws < 19661 - 32768)


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed-shapes"])
@pytest.mark.parametrize("kind", ["normal", "quantized", "half_zero"])
def test_top_k_is_exact(kind, fixed, monkeypatch):
    """Exactly k kept, the k largest magnitudes, ties broken by position; exact L1. Also
    the way a GPU selects: shapes the host knows, thresholds left on the device."""
    if fixed:
        monkeypatch.setattr(kernels, "DYNAMIC_SHAPES", frozenset())
    monkeypatch.setattr(kernels, "SCAN", 1 << 12)  # scans of many steps: ties across them
    gen = torch.Generator().manual_seed(1)
    for n in (1, 7, 1000, 50_000):
        x = torch.randn(n, generator=gen)
        if kind == "quantized":
            x = (x * 4).round() / 4
        if kind == "half_zero":
            x[: n // 2] = 0
        grid = MagnitudeGrid.of(x[None])
        order = torch.sort(x.abs(), descending=True, stable=True).indices
        for density in (1e-4, 0.1, 0.5, 0.999):
            k = max(1, int(density * n))
            sel = top_k(Pieces(lambda a, b, x=x: x[a:b], n, x.device), k, grid, 0, True)
            kept = sel.mask_(x.abs(), 0).bool()
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(kept, expected)
            l1 = float(x.abs()[expected].double().sum())
            assert float(sel.kept_l1) == pytest.approx(l1, abs=1e-9)


@pytest.mark.parametrize("kind", ["normal", "quantized", "half_zero"])
def test_top_k_on_device_is_exact(kind, monkeypatch):
    """The radix select SCE uses (k on the device): exactly k kept, the k largest, ties by
    position, k = 0 keeps none."""
    monkeypatch.setattr(kernels, "SCAN", 1 << 12)  # many steps: ties across them
    gen = torch.Generator().manual_seed(2)
    for n in (1, 7, 1000, 50_000):
        x = torch.randn(n, generator=gen).square()
        if kind == "quantized":
            x = (x * 4).round() / 4
        if kind == "half_zero":
            x[: n // 2] = 0
        order = torch.sort(x, descending=True, stable=True).indices
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            sel = top_k_on_device(x, torch.tensor(k))
            expected = torch.zeros(n, dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(sel.mask_(x.clone(), 0).bool(), expected), (n, k)


# --- the registry ----------------------------------------------------------------------

NO_EFFECT = {  # mergekit parameters that do nothing for these methods
    "task_arithmetic": {"density", "rescale", "int8_mask"},
    "dare_linear": {"int8_mask"},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declarations_match_mergekit(name):
    """Same parameter names, scopes and defaults (normalize, rescale, ...) as mergekit."""
    ours_ = get_method(name)
    theirs = {p.name: p for p in mk.get(name).spec.parameters}
    declared = {p.name for p in ours_.params} | {o.name for o in ours_.options}
    assert set(theirs) - declared == NO_EFFECT.get(name, set())
    for p in ours_.params:
        spec = theirs[p.name]
        assert p.per_source == (spec.scope is not ParameterScope.SHARED)
        assert (p.default is None) == (spec.default is MISSING)
        if p.default is not None:
            assert p.default == spec.default
        if p.default is not None:
            assert p.low <= p.default <= p.high
        assert p.low <= p.search[0] < p.search[1] <= p.high
    for o in ours_.options:
        assert o.default == theirs[o.name].default


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown merge method 'tie'.*ties"):
        get_method("tie")
    assert method_params("slerp")[0].name == "t"
    assert {p.name for p in method_params("della")} == {"weight", "density", "epsilon"}
