"""The `evomerge` command. Each sub-module adds its commands to `app`."""

from evomerge.cli import (  # noqa: F401  (registers commands)
    dashboard,
    evaluate,
    fuse,
    glue,
    merge,
    plan,
    study,
    zoo,
)
from evomerge.cli.app import app

__all__ = ["app"]
