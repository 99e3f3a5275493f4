"""evomerge: evolutionary model-merging optimization."""

__version__ = "0.1.0"
