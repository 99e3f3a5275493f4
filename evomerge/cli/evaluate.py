"""Commands: evaluate."""

from evomerge.cli.app import app  # noqa: F401
