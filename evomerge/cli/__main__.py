"""`python -m evomerge.cli`: the same as the `evomerge` command."""

from evomerge.cli import app

app()
