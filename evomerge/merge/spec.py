"""What a merge method declares (its parameters and options) and what it is handed per tensor.

The search space reads `MergeMethod.params` to build its distributions; `build` reads them to
validate a recipe before anything is written. Ranges are closed intervals; `search` is the
range a study searches when its config does not say otherwise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

import torch

from evomerge.models import TensorSlot


@dataclass(frozen=True)
class ParamSpec:
    """A numeric merge parameter; its value may differ per layer group (and per source)."""

    name: str
    per_source: bool
    default: float | None  # None: the recipe must give it
    low: float = -math.inf
    high: float = math.inf
    search: tuple[float, float] = (0.0, 1.0)
    doc: str = ""

    def check(self, value: float, where: str) -> None:
        if not self.low <= value <= self.high:
            raise ValueError(f"{where} = {value} is outside [{self.low}, {self.high}]")


@dataclass(frozen=True)
class OptionSpec:
    """A whole-model switch of a method (recipe.options): a bool, or a float like lambda."""

    name: str
    default: bool | float
    doc: str = ""

    def check(self, value: object, where: str) -> None:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(self.default, bool) != isinstance(value, bool) or (
            number and not math.isfinite(value)
        ):
            kind = "true or false" if isinstance(self.default, bool) else "a finite number"
            raise ValueError(f"{where}: must be {kind}, got {value!r}")


class BasePolicy(Enum):
    """How a method uses recipe.base."""

    TASK_VECTORS = "the SourceSet base; sources are merged as task vectors against it"
    IGNORED = "ignored; sources (which may name the base) are merged as whole models"
    ENDPOINT = "one endpoint (any loaded model); exactly one source is the other"


@dataclass(frozen=True, eq=False)
class TensorJob:
    """One tensor to merge: the slot, the recipe resolved for its group, and the output.

    `rows[i]` is the task-vector row of recipe source i (None: the base, a zero task vector);
    `values[name]` has one value per recipe source for per-source parameters, else one value.
    `out` is the flat destination (the candidate's parameter storage, any float dtype).
    """

    slot: TensorSlot
    rows: tuple[int | None, ...]
    base_row: int | None
    values: dict[str, tuple[float, ...]]
    options: dict[str, bool | float]
    seed: int
    out: torch.Tensor


class MergeMethod(ABC):
    """A registered merge method with mergekit's semantics for the same name."""

    name: str
    params: tuple[ParamSpec, ...] = ()
    options: tuple[OptionSpec, ...] = ()
    base_policy: BasePolicy = BasePolicy.TASK_VECTORS
    min_sources: int = 1
    max_sources: int | None = None
    deterministic: bool = True

    def check_values(  # noqa: B027  (most methods have no cross-parameter constraint)
        self, values: dict[str, tuple[float, ...]], options: dict[str, bool | float], where: str
    ) -> None:
        """Cross-parameter constraints of one group, beyond each parameter's own range."""

    @abstractmethod
    def merge(self, job: TensorJob) -> None:
        """Write the merged tensor of `job` into `job.out`."""
