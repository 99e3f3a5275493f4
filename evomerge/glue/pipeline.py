"""Model-GLUE's recipe as one config: cluster a zoo, select and merge the base's family, mix
the merge with the experts of clusters that cannot merge, report every step on held-out.

The steps are ordinary studies that chain like PS+DFS (evomerge.cli.study): the selection
`NAME`, its evolutionary stage `NAME-evolve` (when `optimizer.evolve` is set) and the mixture
stage `...-mix`; the report reads their results from the store and scores what no study
holds (each model alone, the whole family merged), so a rerun resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from evomerge.config import ConfigError, StudyConfig, anchor, parse_config, read_config
from evomerge.glue.kinship import DEFAULT_THRESHOLD, ZooAnalysis


class GlueConfig(BaseModel):
    """One Model-GLUE run. `study` is the selection study's config without the fields this
    file decides (name, zoo, base, sources, storage, mixture's `others` and `prompts`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=80)
    zoo: str | None = None
    storage: str | None = None
    base: str = Field(description="the family's ancestor: its cluster is merged")
    models: tuple[str, ...] = Field(min_length=2, description="the zoo, without the base")
    threshold: float = Field(DEFAULT_THRESHOLD, gt=0, le=1)
    merge_tasks: tuple[str, ...] = Field(
        min_length=1, description="tasks whose prompts form the merge's gate in the mixture"
    )
    experts: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="models of other clusters to mix with the merge, each with its gate tasks",
    )
    study: dict[str, Any]
    _folder: Path = PrivateAttr(default_factory=Path.cwd)

    @classmethod
    def load(cls, path: str | Path) -> GlueConfig:
        """Read the YAML file; relative paths in it are relative to the file (as a study's)."""
        p = Path(path)
        config = parse_config(cls, read_config(p), str(p), "glue")
        folder = p.parent
        config = config.model_copy(
            update={
                "base": anchor(config.base, folder),
                "models": tuple(anchor(m, folder) for m in config.models),
                "merge_tasks": tuple(anchor(t, folder) for t in config.merge_tasks),
                "experts": {
                    anchor(m, folder): tuple(anchor(t, folder) for t in tasks)
                    for m, tasks in config.experts.items()
                },
            }
        )
        config._folder = folder
        return config

    def refs(self) -> dict[str, str]:
        """Each model's name in tables (`zoo:add` is `add`) -> its ref."""
        out = {}
        for ref in (self.base, *self.models):
            name = ref[4:] if ref.startswith("zoo:") else Path(ref).name
            if name in out:
                raise ConfigError(f"models: two models are named {name!r}")
            out[name] = ref
        return out


@dataclass
class Plan:
    """What the analysis decided: the family merged, the experts mixed, the rest left out."""

    merged: tuple[str, ...]
    mixed: tuple[str, ...]
    left_out: dict[str, str] = field(default_factory=dict)


def plan(config: GlueConfig, analysis: ZooAnalysis) -> Plan:
    """Split the zoo by the base's cluster: its members are selected among and merged; the
    named experts of other clusters are mixed; anything else is left out, with the reason."""
    refs = config.refs()
    names = {ref: name for name, ref in refs.items()}
    family = next(c for c in analysis.clusters if names[config.base] in c)
    merged = tuple(refs[n] for n in family if refs[n] != config.base)
    apart = analysis.apart()
    mixed, left_out = [], {}
    for ref in config.models:
        if ref in merged:
            if ref in config.experts:
                left_out[ref] = "in the base's cluster: merged, so not mixed as well"
            continue
        name = names[ref]
        if ref in config.experts:
            mixed.append(ref)
        else:
            why = apart.get(name, "in another cluster")
            left_out[ref] = f"{why}; not mixed (no gate tasks under `experts`)"
    if len(merged) < 2:
        raise ConfigError(
            f"the base's cluster holds {len(merged)} other model(s) at threshold "
            f"{config.threshold}: nothing to select among (lower `threshold`?)"
        )
    unknown = sorted(set(config.experts) - set(config.models))
    if unknown:
        raise ConfigError(f"experts: {unknown} are not among `models`")
    return Plan(merged, tuple(mixed), left_out)


def selection_study(config: GlueConfig, chosen: Plan) -> StudyConfig:
    """Stage 1: the selection study over the family, with the mixture stage after it."""
    data = dict(config.study)
    for key in ("name", "zoo", "base", "sources", "storage"):
        if key in data:
            raise ConfigError(f"study.{key}: set by the glue config, not in `study`")
    mixture = dict(data.pop("mixture", None) or {})
    if chosen.mixed:
        mixture["others"] = list(chosen.mixed)
        mixture["prompts"] = [list(config.merge_tasks), *(config.experts[m] for m in chosen.mixed)]
        data["mixture"] = mixture
    data |= {"name": config.name, "base": config.base, "sources": list(chosen.merged)}
    if config.zoo is not None:
        data["zoo"] = config.zoo
    if config.storage is not None:
        data["storage"] = config.storage
    source = f"glue config {config.name}"
    return StudyConfig.from_yaml(yaml.safe_dump(data), source=source).anchored(config._folder)


@dataclass
class Row:
    """One line of the report: a model alone (`model`), the whole family merged (`whole`) or
    a stage's best (`stage`), its held-out metrics and what it cost."""

    kind: str
    name: str
    metrics: dict[str, float]
    fitness: float
    trials: int | None = None
    seconds: float | None = None
    note: str = ""


def report(
    config: GlueConfig,
    stage1: StudyConfig,
    store: Any,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Held-out table: each model alone, the whole family merged, then each stage's best."""
    from evomerge.coordinator import build_space
    from evomerge.fitness import Evaluator
    from evomerge.space import SearchSpace
    from evomerge.zoo import default_zoo_dir, resolve_model
    from workers.actor import CandidateWorker

    say = progress or (lambda line: None)
    fit = stage1.fitness
    zoo_dir = default_zoo_dir(stage1.zoo or "demo")
    tasks = [t.task for t in fit.tasks]
    weights = [t.weight for t in fit.tasks]
    evaluator = Evaluator(
        tasks, weights, split="held-out", limit=fit.heldout_limit, zoo_dir=zoo_dir
    )
    rows = []
    names = {ref: name for name, ref in config.refs().items()}
    for ref in (config.base, *config.models):
        say(f"scoring {names[ref]} alone on held-out")
        rows.append(_scored(names[ref], evaluator, resolve_model(ref, zoo_dir)))

    space, spec = build_space(stage1.model_copy(update={"mixture": None}))
    assert isinstance(space, SearchSpace)
    share = stage1.optimizer.scale / len(stage1.sources)
    whole = space.decode(space.genome_of_weights((share,) * len(stage1.sources)))
    say("scoring the whole family merged on held-out")
    result = CandidateWorker(spec).evaluate(whole.to_json(), split="held-out")
    if result.error is not None:
        raise RuntimeError(f"the whole family's merge failed: {result.error}")
    fitness = result.fitness or 0.0
    rows.append(Row("whole", "whole family merged", result.metrics, fitness, note="every source"))
    for name in (stage1.name, *stage1.later_stages()):
        rows.append(_stage_row(store, name))
    return rows


def _scored(name: str, evaluator: Any, folder: Path) -> Row:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    score = evaluator.score(model, AutoTokenizer.from_pretrained(folder))
    return Row("model", name, dict(score.metrics), score.fitness)


def _stage_row(store: Any, study: str) -> Row:
    """A stage's best trial by held-out score, with the trials and worker seconds it used."""
    trials = store.trials(study)
    best = [r for r in store.best(study, top=1, by="heldout") if r.heldout is not None]
    if not best:
        raise RuntimeError(
            f"study {study!r} has no trial scored on held-out (budget.heldout_top_k must be > 0)"
        )
    row = best[0]
    seconds = sum((t.build_seconds or 0) + (t.eval_seconds or 0) for t in trials)
    note = _describe(row.recipe_json)
    metrics = dict(row.heldout_metrics or {})
    return Row("stage", study, metrics, row.heldout, len(trials), seconds, note)


def _describe(recipe_json: str) -> str:
    from evomerge.recipe import Recipe

    recipe = Recipe.from_json(recipe_json)
    if recipe.mixture is not None:
        return f"mixture of {', '.join(recipe.mixture.experts)}; " + recipe.summary()["router"]
    weights = recipe.params.get("weight", ((),))[0]
    kept = [f"{s} {w:.2f}" for s, w in zip(recipe.sources, weights, strict=False) if w > 0]
    return "kept " + ", ".join(kept)


def as_dicts(rows: list[Row]) -> list[Mapping[str, Any]]:
    return [r.__dict__ for r in rows]
