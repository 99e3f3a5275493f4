"""Data-flow-space (DFS) merging: a model that runs a path through the layers of several
models, and its export.

Why each part exists:
- `PathForCausalLM` runs a `DataFlow` on the resident modules of its sources (no weight
  copies), so a search builds a candidate in milliseconds and scores it at normal speed.
- `HopCache` gives every hop its own KV cache slot: a layer may run several times a token.
- Importing this package registers the model with the Auto classes, so an exported path
  checkpoint loads with `AutoModelForCausalLM.from_pretrained` and no remote code.
- `passthrough_yaml` writes the nearest mergekit config (exact when every scale is 1).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.dataflow.export import passthrough_yaml, save_path_checkpoint
from evomerge.dataflow.model import PathConfig, PathForCausalLM, check_path, route

AutoConfig.register(PathConfig.model_type, PathConfig, exist_ok=True)
AutoModelForCausalLM.register(PathConfig, PathForCausalLM, exist_ok=True)

__all__ = [
    "PathConfig",
    "PathForCausalLM",
    "check_path",
    "passthrough_yaml",
    "route",
    "save_path_checkpoint",
]
