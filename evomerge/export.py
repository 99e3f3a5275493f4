"""Export a recipe: a Hugging Face checkpoint folder, the equivalent mergekit config, a card.

The checkpoint is built by the same `build` a worker runs, so the exported model is the
model the trial scored, bit for bit. It is written to a temporary folder beside `out_dir`
and renamed into place at the end: an error leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig

from evomerge.layout import Layout
from evomerge.merge import build, get_method
from evomerge.merge.build import group_parts, group_values, method_options
from evomerge.merge.spec import BasePolicy
from evomerge.mergekit_coverage import gap
from evomerge.models import SourceSet, has_tokenizer, load_model
from evomerge.recipe import DATAFLOW, EMBED, LM_HEAD, MERGED, MIXTURE, NORM, Recipe

MERGE_OUT = "./merge"  # where a PS+DFS route's passthrough config expects model A's merge


def _layer_runs(group_of: dict[str | int, int], num_layers: int) -> list[tuple[int, int, int]]:
    """(first layer, last layer + 1, group index) of each run of layers sharing a group."""
    runs: list[tuple[int, int, int]] = []
    for layer in range(num_layers):
        g = group_of[layer]
        if runs and runs[-1][2] == g:
            runs[-1] = (runs[-1][0], layer + 1, g)
        else:
            runs.append((layer, layer + 1, g))
    return runs


def _setting(layer_value: float, special: list[tuple[str, float]]):
    """A mergekit parameter setting: the layer value, with filters for special tensors."""
    if all(v == layer_value for _, v in special):
        return layer_value
    return [{"filter": name, "value": v} for name, v in special] + [{"value": layer_value}]


def _anchor(recipe: Recipe, source_paths: dict[str, str]) -> tuple[PretrainedConfig, Layout]:
    """The config and layout the mergekit config follows (the base's, else the first
    source's): the exported checkpoint holds exactly the layout's tensors."""
    missing = [n for n in (recipe.base, *recipe.sources) if n is not None and n not in source_paths]
    if missing:
        raise ValueError(f"source_paths: no path for {missing}")
    anchor = recipe.base if recipe.base is not None else recipe.sources[0]
    config = AutoConfig.from_pretrained(source_paths[anchor])
    return config, Layout.of(config)


def mergekit_config(recipe: Recipe, source_paths: dict[str, str]) -> dict:
    """The mergekit config (one slice per layer group, filters for the special groups)."""
    method = get_method(recipe.method)
    _, layout = _anchor(recipe, source_paths)
    num_layers = layout.num_layers
    group_of = group_parts(recipe.groups, num_layers)
    options = method_options(recipe.options, method)
    values = group_values(recipe, method, options)
    runs = _layer_runs(group_of, num_layers)

    def setting(name: str, i: int, g: int, specials: tuple[str, ...]):
        pairs = [(t, values[group_of[s]][name][i]) for s in specials for t in layout.tensors(s)]
        if LM_HEAD in specials:  # a tied head is the embedding: a stored copy merges as it does
            pairs += [(t, values[group_of[EMBED]][name][i]) for t in sorted(layout.tied)]
        return _setting(values[g][name][i], pairs)

    slices = []
    for j, (first, stop, g) in enumerate(runs):
        specials = ((EMBED,) if j == 0 else ()) + ((NORM, LM_HEAD) if j == len(runs) - 1 else ())
        members = []
        if method.base_policy is BasePolicy.ENDPOINT:
            members.append({"model": str(source_paths[recipe.base]), "layer_range": [first, stop]})
        for i, name in enumerate(recipe.sources):
            member = {"model": str(source_paths[name]), "layer_range": [first, stop]}
            per_source = {
                p.name: setting(p.name, i, g, specials) for p in method.params if p.per_source
            }
            if per_source:
                member["parameters"] = per_source
            members.append(member)
        if method.base_policy is BasePolicy.TASK_VECTORS:
            members.append({"model": str(source_paths[recipe.base]), "layer_range": [first, stop]})
        out_slice: dict = {"sources": members}
        shared = {
            p.name: setting(p.name, 0, g, specials) for p in method.params if not p.per_source
        }
        if shared:
            out_slice["parameters"] = shared
        slices.append(out_slice)

    cfg: dict = {"merge_method": method.name}
    if method.base_policy is not BasePolicy.IGNORED:
        cfg["base_model"] = str(source_paths[recipe.base])
    cfg["slices"] = slices
    if options:
        cfg["parameters"] = options
    cfg["dtype"] = "float32"
    cfg["out_dtype"] = recipe.dtype
    return cfg


def mergekit_gap(recipe: Recipe, source_paths: dict[str, str]) -> str | None:
    """Why mergekit's merge of `recipe` is not evomerge's (see `mergekit_coverage`); None
    when it is (random methods: up to their random draws)."""
    config, layout = _anchor(recipe, source_paths)
    return gap(config, layout.params)


def mergekit_yaml(recipe: Recipe, source_paths: dict[str, str]) -> str:
    """mergekit's YAML for `recipe`, its header saying whether mergekit rebuilds this model."""
    body = yaml.safe_dump(
        mergekit_config(recipe, source_paths), sort_keys=False, default_flow_style=None
    )
    why = mergekit_gap(recipe, source_paths)
    if why is None:
        note = ["# Exact: mergekit rebuilds this model from it"]
        if not get_method(recipe.method).deterministic:
            note[0] += ", up to the random draws of its masks"
    else:
        note = ["# NOT EXACT: " + line for line in textwrap.wrap(why, 86)]
    header = [f"# mergekit config of evomerge recipe {recipe.hash} ({recipe.method}).", *note]
    return "\n".join(header) + "\n" + body


def _card_end(scores: dict | None, reproduce: str, config_yaml: str) -> list[str]:
    """A model card's last sections: scores, then how to rebuild it and its mergekit YAML."""
    return [
        "",
        "## Scores",
        "",
        *_score_lines(scores),
        "",
        "## Reproduce",
        "",
        reproduce,
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]


def _score_lines(scores: dict | None) -> list[str]:
    if not scores:
        return ["No scores recorded."]
    rows = [
        f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in scores.items()
    ]
    return ["| metric | value |", "|---|---|", *rows]


def recipe_yaml(recipe: Recipe, paths: dict[str, str]) -> str:
    """mergekit's config for any recipe: its merge, or the passthrough config of its route;
    a mixture has none (mergekit-moe mixes per layer, not whole models): its merge's."""
    from evomerge.dataflow import passthrough_yaml

    if recipe.mixture is not None:
        note = "# A model-level mixture has no mergekit config (mergekit-moe mixes per layer).\n"
        if recipe.method == MIXTURE:
            return note
        return note + "# Expert 0 is this merge:\n" + mergekit_yaml(recipe.merge_part(), paths)
    if recipe.dataflow is None:
        return mergekit_yaml(recipe, paths)
    refs = [MERGE_OUT if ref == MERGED else paths[ref] for ref in recipe.dataflow.models]
    return passthrough_yaml(recipe.dataflow, refs, recipe.dtype)


def model_card(recipe: Recipe, source_paths: dict[str, str], config_yaml: str, scores) -> str:
    """README.md: method, sources, every parameter per group, options, scores, reproduction."""
    method = get_method(recipe.method)
    options = method_options(recipe.options, method)
    values = group_values(recipe, method, options)
    lines = [
        f"# evomerge {recipe.method} merge `{recipe.hash}`",
        "",
        f"Merged with evomerge using **{recipe.method}** (mergekit semantics), "
        f"dtype {recipe.dtype}, seed {recipe.seed}.",
        "",
        "## Models",
        "",
    ]
    if recipe.base is not None:
        lines.append(f"- base: `{recipe.base}` ({source_paths.get(recipe.base, '?')})")
    lines += [f"- source: `{s}` ({source_paths.get(s, '?')})" for s in recipe.sources]
    lines += ["", "## Parameters", ""]
    if method.params:
        lines.append("| group | parameter | " + " | ".join(f"`{s}`" for s in recipe.sources) + " |")
        lines.append("|---" * (len(recipe.sources) + 2) + "|")
        for group, row in zip(recipe.groups, values, strict=True):
            for name, vals in row.items():
                cells = [f"{v:g}" for v in vals] if len(vals) > 1 else [f"{vals[0]:g} (shared)"]
                lines.append(f"| {group} | {name} | " + " | ".join(cells) + " |")
    else:
        lines.append(f"{recipe.method} has no numeric parameters.")
    if options:
        lines += ["", "Options: " + ", ".join(f"`{k}` = {v}" for k, v in options.items())]
    why = mergekit_gap(recipe, source_paths)
    mergekit = (
        "the equivalent mergekit config (`mergekit_config.yml`):"
        if why is None
        else f"mergekit's config (`mergekit_config.yml`) does **not** rebuild it: {why}."
    )
    reproduce = (
        f"`evomerge merge recipe.json --out DIR` rebuilds this folder bit for bit; {mergekit}"
    )
    return "\n".join(lines + _card_end(scores, reproduce, config_yaml))


def export_checkpoint(
    recipe: Recipe, sources: SourceSet, out_dir: str | Path, scores: dict | None = None
) -> Path:
    """Build `recipe` and write it to `out_dir` as a Hugging Face checkpoint folder.

    The folder holds safetensors weights, config, generation config, the base tokenizer,
    recipe.json, mergekit_config.yml and a README model card.
    """
    out = free_folder(out_dir)
    paths = {name: str(p) for name, p in sources.paths.items()}
    config_yaml = mergekit_yaml(recipe, paths)  # validates the recipe before any work
    model = sources.new_model(recipe.dtype)
    build(recipe, sources, model)
    with staged(out) as tmp:
        base_dir = sources.paths[sources.base_name]
        if (base_dir / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(base_dir)
        model.save_pretrained(tmp)
        if has_tokenizer(base_dir):
            sources.tokenizer.save_pretrained(tmp)
        recipe.save(tmp / "recipe.json")
        (tmp / "mergekit_config.yml").write_text(config_yaml)
        (tmp / "README.md").write_text(model_card(recipe, paths, config_yaml, scores))
    return out


def free_folder(out_dir: str | Path) -> Path:
    """`out_dir` as a Path, checked before any work: it must be missing or empty."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output folder {out} is a file")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder exists and is not empty: {out}")
    return out


def _readable(folder: Path) -> None:
    """Give `folder` and what it holds the modes a plain mkdir and write would have (the
    umask's): mkdtemp makes the folder private, and some writers make private files."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds: an error
    leaves nothing half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        _readable(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class _Models:
    """What a route or a mixture runs: the recipe's merge (built as a worker builds it) and
    the whole models it names, loaded."""

    paths: dict[str, Path]
    source_paths: dict[str, str]  # the merge's models
    merged: torch.nn.Module | None
    merge_yaml: str | None
    tokenizer: Any
    loaded: dict[str, torch.nn.Module]

    @classmethod
    def load(cls, recipe: Recipe, refs: tuple[str, ...], zoo_dir, device) -> _Models:
        from evomerge.zoo import resolve_model

        paths = {ref: resolve_model(ref, zoo_dir) for ref in refs if ref != MERGED}
        merged, merge_yaml, source_paths = None, None, {}
        if recipe.method not in (DATAFLOW, MIXTURE):
            merge = recipe.merge_part()
            sources = load_recipe_sources(merge, zoo_dir, device)
            source_paths = {n: str(p) for n, p in sources.paths.items()}
            merge_yaml = mergekit_yaml(merge, source_paths)
            merged = sources.new_model(recipe.dtype)
            build(merge, sources, merged)
            tokenizer = sources.tokenizer
        else:
            tokenizer = AutoTokenizer.from_pretrained(paths[refs[0]])
        loaded = {ref: load_model(path, recipe.dtype, device) for ref, path in paths.items()}
        return cls(paths, source_paths, merged, merge_yaml, tokenizer, loaded)


def export_route(
    recipe: Recipe,
    out_dir: str | Path,
    scores: dict | None = None,
    *,
    zoo_dir: Path | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a data-flow recipe's path model: the checkpoint folder (each distinct layer
    once, loadable through `AutoModelForCausalLM` after `import evomerge.dataflow`),
    recipe.json, mergekit's passthrough config and, for PS+DFS, model A's merge config."""
    from evomerge.dataflow import route, save_path_checkpoint

    flow = recipe.dataflow
    assert flow is not None
    out = free_folder(out_dir)
    m = _Models.load(recipe, flow.models, zoo_dir, device)
    model = route(flow, m.merged, m.loaded)
    refs = [MERGE_OUT if ref == MERGED else str(m.paths[ref]) for ref in flow.models]
    route_yaml = recipe_yaml(recipe, {ref: str(path) for ref, path in m.paths.items()})
    with staged(out) as tmp:
        save_path_checkpoint(model, m.tokenizer, tmp)
        recipe.save(tmp / "recipe.json")
        (tmp / "mergekit_config.yml").write_text(route_yaml)
        if m.merge_yaml is not None:
            (tmp / "merge_config.yml").write_text(m.merge_yaml)
        (tmp / "README.md").write_text(route_card(recipe, refs, route_yaml, m.merge_yaml, scores))
    return out


def export_mixture(
    recipe: Recipe,
    out_dir: str | Path,
    scores: dict | None = None,
    *,
    zoo_dir: Path | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a mixture: one checkpoint folder holding every expert and the router's gates,
    loadable through `AutoModelForCausalLM` after `import evomerge.glue`, with recipe.json,
    a card, and mergekit_config.yml (expert 0's merge, under a note: mergekit has no
    model-level mixture)."""
    from evomerge.glue.mixture import mix

    mixture = recipe.mixture
    assert mixture is not None
    out = free_folder(out_dir)
    m = _Models.load(recipe, mixture.experts, zoo_dir, device)
    model = mix(mixture, m.merged, m.loaded, m.tokenizer)
    mixture_yaml = recipe_yaml(recipe, m.source_paths)
    with staged(out) as tmp:
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        m.tokenizer.save_pretrained(tmp)
        recipe.save(tmp / "recipe.json")
        (tmp / "mergekit_config.yml").write_text(mixture_yaml)
        (tmp / "README.md").write_text(mixture_card(recipe, m.paths, mixture_yaml, scores))
    return out


def mixture_card(recipe: Recipe, paths: dict[str, Path], mixture_yaml: str, scores) -> str:
    """README.md of a mixture: its experts, the router, scores, how to load and rebuild."""
    mixture = recipe.mixture
    assert mixture is not None
    lines = [
        f"# evomerge model-level mixture `{recipe.hash}`",
        "",
        f"{len(mixture.experts)} whole models behind a router (dtype {recipe.dtype}). The "
        f"router pools ({mixture.pooling}) expert 0's hidden state after {mixture.layer} "
        f"layers over each sequence and sends it to its top {mixture.top_k} experts by cosine "
        f"similarity to their gates (temperature {mixture.temperature:g}); each gate is the "
        "same pooled state averaged over that expert's prompts.",
        "",
        "## Experts",
        "",
        "| expert | model | gate prompts |",
        "|---|---|---|",
    ]
    for ref, prompts in zip(mixture.experts, mixture.prompts, strict=True):
        where = "the merge of mergekit_config.yml" if ref == MERGED else str(paths[ref])
        lines.append(f"| `{ref}` | {where} | {len(prompts)} |")
    reproduce = (
        "`import evomerge.glue` registers the model class; then "
        "`AutoModelForCausalLM.from_pretrained(this folder)` loads it. "
        "`evomerge merge recipe.json --out DIR` rebuilds it. mergekit has no model-level "
        "mixture (mergekit-moe mixes per layer); `mergekit_config.yml` holds expert 0's "
        "merge, if any:"
    )
    return "\n".join(lines + _card_end(scores, reproduce, mixture_yaml))


def route_card(
    recipe: Recipe, refs: list[str], route_yaml: str, merge_yaml: str | None, scores
) -> str:
    """README.md of a path model: its models, every hop with its scale, scores, reproduction."""
    flow = recipe.dataflow
    assert flow is not None
    lines = [
        f"# evomerge data-flow path `{recipe.hash}`",
        "",
        f"A token passes {len(flow.path)} layers of {len(flow.models)} models (dtype "
        f"{recipe.dtype}); model A supplies the embeddings, final norm, LM head and tokenizer.",
        "",
        "## Models",
        "",
        *(f"- {'AB'[m]}: `{ref}`" for m, ref in enumerate(refs)),
    ]
    if merge_yaml is not None:
        lines += ["", f"A is the {recipe.method} merge of `merge_config.yml` ({MERGE_OUT})."]
    lines += ["", "## Path", "", "| hop | model | layer | input scale |", "|---|---|---|---|"]
    lines += [
        f"| {i} | {'AB'[m]} | {layer} | {s:g} |"
        for i, ((m, layer), s) in enumerate(zip(flow.path, flow.scales, strict=True))
    ]
    reproduce = (
        "`import evomerge.dataflow` registers the model class; then "
        "`AutoModelForCausalLM.from_pretrained(this folder)` loads it. "
        "`evomerge merge recipe.json --out DIR` rebuilds it. mergekit's nearest config "
        "(`mergekit_config.yml`):"
    )
    return "\n".join(lines + _card_end(scores, reproduce, route_yaml))


def load_recipe_sources(
    recipe: Recipe, zoo_dir: Path | None = None, device: str | torch.device = "cpu"
) -> SourceSet:
    """Load exactly the models a recipe names (folders or `zoo:` refs), its base (else its
    first source) as the SourceSet base."""
    from evomerge.zoo import resolve_model

    base = recipe.base if recipe.base is not None else recipe.sources[0]
    others = [s for s in recipe.sources if s != base]
    return SourceSet.load(
        resolve_model(base, zoo_dir),
        [resolve_model(s, zoo_dir) for s in others],
        names=others,
        base_name=base,
        device=device,
    )


def export_recipe(
    recipe: Recipe,
    config=None,
    out_dir: str | Path = ".",
    scores: dict | None = None,
    mergekit_yaml_path: str | Path | None = None,
    *,
    zoo_dir: Path | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Load the recipe's models and export it; `config` (a StudyConfig) names its toy zoo."""
    if mergekit_yaml_path is not None:
        yaml_path = Path(mergekit_yaml_path)
        if yaml_path.is_dir() or not yaml_path.parent.is_dir():
            where = "is a folder" if yaml_path.is_dir() else "is in no existing folder"
            raise ValueError(f"mergekit YAML {yaml_path} {where}")
    if zoo_dir is None and config is not None and config.zoo:
        from evomerge.zoo import default_zoo_dir

        zoo_dir = Path(default_zoo_dir(config.zoo))
    if recipe.dataflow is not None:
        out = export_route(recipe, out_dir, scores, zoo_dir=zoo_dir, device=device)
    elif recipe.mixture is not None:
        out = export_mixture(recipe, out_dir, scores, zoo_dir=zoo_dir, device=device)
    else:
        sources = load_recipe_sources(recipe, zoo_dir, device)
        out = export_checkpoint(recipe, sources, out_dir, scores)
    if mergekit_yaml_path is not None:
        Path(mergekit_yaml_path).write_text((out / "mergekit_config.yml").read_text())
    return out
