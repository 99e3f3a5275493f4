"""A chain's studies, found in the store: PS+DFS's `NAME-dfs`, a selection's `NAME-evolve`,
a merge's `NAME-mix` (and `NAME-evolve-mix`). A stage is found by its name, and counts only
when its chain made it (`StudyConfig.is_stage_of`): another study may have that name."""

from __future__ import annotations

from evomerge.config import STAGES, ConfigError, StudyConfig
from storage import Store


def stored_config(store: Store, name: str) -> StudyConfig | None:
    """The config `name` was started with; None for no such study, or one stored by a
    version of evomerge whose config this one cannot read."""
    info = store.get_study(name, missing_ok=True)
    if info is None:
        return None
    try:
        return StudyConfig.from_yaml(info.config_yaml, source=f"study {name!r}")
    except ConfigError:
        return None


def later_stages(store: Store, config: StudyConfig) -> list[str]:
    """The later stages of `config`'s chain that have started, in order."""
    found, parent = [], config
    for name in config.later_stages():
        stage = stored_config(store, name)
        if stage is None or not stage.is_stage_of(parent):
            break
        found.append(name)
        parent = stage
    return found


def first_stage(store: Store, name: str) -> str | None:
    """The study whose run started `name` as a later stage of its chain, if any."""
    stage = stored_config(store, name)
    for suffix in STAGES:
        if stage is None or not name.endswith(suffix):
            continue
        parent = name[: -len(suffix)]
        config = stored_config(store, parent)
        if config is not None and stage.is_stage_of(config):
            return first_stage(store, parent) or parent
    return None
