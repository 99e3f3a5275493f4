"""Study configuration: one validated, frozen `StudyConfig` read from YAML.

Every field a user may get wrong is checked here, before anything is written: a bad config
is a `ConfigError` whose message names the field (the CLI exits with code 2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The toy zoos (`evomerge.zoo`): two families at two sizes, and the cross-skill zoo.
ZooSize = Literal["demo", "test", "cross"]
# The largest count the store's integer columns (and Ray's and Optuna's counters) hold.
MAX_COUNT = 2**31 - 1


def anchor(ref: str, folder: Path) -> str:
    """A model or task ref as given, or, when it is a relative path, made absolute against
    `folder` (the folder of the config file that names it)."""
    if ref.startswith("zoo:") or Path(ref).is_absolute():
        return ref
    return str((folder / ref).resolve())


EVAL_BATCH = 128  # sequences scored per forward pass, unless fitness.batch_size says
# A chain's later studies are named after its first: NAME + suffix.
DFS_STAGE, EVOLVE_STAGE, MIX_STAGE = "-dfs", "-evolve", "-mix"
STAGES = (DFS_STAGE, EVOLVE_STAGE, MIX_STAGE)  # the names a chain's later stage runs under
# The fields each stage builder (dataflow_stage, evolve_stage, mixture_stage) sets.
_STAGE_CHANGES = {
    DFS_STAGE: {"name", "dataflow", "budget"},
    EVOLVE_STAGE: {"name", "search", "optimizer", "budget"},
    MIX_STAGE: {"name", "mixture", "optimizer", "budget"},
}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and field."""


Model = TypeVar("Model", bound=BaseModel)


def read_config(path: Path) -> str:
    """A config file's text; a missing or non-UTF-8 file is a `ConfigError` naming it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e


def parse_config(cls: type[Model], text: str, source: str, what: str, **overrides: object) -> Model:
    """YAML `text` validated as `cls` (a `what` config, in messages); every problem becomes
    one `ConfigError` naming the field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        kind = _kind_of(data)
        if kind is not None and kind != what:
            raise ConfigError(
                f"{source}: a {kind} config, not a {what} one: "
                f"run it with `evomerge {CONFIG_COMMANDS[kind]} {source}`"
            ) from e
        raise ConfigError(f"{source}: invalid {what} config\n{field_errors(e)}") from e


# Each kind of config and the command that runs it: a file given to the wrong command is
# named as what it is, not as a list of fields that command does not know.
CONFIG_COMMANDS = {"study": "run", "glue": "glue", "fusion": "fuse"}


def _kind_of(data: dict) -> str | None:
    """The one kind of config whose fields hold every top-level key of `data`, if any."""
    from evomerge.fusion.job import FusionConfig  # they build on this module
    from evomerge.glue.pipeline import GlueConfig

    kinds = {"study": StudyConfig, "glue": GlueConfig, "fusion": FusionConfig}
    fits = [kind for kind, model in kinds.items() if set(data) <= set(model.model_fields)]
    return fits[0] if len(fits) == 1 else None


def field_errors(e: ValidationError) -> str:
    """One line per problem, each naming its field: pydantic's own text adds links and
    input dumps a user does not need."""
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Bounds(_Frozen):
    """Search range of one merge parameter; `init` is CMA-ES's start (default: the middle)."""

    low: float
    high: float
    init: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} is outside [{self.low}, {self.high}]")
        return self


class TaskRef(_Frozen):
    """One proxy task of the fitness, with its weight in the weighted mean."""

    task: str
    weight: float = Field(1.0, gt=0)


class FitnessConfig(_Frozen):
    tasks: tuple[TaskRef, ...] = Field(min_length=1)
    limit: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="examples per task on the search split"
    )
    heldout_limit: int | None = Field(None, gt=0, le=MAX_COUNT)
    batch_size: int = Field(
        EVAL_BATCH,
        gt=0,
        le=MAX_COUNT,
        description="sequences a worker scores per forward pass; after an out-of-memory it "
        "retries at half and keeps the half for its later trials",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _bare_names(cls, v: object) -> object:
        """Allow `tasks: [zoo:arith, zoo:reverse]` as well as the long form."""
        if isinstance(v, list):
            return [{"task": t} if isinstance(t, str) else t for t in v]
        return v


class OptimizerConfig(_Frozen):
    """CMA-ES settings, the defaults the paper's (Akiba et al. 2024); or, with `kind`, one of
    Model-GLUE's heuristic selections (evomerge.glue.selection) instead of CMA-ES."""

    kind: Literal["cmaes", "average", "coefficient", "similarity"] = Field(
        "cmaes",
        description="cmaes; or average / coefficient / similarity: Model-GLUE's heuristic "
        "selection of which sources to merge (searches `weight`, one value per source)",
    )
    order: Literal["highest", "lowest"] = Field(
        "highest", description="similarity: take next the source most or least like the merge"
    )
    scale: float = Field(
        1.0,
        gt=0,
        description="selection: the sum of the kept sources' weights (1: the plain average of "
        "the models; task arithmetic of fine-tunes often wants ~0.8 a source)",
    )
    evolve: int | None = Field(
        None,
        gt=0,
        le=MAX_COUNT,
        description="after a selection: trials of CMA-ES over per-source weights, starting "
        "from the selection's, where a weight below 0 leaves its source out (study NAME-evolve)",
    )
    start: tuple[float, ...] | None = Field(
        None, description="set by evomerge: the selection's weights, where CMA-ES starts"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="CMA-ES's random seed")
    population: int | None = Field(
        None,
        ge=4,  # below 4, CMA-ES's rank-mu update has no weight and divides by zero
        le=MAX_COUNT,
        description="default 4 + floor(3 ln n)",
    )
    sigma0: float | None = Field(None, gt=0, description="default 1/6 of each range")


class BudgetConfig(_Frozen):
    trials: int = Field(100, gt=0, le=MAX_COUNT, description="COMPLETE trials to reach")
    wall_time_s: float | None = Field(
        None, gt=0, description="seconds the study may search, over all its runs"
    )
    target_fitness: float | None = None
    heldout_top_k: int = Field(
        3, ge=0, le=MAX_COUNT, description="best recipes re-scored on held-out data"
    )
    max_consecutive_failures: int = Field(20, gt=0, le=MAX_COUNT)


class WorkersConfig(_Frozen):
    count: int = Field(1, gt=0, le=MAX_COUNT)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    torch_threads: int | None = Field(None, gt=0)
    ray_address: str | None = None
    queue: int = Field(
        1,
        ge=1,
        le=4,
        description="trials queued per worker: 2 hides the coordinator's ~0.1 s of work per "
        "trial when trials take well under a second, but CMA-ES then asks up to twice as many "
        "trials of a generation ahead, and the ones beyond its population are not learned from",
    )
    sources: Literal["device", "host", "auto"] = Field(
        "auto",
        description="where a worker keeps the sources: `device` (on its GPU or in its own "
        "memory, checkpoint dtype), `host` (mapped from the files, one copy per node, streamed "
        "per build) or `auto` (device when it fits; `evomerge plan` shows the numbers)",
    )
    memory_gb: float | None = Field(
        None, gt=0, description="memory a worker may plan for (default: what its device has free)"
    )


class HeartbeatConfig(_Frozen):
    """A run writes a heartbeat every `interval_s`; one silent for `stale_after_s` is dead."""

    interval_s: float = Field(2.0, gt=0)
    stale_after_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> HeartbeatConfig:
        if self.stale_after_s <= self.interval_s:
            raise ValueError("stale_after_s must exceed interval_s")
        return self


DATAFLOW = "dataflow"  # the `method` of a data-flow-space study (no weight merging)


class DataFlowConfig(_Frozen):
    """Data-flow-space search (Akiba et al. 2024, section 3.2): the route of a token through
    the layers of two models A and B, with a scale on each hop.

    `method: dataflow` routes between `sources` [A, B]. A parameter-space study with `b` set
    is PS+DFS: when it finishes, stage 2 (the study `<name>-dfs`) routes between its best
    merge (A) and the source `b`.
    """

    b: str | None = Field(None, description="PS+DFS: the source routed with stage 1's best merge")
    repeats: int = Field(3, gt=0, description="r: the layers of A then B, repeated r times")
    scales: Literal["matrix", "pair", "hop"] = Field(
        "matrix",
        description="matrix: W[i, j] per pair of layers (the paper's M x M); pair: one scale "
        "per (model, model) hop kind; hop: one per indicator position",
    )
    scale: Bounds = Bounds(low=0.0, high=2.0, init=1.0)
    start: Literal["a", "b"] = Field(
        "a",
        description="the route CMA-ES starts from: a, A's own layers (the paper's); b, B's "
        "layers between A's first and last (when A brings the vocabulary, B the skill)",
    )
    trials: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="stage 2's budget (default: budget's)"
    )
    merge: str | None = Field(None, description="set by evomerge: stage 1's best recipe (JSON)")


MIXTURE = "mixture"  # the `method` of a model-level mixture study (no weight merging)


class MixtureSettings(_Frozen):
    """Model-GLUE's model-level mixture: whole models behind a router formed from prompts.

    `method: mixture` mixes `sources`. A merge study with `others` set is merge+mix: when it
    (and its evolve stage) finishes, the study `<name>-mix` mixes its best merge with
    `others`. Each expert's gate comes from the search prompts of its `prompts` tasks.
    Candidates are every router `layers` x `pooling` pair, scored once each.
    """

    others: tuple[str, ...] = Field(
        (), description="merge+mix: the models mixed with the study's best merge"
    )
    prompts: tuple[tuple[str, ...], ...] = Field(
        description="per expert (the sources; or the merge, then `others`): the tasks whose "
        "search-split prompts form its gate",
    )
    prompts_per_task: int = Field(8, gt=0, le=1024)
    layers: tuple[int, ...] | None = Field(
        None,
        description="router layers tried (hidden state after that many layers of expert "
        "0); default every layer from 1 to the last",
    )
    pooling: tuple[Literal["mean", "first", "last"], ...] = Field(("mean", "last"), min_length=1)
    top_k: int = Field(1, gt=0)
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    train_steps: int = Field(
        0, ge=0, le=100_000, description="router-only training on the gate prompts (0: none)"
    )
    train_lr: float = Field(0.05, gt=0, allow_inf_nan=False)
    merge: str | None = Field(None, description="set by evomerge: the merge stage's best recipe")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (not v or min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError(f"distinct layer numbers from 0, got {v}")
        return v


class StudyConfig(_Frozen):
    """Everything one search needs. Model refs are folders or `zoo:NAME` (see `zoo`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100)
    zoo: ZooSize | None = Field(None, description="toy zoo for zoo: refs")
    method: str
    base: str | None = Field(
        None, validate_default=True, description="the shared ancestor (not used by dataflow)"
    )
    sources: tuple[str, ...] = Field(min_length=1)
    granularity: int = Field(1, gt=0, description="decoder layers per layer group")
    search: dict[str, Bounds] = Field(default_factory=dict, validate_default=True)
    dataflow: DataFlowConfig | None = None
    mixture: MixtureSettings | None = None
    fixed: dict[str, float | tuple[float, ...]] = Field(default_factory=dict)
    options: dict[str, float | bool] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = Field(0, description="seed of every random draw in a recipe (DARE masks)")
    fitness: FitnessConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    budget: BudgetConfig = BudgetConfig()
    workers: WorkersConfig = WorkersConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    storage: str | None = None

    @field_validator("name")
    @classmethod
    def _not_dots(cls, v: str) -> str:
        """A name "." or ".." is no folder of its own, and a browser drops it from a URL."""
        if not v.strip("."):
            raise ValueError(f"{v!r} is only dots; a study name needs a letter, digit, _ or -")
        return v

    @field_validator("base")
    @classmethod
    def _base_when_merging(cls, v: str | None, info: ValidationInfo) -> str | None:
        method = info.data.get("method")
        if v is None and method not in (None, DATAFLOW, MIXTURE):
            raise ValueError(f"{method} merges against a base model; name one")
        return v

    @field_validator("sources")
    @classmethod
    def _two_routed(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("method") == DATAFLOW and len(v) != 2:
            raise ValueError("dataflow routes between exactly two models [A, B]")
        return v

    @field_validator("search")
    @classmethod
    def _searched(cls, v: dict[str, Bounds], info: ValidationInfo) -> dict[str, Bounds]:
        method = info.data.get("method")
        unmerged = method in (DATAFLOW, MIXTURE)
        if unmerged and v:
            raise ValueError(f"{method} has no merge parameters to search")
        if not unmerged and not v:
            raise ValueError("name at least one merge parameter to search")
        return v

    @model_validator(mode="before")
    @classmethod
    def _dataflow_defaults(cls, data: object) -> object:
        """`method: dataflow` with no `dataflow:` section takes the paper's settings."""
        if isinstance(data, dict) and data.get("method") == DATAFLOW and not data.get("dataflow"):
            return {**data, "dataflow": {}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources repeat a model: {list(self.sources)}")
        if self.method == DATAFLOW:
            if self.fixed:
                raise ValueError("fixed: dataflow has no merge parameters")
            if self.dataflow is None or self.dataflow.b is not None:
                raise ValueError("dataflow.b: only for PS+DFS; dataflow routes between sources")
        elif self.dataflow is not None and self.dataflow.b is None:
            raise ValueError("dataflow.b: name the source that stage 2 routes with the merge")
        self._check_mixture()
        both = set(self.search) & set(self.fixed)
        if both:
            raise ValueError(f"parameters both searched and fixed: {sorted(both)}")
        for name, value in self.fixed.items():
            if isinstance(value, tuple) and len(value) != len(self.sources):
                raise ValueError(
                    f"fixed.{name} has {len(value)} values for {len(self.sources)} sources"
                )
        if self.optimizer.kind != "cmaes":
            self._check_selection()
        elif self.optimizer.evolve is not None:
            raise ValueError("optimizer.evolve: follows a selection (kind average or coefficient)")
        elif self.optimizer.start is not None and (
            set(self.search) != {"weight"} or len(self.optimizer.start) != len(self.sources)
        ):
            raise ValueError("optimizer.start: one weight a source, and only `weight` searched")
        return self

    def _check_mixture(self) -> None:
        mix = self.mixture
        if self.method == MIXTURE:
            if mix is None or mix.others or mix.merge is not None:
                raise ValueError("mixture: a mixture study mixes its sources; give `prompts`")
            if self.fixed or self.dataflow is not None:
                raise ValueError("mixture: no merge parameters and no route")
            experts = len(self.sources)
        elif mix is None:
            return
        else:
            if not mix.others:
                raise ValueError("mixture.others: name the models mixed with the best merge")
            if self.dataflow is not None:
                raise ValueError("mixture: a study routes (dataflow) or mixes, not both")
            experts = 1 + len(mix.others)
        if len(mix.prompts) != experts:
            raise ValueError(
                f"mixture.prompts: {len(mix.prompts)} task lists for {experts} experts "
                "(one list per expert: the sources, or the merge then `others`)"
            )
        empty = [i for i, tasks in enumerate(mix.prompts) if not tasks]
        if empty:
            raise ValueError(f"mixture.prompts: expert {empty[0]} has no task to form its gate")

    @property
    def is_mixture(self) -> bool:
        """Whether this study searches a mixture's router (`method: mixture`, or the mix stage
        of merge+mix), not weights."""
        return self.method == MIXTURE or (
            self.mixture is not None and self.mixture.merge is not None
        )

    @property
    def mix_next(self) -> bool:
        """Whether a mixture stage follows this study (merge+mix, after any evolve stage)."""
        return self.mixture is not None and not self.is_mixture and not self.evolve_next

    def mixture_stage(self, merge_json: str, layers: int) -> StudyConfig:
        """The study `<name>-mix`: mixes `merge_json`'s model (of `layers` decoder layers) with
        `mixture.others`, one trial per router candidate."""
        assert self.mixture is not None
        tried = self.mixture.layers or tuple(range(1, layers + 1))
        mixture = self.mixture.model_copy(update={"merge": merge_json, "layers": tried})
        trials = len(tried) * len(mixture.pooling)
        return self.model_copy(
            update={
                "name": self.name + MIX_STAGE,
                "mixture": mixture,
                "optimizer": OptimizerConfig(seed=self.optimizer.seed),
                "budget": self.budget.model_copy(update={"trials": trials}),
            }
        )

    @property
    def evolve_next(self) -> bool:
        """Whether an evolutionary stage follows this study (a selection with `evolve`)."""
        return self.optimizer.kind != "cmaes" and self.optimizer.evolve is not None

    def evolve_stage(self, weights: tuple[float, ...]) -> StudyConfig:
        """Model-GLUE's evolutionary selection, warm-started: the study `<name>-evolve`,
        CMA-ES over per-source weights starting at `weights` (a selection's result); a weight
        below 0 leaves its source out, so the range gains an off zone below 0."""
        assert self.optimizer.evolve is not None
        high = self.search["weight"].high
        return self.model_copy(
            update={
                "name": self.name + EVOLVE_STAGE,
                "search": {"weight": Bounds(low=-high / 4, high=high)},
                "optimizer": self.optimizer.model_copy(
                    update={"kind": "cmaes", "evolve": None, "start": tuple(weights)}
                ),
                "budget": self.budget.model_copy(update={"trials": self.optimizer.evolve}),
            }
        )

    def _check_selection(self) -> None:
        kind = self.optimizer.kind
        if self.optimizer.start is not None:
            raise ValueError("optimizer.start: set by evomerge for the evolve stage only")
        if self.is_dataflow or self.dataflow is not None:
            raise ValueError(f"optimizer.kind: {kind} selects merge weights, not routes")
        if set(self.search) != {"weight"}:
            raise ValueError(
                f"search: {kind} selection searches `weight` only, got {sorted(self.search)}"
            )
        w, top = self.search["weight"], max(1.0, self.optimizer.scale)
        if w.low > 0 or w.high < top:
            raise ValueError(
                f"search.weight: {kind} selection needs a range holding [0, {top}] "
                "(1: a source alone; optimizer.scale: a merge's weights at most)"
            )
        if len(self.sources) < 2:
            raise ValueError(f"sources: {kind} selection chooses among two or more sources")

    @property
    def is_dataflow(self) -> bool:
        """Whether this study searches routes (DFS, or stage 2 of PS+DFS), not weights."""
        return self.method == DATAFLOW or (
            self.dataflow is not None and self.dataflow.merge is not None
        )

    @property
    def next_stage(self) -> bool:
        """Whether a DFS stage follows this study (stage 1 of PS+DFS)."""
        return self.dataflow is not None and self.dataflow.b is not None and not self.is_dataflow

    def dataflow_stage(self, merge_json: str) -> StudyConfig:
        """Stage 2 of PS+DFS: the study `<name>-dfs` routing `merge_json`'s model with b."""
        assert self.dataflow is not None
        flow = self.dataflow.model_copy(update={"merge": merge_json})
        trials = self.dataflow.trials or self.budget.trials
        return self.model_copy(
            update={
                "name": self.name + DFS_STAGE,
                "dataflow": flow,
                "budget": self.budget.model_copy(update={"trials": trials}),
            }
        )

    def later_stages(self) -> tuple[str, ...]:
        """The names this study's chain runs its later stages under (none for one study)."""
        names = []
        if self.next_stage:
            names.append(self.name + DFS_STAGE)
        if self.evolve_next:
            names.append(self.name + EVOLVE_STAGE)
            if self.mixture is not None:  # merge+mix after an evolutionary selection
                names.append(self.name + EVOLVE_STAGE + MIX_STAGE)
        if self.mix_next:
            names.append(self.name + MIX_STAGE)
        return tuple(names)

    def is_stage_of(self, parent: StudyConfig) -> bool:
        """Whether this study is the next stage of `parent`'s chain: a chain finds its stage
        by name, and must not take over an unrelated study that has that name. The stage
        holds what evomerge set (the merge it routes or mixes, the weights it starts from)
        and is otherwise `parent`, apart from the fields its stage builder changes (which
        are left out, so a stage stored by an earlier version still matches)."""
        made = {
            DFS_STAGE: parent.next_stage and self.dataflow is not None and self.dataflow.merge,
            EVOLVE_STAGE: parent.evolve_next and self.optimizer.start is not None,
            MIX_STAGE: parent.mix_next and self.mixture is not None and self.mixture.merge,
        }
        for suffix, changed in _STAGE_CHANGES.items():
            if self.name == parent.name + suffix:
                same = self.model_dump(exclude=changed) == parent.model_dump(exclude=changed)
                return bool(made[suffix]) and same
        return False

    def model_paths(self) -> dict[str, Path]:
        """Base, sources and dataflow.b resolved to folders (zoo refs against this study's
        zoo size). Raises FileNotFoundError naming the first missing model.
        """
        from evomerge.zoo import default_zoo_dir, resolve_model  # loads torch: only when needed

        zoo_dir = default_zoo_dir(self.zoo or "demo")
        b = self.dataflow.b if self.dataflow else None
        others = self.mixture.others if self.mixture else ()
        refs = [r for r in (self.base, *self.sources, b, *others) if r is not None]
        return {ref: resolve_model(ref, zoo_dir) for ref in refs}

    def to_yaml(self) -> str:
        """The snapshot stored with the study (resume rebuilds the config from it)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<config>", **overrides: object) -> StudyConfig:
        """Parse and validate; every problem becomes one `ConfigError` naming the field."""
        return parse_config(cls, text, source, "study", **overrides)

    @classmethod
    def load(cls, path: str | Path, **overrides: object) -> StudyConfig:
        """Read a config file; relative model and task paths are relative to the file."""
        p = Path(path)
        return cls.from_yaml(read_config(p), source=str(p), **overrides).anchored(p.parent)

    def anchored(self, folder: Path) -> StudyConfig:
        """Relative model and task paths made relative to `folder` (a config file's)."""

        def anchored(ref: str | None) -> str | None:
            return None if ref is None else anchor(ref, folder)

        tasks = tuple(t.model_copy(update={"task": anchored(t.task)}) for t in self.fitness.tasks)
        flow, mix = self.dataflow, self.mixture
        if flow is not None:
            flow = flow.model_copy(update={"b": anchored(flow.b)})
        if mix is not None:
            mix = mix.model_copy(
                update={
                    "others": tuple(anchored(o) for o in mix.others),
                    "prompts": tuple(tuple(anchored(t) for t in ts) for ts in mix.prompts),
                }
            )
        return self.model_copy(
            update={
                "base": anchored(self.base),
                "sources": tuple(anchored(s) for s in self.sources),
                "dataflow": flow,
                "mixture": mix,
                "fitness": self.fitness.model_copy(update={"tasks": tasks}),
            }
        )
