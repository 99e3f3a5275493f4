"""The one description of a candidate merge.

A `Recipe` is data, not code: building, storing, exporting, comparing and showing a candidate
all go through it. Its JSON is lossless (floats are written with `repr` precision by the json
module) and its hash is stable, so the same recipe always names the same tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Special layer groups; decoder layers are named "layers.<a>" or "layers.<a>-<b>" (inclusive).
EMBED, NORM, LM_HEAD = "embed", "norm", "lm_head"
# The methods of a data-flow-only and a mixture-only recipe, and the name a route or a mixture
# gives the recipe's own weight merge (PS+DFS, a merged cluster among mixed ones).
DATAFLOW, MIXTURE, MERGED = "dataflow", "mixture", "@merge"


def layer_group_names(num_layers: int, granularity: int = 1) -> tuple[str, ...]:
    """Group names for a model of `num_layers` decoder layers, `granularity` layers a group."""
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    names = [EMBED]
    for start in range(0, num_layers, granularity):
        end = min(start + granularity, num_layers) - 1
        names.append(f"layers.{start}" if start == end else f"layers.{start}-{end}")
    return (*names, NORM, LM_HEAD)


def group_of_layer(layer: int, num_layers: int, granularity: int) -> str:
    """The group name that decoder layer `layer` belongs to."""
    start = (layer // granularity) * granularity
    end = min(start + granularity, num_layers) - 1
    return f"layers.{start}" if start == end else f"layers.{start}-{end}"


class DataFlow(BaseModel):
    """A data-flow-space path: the layers a token passes through and the scale of each hop.

    `path` holds (model index, layer index) pairs; `scales[i]` multiplies the input of hop i.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[str, ...]
    path: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]

    @model_validator(mode="after")
    def _check(self) -> DataFlow:
        if not self.path:
            raise ValueError("dataflow.path is empty")
        if len(self.scales) != len(self.path):
            raise ValueError(
                f"dataflow.scales has {len(self.scales)} entries for {len(self.path)} hops"
            )
        for m, layer in self.path:
            if not 0 <= m < len(self.models):
                raise ValueError(f"dataflow.path names model {m}; only {len(self.models)} given")
            if layer < 0:
                raise ValueError(f"dataflow.path names layer {layer}; layers count from 0")
        bad = [s for s in self.scales if not math.isfinite(s)]
        if bad:
            raise ValueError(f"dataflow.scales are not finite: {bad}")
        return self


class Mixture(BaseModel):
    """A model-level mixture (Model-GLUE): whole models behind a router.

    The router reads expert 0's hidden state after `layer` decoder layers, pooled over a
    sequence (`mean`, `first` or `last` token); each expert's gate is that state averaged over
    its `prompts`, then, with `train_steps`, trained (router only) to send each prompt to its
    expert. A sequence goes to its `top_k` experts by cosine similarity / `temperature`,
    softmax, renormalised (evomerge.glue.mixture).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    experts: tuple[str, ...]
    layer: int = Field(ge=0)
    pooling: Literal["mean", "first", "last"] = "mean"
    top_k: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    prompts: tuple[tuple[str, ...], ...]
    train_steps: int = Field(0, ge=0)
    train_lr: float = Field(0.05, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> Mixture:
        if len(self.experts) < 2 or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"mixture.experts: two or more distinct models, got {self.experts}")
        if len(self.prompts) != len(self.experts):
            raise ValueError(
                f"mixture.prompts has {len(self.prompts)} lists for {len(self.experts)} experts"
            )
        empty = [e for e, p in zip(self.experts, self.prompts, strict=True) if not p]
        if empty:
            raise ValueError(f"mixture.prompts: no prompt forms the gate of {empty}")
        return self


class Recipe(BaseModel):
    """Method, models, per-group parameters, dtype and every seed of one candidate.

    `params[name][g]` is the value list of parameter `name` in layer group `groups[g]`: one
    value per source for per-source parameters (weight, density, ...), one value for shared
    ones (slerp's t). `options` are the method's scalar switches (normalize, lambda, ...).

    `dataflow` routes tokens through layers of several models. With `method: dataflow` the
    route's models are the sources and nothing is merged; with a merge method (PS+DFS) the
    route's model A is `@merge`, the weight merge the rest of the recipe describes.
    `mixture` puts whole models behind a router, the same way: `method: mixture` mixes its
    sources; with a merge method, expert 0 is `@merge`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    base: str | None = None
    sources: tuple[str, ...]
    groups: tuple[str, ...]
    params: dict[str, tuple[tuple[float, ...], ...]] = Field(default_factory=dict)
    options: dict[str, float | bool] = Field(default_factory=dict)
    dtype: str = "float32"
    seed: int = 0
    dataflow: DataFlow | None = None
    mixture: Mixture | None = None

    @field_validator("sources")
    @classmethod
    def _sources_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"sources repeat a model: {list(v)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype_known(cls, v: str) -> str:
        if v not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {v!r}")
        return v

    @model_validator(mode="after")
    def _dataflow(self) -> Recipe:
        flow = self.dataflow
        if self.method == DATAFLOW:
            if flow is None:
                raise ValueError("dataflow: a dataflow recipe needs its route")
            if flow.models != self.sources or self.params or self.groups:
                raise ValueError("dataflow: routes its sources and has no merge parameters")
        elif flow is not None and (flow.models[0] != MERGED or MERGED in flow.models[1:]):
            raise ValueError(f"dataflow.models: a PS+DFS route starts at {MERGED!r} (model A)")
        mix = self.mixture
        if self.method == MIXTURE:
            if mix is None or flow is not None:
                raise ValueError("mixture: a mixture recipe needs its router, and no route")
            if mix.experts != self.sources or self.params or self.groups:
                raise ValueError("mixture: mixes its sources and has no merge parameters")
        elif mix is not None and (
            flow is not None or mix.experts[0] != MERGED or MERGED in mix.experts[1:]
        ):
            raise ValueError(f"mixture.experts: a merge's mixture starts at {MERGED!r}, no route")
        return self

    def merge_part(self) -> Recipe:
        """The weight merge alone (a PS+DFS route's model A, a mixture's expert 0)."""
        return self.model_copy(update={"dataflow": None, "mixture": None})

    @model_validator(mode="after")
    def _shapes(self) -> Recipe:
        for name, per_group in self.params.items():
            if len(per_group) != len(self.groups):
                raise ValueError(
                    f"params.{name} has {len(per_group)} groups, recipe has {len(self.groups)}"
                )
            for g, values in zip(self.groups, per_group, strict=True):
                if len(values) not in (1, len(self.sources)):
                    raise ValueError(
                        f"params.{name}[{g}] has {len(values)} values; expected 1 or "
                        f"{len(self.sources)} (one per source)"
                    )
                bad = [v for v in values if not math.isfinite(v)]
                if bad:
                    raise ValueError(f"params.{name}[{g}] is not finite: {bad}")
        return self

    def value(self, name: str, group: str, source: int | None = None) -> float:
        """One parameter value; shared parameters ignore `source`."""
        values = self.params[name][self.groups.index(group)]
        return values[0] if len(values) == 1 or source is None else values[source]

    def to_json(self) -> str:
        """Canonical, lossless JSON (sorted keys, no spaces): the stored form. A recipe without
        a mixture leaves the field out, so recipes stored before mixtures existed keep their
        hash."""
        data = self.model_dump(mode="json", exclude={"mixture"} if self.mixture is None else None)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Recipe:
        return cls.model_validate_json(text)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe JSON file, naming the file in the error."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe file not found: {p}")
        try:
            return cls.from_json(p.read_text())
        except ValueError as e:
            raise ValueError(f"{p}: not a valid recipe: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(json.loads(self.to_json()), indent=2) + "\n")

    @property
    def hash(self) -> str:
        """Stable short identity: sha256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """Per-parameter means over groups, per source, and a route's hops (A0 A1 B3 ...):
        a compact view for tables."""
        out: dict[str, Any] = {"method": self.method, "hash": self.hash}
        if self.dataflow is not None:
            out["path"] = " ".join(
                f"{'AB'[m] if m < 2 else m}{layer}" for m, layer in self.dataflow.path
            )
        if self.mixture is not None:
            mix = self.mixture
            out["experts"] = list(mix.experts)
            out["router"] = f"layer {mix.layer} {mix.pooling} top-{mix.top_k}"
        for name, per_group in self.params.items():
            width = max(len(v) for v in per_group)
            out[name] = [
                round(sum(v[min(i, len(v) - 1)] for v in per_group) / len(per_group), 4)
                for i in range(width)
            ]
        return out
