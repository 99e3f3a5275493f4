"""`build`: check a recipe against the loaded sources and its method, then merge in place.

Everything that can be wrong with a recipe is found by `resolve` before the first byte of
the candidate changes, and each error names the recipe field it is about.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from evomerge.merge.methods import get_method
from evomerge.merge.spec import BasePolicy, MergeMethod, TensorJob
from evomerge.models import DTYPES, SourceSet, TensorSlot
from evomerge.placement import release_heap
from evomerge.recipe import EMBED, LM_HEAD, NORM, Recipe

_LAYERS = re.compile(r"layers\.(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class Plan:
    """A recipe resolved against a SourceSet: rows, per-group values, options."""

    recipe: Recipe
    method: MergeMethod
    rows: tuple[int | None, ...]
    base_row: int | None
    group_of: dict[str | int, int]  # tensor part (special group or layer) -> group index
    values: tuple[dict[str, tuple[float, ...]], ...]  # per group
    options: dict[str, bool | float]

    def job(self, slot: TensorSlot, out: torch.Tensor) -> TensorJob:
        return TensorJob(
            slot=slot,
            rows=self.rows,
            base_row=self.base_row,
            values=self.values[self.group_of[slot.part]],
            options=self.options,
            seed=self.recipe.seed,
            out=out,
        )


def group_parts(groups: tuple[str, ...], num_layers: int) -> dict[str | int, int]:
    """Map each special group and decoder layer to its group's index; they must partition."""
    index: dict[str | int, int] = {}
    for g, name in enumerate(groups):
        if name in (EMBED, NORM, LM_HEAD):
            parts: list[str | int] = [name]
        elif m := _LAYERS.fullmatch(name):
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
            if last < first or last >= num_layers:
                raise ValueError(
                    f"recipe.groups: {name!r} is not a layer range of 0..{num_layers - 1}"
                )
            parts = list(range(first, last + 1))
        else:
            raise ValueError(f"recipe.groups: unknown group {name!r}")
        for part in parts:
            if part in index:
                raise ValueError(f"recipe.groups: {part!r} is in two groups")
            index[part] = g
    missing = [p for p in (EMBED, *range(num_layers), NORM, LM_HEAD) if p not in index]
    if missing:
        raise ValueError(f"recipe.groups: no group holds {missing}")
    return index


def _models(recipe: Recipe, sources: SourceSet, method: MergeMethod):
    def row(name: str, field: str) -> int | None:
        try:
            return sources.index(name)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None

    rows = tuple(row(s, "recipe.sources") for s in recipe.sources)
    k = len(rows)
    if k < method.min_sources or (method.max_sources is not None and k > method.max_sources):
        most = "" if method.max_sources is None else f" and at most {method.max_sources}"
        raise ValueError(
            f"recipe.sources: {method.name} takes at least {method.min_sources}{most} "
            f"source(s), got {k}"
        )
    base_row = None
    if method.base_policy is BasePolicy.TASK_VECTORS:
        if recipe.base != sources.base_name:
            raise ValueError(
                f"recipe.base: {method.name} merges task vectors against the loaded base "
                f"{sources.base_name!r}; got {recipe.base!r}"
            )
        if None in rows:
            raise ValueError(f"recipe.sources: the base {sources.base_name!r} is not a source")
    elif method.base_policy is BasePolicy.ENDPOINT:
        if recipe.base is None:
            raise ValueError(f"recipe.base: {method.name} needs a base model")
        base_row = row(recipe.base, "recipe.base")
        if base_row == rows[0]:
            raise ValueError(f"recipe.sources: {method.name} needs a source other than the base")
    return rows, base_row


def group_values(recipe: Recipe, method: MergeMethod, options) -> tuple[dict, ...]:
    """Per group: each parameter's values, defaults filled in and one-value lists broadcast."""
    specs = {p.name: p for p in method.params}
    unknown = sorted(set(recipe.params) - set(specs))
    if unknown:
        raise ValueError(
            f"recipe.params: {method.name} has no parameter(s) {unknown} "
            f"(its parameters: {sorted(specs) or 'none'})"
        )
    k = len(recipe.sources)
    out = []
    for g, group in enumerate(recipe.groups):
        values = {}
        for name, spec in specs.items():
            where = f"params.{name}[{group}]"
            if name in recipe.params:
                given = recipe.params[name][g]
            elif spec.default is not None:
                given = (spec.default,)
            else:
                raise ValueError(f"recipe.params: {method.name} needs {name!r}")
            if not spec.per_source and len(given) != 1:
                raise ValueError(f"{where}: {name} is shared by the sources; give one value")
            row = tuple(given) * k if spec.per_source and len(given) == 1 else tuple(given)
            for i, v in enumerate(row):
                spec.check(v, f"{where} ({recipe.sources[i]})" if spec.per_source else where)
            values[name] = row
        method.check_values(values, options, f"params[{group}]")
        out.append(values)
    return tuple(out)


def method_options(
    options: Mapping[str, bool | float], method: MergeMethod, where: str = "recipe.options"
) -> dict[str, bool | float]:
    """The method's options: `options` (a recipe's, or a study config's at `where`),
    checked, with the defaults for the rest."""
    specs = {o.name: o for o in method.options}
    unknown = sorted(set(options) - set(specs))
    if unknown:
        raise ValueError(
            f"{where}: {method.name} has no option(s) {unknown} "
            f"(its options: {sorted(specs) or 'none'})"
        )
    for name, value in options.items():
        specs[name].check(value, f"{where}.{name}")
    return {name: options.get(name, spec.default) for name, spec in specs.items()}


def resolve(recipe: Recipe, sources: SourceSet) -> Plan:
    """Check `recipe` against `sources` and its method; ValueError naming the bad field."""
    method = get_method(recipe.method)
    rows, base_row = _models(recipe, sources, method)
    group_of = group_parts(recipe.groups, sources.num_layers)
    options = method_options(recipe.options, method)
    values = group_values(recipe, method, options)
    return Plan(recipe, method, rows, base_row, group_of, values, options)


def _targets(recipe: Recipe, sources: SourceSet, into: torch.nn.Module) -> list[torch.Tensor]:
    """The flat storage of each merged tensor in `into`, checked before anything is written.

    Checked against the entries, never the slots: iterating those streams the weights (with
    the host placement on a GPU, a copy of every source to the device)."""
    params = dict(into.named_parameters(remove_duplicate=False))
    dtype = DTYPES[recipe.dtype]
    out = []
    for slot in sources.entries:
        p = params.get(slot.name)
        if p is None:
            raise ValueError(f"into: the model has no parameter {slot.name}")
        if p.shape != slot.shape:
            raise ValueError(f"into: {slot.name} is {list(p.shape)}, expected {list(slot.shape)}")
        if p.dtype != dtype:
            raise ValueError(f"into: {slot.name} is {p.dtype} but recipe.dtype is {recipe.dtype}")
        if p.device != sources.device:
            raise ValueError(f"into: {slot.name} is on {p.device}, the sources on {sources.device}")
        if not p.is_contiguous():
            raise ValueError(f"into: {slot.name} is not contiguous")
        out.append(p.detach().view(-1))
    return out


def build(recipe: Recipe, sources: SourceSet, into: torch.nn.Module) -> None:
    """Write the weights `recipe` describes into the resident model `into`, in place.

    No model-sized buffer is allocated and nothing touches disk; the same recipe writes the
    same bits on the same device, whatever the process or the candidate before it.
    """
    plan = resolve(recipe, sources)
    targets = _targets(recipe, sources, into)
    with torch.no_grad():
        for slot, out in zip(sources.slots, targets, strict=True):
            plan.method.merge(plan.job(slot, out))
    release_heap()  # the per-tensor float32 temporaries are dead: return their pages
