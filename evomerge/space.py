"""The genome <-> Recipe mapping. Nothing else knows how a recipe is laid out for CMA-ES.

Each searched parameter becomes one Optuna `FloatDistribution` per layer group (and per
source, for per-source parameters such as a source's weight). Values are used as CMA-ES
proposes them: Optuna maps the bounds linearly to [0, 1] and CMA-ES repairs out-of-bound
samples itself, so decoding needs no abs()/clamp that would fold the landscape.
"""

from __future__ import annotations

from collections.abc import Mapping

from optuna.distributions import FloatDistribution

from evomerge.config import StudyConfig
from evomerge.merge import get_method
from evomerge.recipe import Recipe


class SearchSpace:
    """Optuna distributions for a study and the decoding of a trial's params into a Recipe."""

    def __init__(self, config: StudyConfig, groups: tuple[str, ...]) -> None:
        self.config = config
        self.groups = groups
        method = get_method(config.method)
        self._specs = {p.name: p for p in method.params}
        for section, names in (("search", config.search), ("fixed", config.fixed)):
            for name in names:
                if name not in self._specs:
                    known = ", ".join(sorted(self._specs)) or "none"
                    raise ValueError(
                        f"{section}.{name}: method {config.method!r} has no parameter {name!r} "
                        f"(its parameters: {known})"
                    )
        for name, bounds in config.search.items():
            spec = self._specs[name]
            if bounds.low < spec.low or bounds.high > spec.high:
                raise ValueError(
                    f"search.{name}: [{bounds.low}, {bounds.high}] leaves the valid range "
                    f"[{spec.low}, {spec.high}] of {config.method}'s {name}"
                )
        missing = [
            n
            for n, s in self._specs.items()
            if s.default is None and n not in config.search and n not in config.fixed
        ]
        if missing:
            raise ValueError(f"search/fixed: {config.method} needs a value for {missing}")
        self.distributions: dict[str, FloatDistribution] = {
            key: FloatDistribution(bounds.low, bounds.high)
            for name, bounds in config.search.items()
            for key in self._keys(name)
        }

    def _keys(self, name: str) -> list[str]:
        """Optuna parameter names of one merge parameter, e.g. `weight/layers.0/zoo:arith`."""
        if self._specs[name].per_source:
            return [f"{name}/{g}/{s}" for g in self.groups for s in self.config.sources]
        return [f"{name}/{g}" for g in self.groups]

    @property
    def dim(self) -> int:
        return len(self.distributions)

    def initial_params(self) -> dict[str, float]:
        """CMA-ES's starting mean: each range's `init`, else its middle (the paper's 0.5)."""
        out = {}
        for name, bounds in self.config.search.items():
            init = bounds.init if bounds.init is not None else (bounds.low + bounds.high) / 2
            out.update(dict.fromkeys(self._keys(name), init))
        return out

    def decode(self, params: Mapping[str, float]) -> Recipe:
        """The recipe of one genome; unsearched parameters take their fixed or default value."""
        cfg = self.config
        n_src = len(cfg.sources)
        values: dict[str, tuple[tuple[float, ...], ...]] = {}
        for name, spec in self._specs.items():
            if name in cfg.search:
                flat = [float(params[k]) for k in self._keys(name)]
                width = n_src if spec.per_source else 1
                rows = [tuple(flat[i : i + width]) for i in range(0, len(flat), width)]
            else:
                fixed = cfg.fixed.get(name, spec.default)
                if isinstance(fixed, tuple):
                    row = tuple(float(v) for v in fixed)
                else:
                    row = (float(fixed),) * (n_src if spec.per_source else 1)
                rows = [row] * len(self.groups)
            values[name] = tuple(rows)
        return Recipe(
            method=cfg.method,
            base=cfg.base,
            sources=cfg.sources,
            groups=self.groups,
            params=values,
            options=dict(cfg.options),
            dtype=cfg.dtype,
            seed=cfg.seed,
        )

    def encode(self, recipe: Recipe) -> dict[str, float]:
        """The genome of a recipe (inverse of `decode` on the searched parameters)."""
        out = {}
        for name in self.config.search:
            keys = iter(self._keys(name))
            for row in recipe.params[name]:
                for v in row:
                    out[next(keys)] = v
        return out
