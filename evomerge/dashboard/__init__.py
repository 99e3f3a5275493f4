"""The web dashboard: watch, start, stop and compare studies (`evomerge dashboard`)."""

from evomerge.dashboard.app import create_app

__all__ = ["create_app"]
