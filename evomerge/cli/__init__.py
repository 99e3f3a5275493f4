"""The `evomerge` command. Each sub-module adds its commands to `app`."""

from evomerge.cli import dashboard, evaluate, merge, plan, study, zoo  # noqa: F401  (registers commands)
from evomerge.cli.app import app

__all__ = ["app"]
