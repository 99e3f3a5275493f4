"""The genome <-> Recipe mapping. Nothing else knows how a recipe is laid out for CMA-ES.

Parameter space (`SearchSpace`): each searched parameter becomes one Optuna
`FloatDistribution` per layer group (and per source, for per-source parameters such as a
source's weight). Data-flow space (`DataFlowSpace`): the paper's indicator array and scales.
Mixture space (`MixtureSpace`): a grid of router layers and poolings, each scored once.
Values are used as CMA-ES proposes them: Optuna maps the bounds linearly to [0, 1] and
CMA-ES repairs out-of-bound samples itself, so decoding needs no abs()/clamp that would fold
the landscape.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from evomerge.config import StudyConfig
from evomerge.merge import get_method
from evomerge.merge.build import method_options
from evomerge.recipe import DATAFLOW, MERGED, MIXTURE, DataFlow, Mixture, Recipe


class SearchSpace:
    """Optuna distributions for a study and the decoding of a trial's params into a Recipe."""

    def __init__(self, config: StudyConfig, groups: tuple[str, ...]) -> None:
        self.config = config
        self.groups = groups
        method = get_method(config.method)
        method_options(config.options, method, "options")
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

    @property
    def custom_start(self) -> bool:
        """Whether CMA-ES must start elsewhere than the middle of every range."""
        start = self.config.optimizer.start is not None
        return start or any(b.init is not None for b in self.config.search.values())

    def _keys(self, name: str) -> list[str]:
        """Optuna parameter names of one merge parameter, e.g. `weight/layers.0/zoo:arith`."""
        if self._specs[name].per_source:
            return [f"{name}/{g}/{s}" for g in self.groups for s in self.config.sources]
        return [f"{name}/{g}" for g in self.groups]

    @property
    def dim(self) -> int:
        return len(self.distributions)

    def initial_params(self) -> dict[str, float]:
        """CMA-ES's starting mean: an evolve stage's `optimizer.start`, else each range's
        `init`, else its middle (the paper's 0.5)."""
        if self.config.optimizer.start is not None:
            return self.genome_of_weights(self.config.optimizer.start)
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
                if name == "weight" and cfg.optimizer.start is not None:
                    flat = [max(w, 0.0) for w in flat]  # an evolve stage's off zone
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

    def source_weights(self, params: Mapping[str, float]) -> tuple[float, ...]:
        """Each source's `weight` in the first layer group (a selection sets every group
        alike)."""
        return tuple(params[f"weight/{self.groups[0]}/{s}"] for s in self.config.sources)

    def genome_of_weights(self, weights: tuple[float, ...]) -> dict[str, float]:
        """The genome that gives every layer group the same per-source `weight`s."""
        return {
            f"weight/{g}/{s}": w
            for g in self.groups
            for s, w in zip(self.config.sources, weights, strict=True)
        }

    def encode(self, recipe: Recipe) -> dict[str, float]:
        """The genome of a recipe (inverse of `decode` on the searched parameters)."""
        out = {}
        for name in self.config.search:
            keys = iter(self._keys(name))
            for row in recipe.params[name]:
                for v in row:
                    out[next(keys)] = v
        return out


class DataFlowSpace:
    """The paper's DFS genome (Akiba et al. 2024, 3.2) <-> a recipe's route.

    The M = L_A + L_B layers of A then B, repeated r times, make T = M * r candidate hops;
    indicator `in/t` > 0 puts hop t on the path. A's first and last layers always start and
    end it (added when the indicators leave them out). A hop's input is scaled by
    `scale/i-j` (matrix: previous layer i, this layer j, M x M), `scale/XY` (pair: previous
    model X, this model Y) or `scale/t` (hop: its indicator position); the first hop reads
    the embeddings unscaled.
    """

    def __init__(self, config: StudyConfig, layers_a: int, layers_b: int) -> None:
        assert config.dataflow is not None and config.is_dataflow
        self.config = config
        self.flow = config.dataflow
        self.layers_a, self.layers_b = layers_a, layers_b
        self.m = layers_a + layers_b
        self.t = self.m * self.flow.repeats
        if config.method == DATAFLOW:
            self.models = config.sources
            self.merge: Recipe | None = None
        else:
            assert self.flow.merge is not None and self.flow.b is not None
            self.models = (MERGED, self.flow.b)
            self.merge = Recipe.from_json(self.flow.merge).merge_part()
        scale = FloatDistribution(self.flow.scale.low, self.flow.scale.high)
        self.distributions: dict[str, FloatDistribution] = {
            f"in/{t}": FloatDistribution(-1.0, 1.0) for t in range(self.t)
        } | dict.fromkeys(self._scale_keys(), scale)

    def _scale_keys(self) -> list[str]:
        if self.flow.scales == "matrix":
            return [f"scale/{i}-{j}" for i in range(self.m) for j in range(self.m)]
        if self.flow.scales == "pair":
            return [f"scale/{x}{y}" for x in "AB" for y in "AB"]
        return [f"scale/{t}" for t in range(self.t)]

    @property
    def dim(self) -> int:
        return len(self.distributions)

    @property
    def custom_start(self) -> bool:
        return True

    def initial_params(self) -> dict[str, float]:
        """The start route: one model's layers likely in the first repetition (A's, the
        paper's; or B's, which `decode` puts between A's first and last), the rest unlikely."""
        init = self.flow.scale.init
        start = init if init is not None else (self.flow.scale.low + self.flow.scale.high) / 2
        first = range(self.layers_a) if self.flow.start == "a" else range(self.layers_a, self.m)
        return {f"in/{t}": 0.5 if t in first else -0.5 for t in range(self.t)} | dict.fromkeys(
            self._scale_keys(), start
        )

    def _layer(self, index: int) -> tuple[int, int]:
        """(model, layer) of position `index` in A's then B's layers."""
        return (0, index) if index < self.layers_a else (1, index - self.layers_a)

    def _scale(self, params: Mapping[str, float], prev: int, cur: int, t: int | None) -> float:
        mode = self.flow.scales
        if mode == "matrix":
            return float(params[f"scale/{prev}-{cur}"])
        if mode == "pair":
            x, y = ("AB"[self._layer(i)[0]] for i in (prev, cur))
            return float(params[f"scale/{x}{y}"])
        return 1.0 if t is None else float(params[f"scale/{t}"])

    def decode(self, params: Mapping[str, float]) -> Recipe:
        hops: list[tuple[int, int | None]] = [
            (t % self.m, t) for t in range(self.t) if params[f"in/{t}"] > 0
        ]
        if not hops or hops[0][0] != 0:
            hops.insert(0, (0, None))
        if hops[-1][0] != self.layers_a - 1:
            hops.append((self.layers_a - 1, None))
        scales = [1.0] + [
            self._scale(params, prev, cur, t) for (prev, _), (cur, t) in pairwise(hops)
        ]
        flow = DataFlow(
            models=self.models,
            path=tuple(self._layer(i) for i, _ in hops),
            scales=tuple(scales),
        )
        return _on_whole_models(self.config, self.merge, DATAFLOW, dataflow=flow)


class MixtureSpace:
    """A mixture's router candidates (Model-GLUE's model-level mixture): every router layer
    and pooling pair, scored once each (`candidates` in order; the coordinator enqueues them).

    The experts' gate prompts are read here, once, from their tasks' search splits, and travel
    in each recipe, so a recipe alone rebuilds its router.
    """

    def __init__(self, config: StudyConfig, layers: int, zoo_dir: Path | None) -> None:
        from evomerge.tasks import load_task  # reads task files: only when a study runs

        mix = config.mixture
        assert mix is not None and config.is_mixture
        self.config, self.settings = config, mix
        if config.method == MIXTURE:
            self.experts, self.merge = config.sources, None
        else:
            assert mix.merge is not None
            self.experts = (MERGED, *mix.others)
            self.merge = Recipe.from_json(mix.merge).merge_part()
        tried = mix.layers if mix.layers is not None else tuple(range(1, layers + 1))
        if max(tried) > layers:
            raise ValueError(f"mixture.layers: expert 0 has {layers} layers, got {max(tried)}")
        self.candidates = [
            {"router/layer": layer, "router/pooling": pooling}
            for layer in tried
            for pooling in mix.pooling
        ]
        self.distributions = {
            "router/layer": IntDistribution(min(tried), max(tried)),
            "router/pooling": CategoricalDistribution(mix.pooling),
        }
        self.prompts = tuple(
            tuple(
                row.get("prompt") or row["text"]
                for task in tasks
                for row in load_task(task, zoo_dir).rows("search", mix.prompts_per_task)
            )
            for tasks in mix.prompts
        )

    dim = 2
    custom_start = False

    def decode(self, params: Mapping[str, object]) -> Recipe:
        mix = self.settings
        mixture = Mixture(
            experts=self.experts,
            layer=int(params["router/layer"]),  # type: ignore[call-overload]
            pooling=params["router/pooling"],  # type: ignore[arg-type]
            top_k=mix.top_k,
            temperature=mix.temperature,
            prompts=self.prompts,
            train_steps=mix.train_steps,
            train_lr=mix.train_lr,
        )
        return _on_whole_models(self.config, self.merge, MIXTURE, mixture=mixture)


def _on_whole_models(
    config: StudyConfig, merge: Recipe | None, method: str, **part: DataFlow | Mixture
) -> Recipe:
    """A route or a mixture (`part`) over the study's best merge (PS+DFS, merge+mix), or
    over its sources, unmerged (`method`: dataflow or mixture)."""
    if merge is not None:
        return merge.model_copy(update=part)
    return Recipe(
        method=method,
        sources=config.sources,
        groups=(),
        dtype=config.dtype,
        seed=config.seed,
        **part,  # type: ignore[arg-type]
    )
