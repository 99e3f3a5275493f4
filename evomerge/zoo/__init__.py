"""The toy zoo: tiny Llama models evomerge trains itself, because no model hub is reachable."""

from evomerge.zoo.build import build_zoo, default_zoo_dir, read_manifest, resolve_model

__all__ = ["build_zoo", "default_zoo_dir", "read_manifest", "resolve_model"]
