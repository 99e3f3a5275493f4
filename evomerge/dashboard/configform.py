"""The New-study form: a pasted YAML config checked into errors that point at their field.

`StudyConfig.from_yaml` is the one validator, then the dashboard's own limits (model roots,
the Ray cluster it was started with), then the same pre-flight as `evomerge run`. A
`ConfigError` keeps the pydantic or YAML error as its cause, which gives each problem a field
path, and the YAML node tree, composed once, turns that path into the line to show it at.
At most `MAX_ERRORS` are reported: a config of thousands of bad items costs one parse.
These checks read files and may wait on Ray: routes run them off the event loop.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from evomerge.config import DATAFLOW, ConfigError, StudyConfig
from evomerge.dashboard.paths import NAME, refused_refs
from evomerge.recipe import layer_group_names

# "search.weight: message": a SearchSpace error that starts with the field it is about.
FIELD_PREFIX = re.compile(r"^([\w./]+): (.*)$", re.S)
MAX_ERRORS = 50


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    line: int | None  # 1-based line of the YAML text, when the field is in it


def compose(text: str) -> yaml.Node | None:
    """The YAML node tree of `text` (None when it does not parse)."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def field_line(node: yaml.Node | None, path: Sequence[str | int]) -> int | None:
    """Line of the deepest node of `path` present in the YAML tree `node` (1-based)."""
    line = None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            if key >= len(node.value):
                break
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _errors(text: str, error: ConfigError) -> list[FieldError]:
    cause = error.__cause__
    if isinstance(cause, ValidationError):
        root = compose(text)
        errors = [
            FieldError(
                ".".join(str(p) for p in e["loc"]) or "(top level)",
                e["msg"],
                field_line(root, e["loc"]),
            )
            for e in cause.errors()[:MAX_ERRORS]
        ]
        if cause.error_count() > MAX_ERRORS:
            more = f"{cause.error_count() - MAX_ERRORS} more errors not shown"
            errors.append(FieldError("(top level)", more, None))
        return errors
    if isinstance(cause, yaml.MarkedYAMLError) and cause.problem_mark is not None:
        return [FieldError("(yaml)", str(cause.problem), cause.problem_mark.line + 1)]
    return [FieldError("(top level)", str(error).split(": ", 1)[-1], None)]


def check_config(
    text: str, name: str, model_roots: tuple[Path, ...], ray_address: str | None = None
) -> tuple[StudyConfig | None, list[FieldError]]:
    """The validated config (study name `name` when given), or the errors at their fields.

    `ray_address`: the one cluster a study started here may join (besides the default)."""
    try:
        config = StudyConfig.from_yaml(text, source="config", name=name.strip() or None)
    except ConfigError as e:
        return None, _errors(text, e)
    refused = refused_refs(config, model_roots)
    if not NAME.fullmatch(config.name):
        refused["name"] = "a study started here needs a name that starts with a letter or digit"
    if config.workers.ray_address not in (None, "auto", ray_address):
        refused["workers.ray_address"] = (
            f"this dashboard starts studies on {ray_address or 'the default Ray cluster'} only"
        )
    refused |= _space_errors(config)
    errors = _at_lines(text, refused)
    return (None, errors) if errors else (config, [])


def preflight_errors(config: StudyConfig, text: str, storage_url: str) -> list[FieldError]:
    """What `evomerge run` would refuse before writing anything, at its fields."""
    from evomerge.preflight import problems

    return _at_lines(text, {p.field: p.message for p in problems(config, storage_url)})


def _at_lines(text: str, reasons: dict[str, str]) -> list[FieldError]:
    root = compose(text) if reasons else None
    return [FieldError(f, reason, field_line(root, _path(f))) for f, reason in reasons.items()]


def _space_errors(config: StudyConfig) -> dict[str, str]:
    """What the search space refuses: an unknown method, or parameters it does not have.

    Imported here: the merge methods load torch, which only this check needs.
    """
    from evomerge.space import SearchSpace

    if config.method == DATAFLOW:  # routes only: no merge method or parameters to check
        return {}
    try:
        SearchSpace(config, layer_group_names(1))
    except ValueError as e:
        m = FIELD_PREFIX.match(str(e))
        return {m.group(1): m.group(2)} if m else {"method": str(e)}
    return {}


def _path(field: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in field.split(".")]
