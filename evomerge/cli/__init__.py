"""The `evomerge` command. Each sub-module adds its commands to `app`."""

from evomerge.cli.app import app
from evomerge.cli import zoo, evaluate, merge, study, dashboard  # noqa: F401  (registers commands)

__all__ = ["app"]
