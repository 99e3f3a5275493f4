"""Export a path model: a Hugging Face checkpoint folder, and mergekit's nearest config.

The checkpoint holds each distinct layer once and loads back as `PathForCausalLM` through
`AutoModelForCausalLM` (after `import evomerge.dataflow`). mergekit's `passthrough` method
can stack the same layers in the same order but cannot scale a layer's input, so its config
is exact only when every scale is 1; its header says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge.dataflow.model import PathForCausalLM
from evomerge.export import free_folder
from evomerge.recipe import DataFlow


def save_path_checkpoint(model: PathForCausalLM, tokenizer: Any, out: str | Path) -> Path:
    """Write `model` (safetensors, config, generation config) and `tokenizer` to `out`."""
    out = free_folder(out)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def passthrough_yaml(flow: DataFlow, refs: Sequence[str], dtype: str = "float32") -> str:
    """mergekit `passthrough` config of `flow`, one slice per hop; `refs[m]` names model m."""
    if len(refs) != len(flow.models):
        raise ValueError(f"{len(refs)} refs for the flow's {len(flow.models)} models")
    scaled = [(i, s) for i, s in enumerate(flow.scales) if s != 1.0]
    header = [
        "# mergekit passthrough config of an evomerge data-flow path: one slice per hop.",
        f"# Embeddings, final norm and LM head come from model A ({refs[0]}), where the path",
        "# starts and ends.",
    ]
    if scaled:
        shown = ", ".join(f"hop {i} x{s:g}" for i, s in scaled[:8])
        more = f" and {len(scaled) - 8} more" if len(scaled) > 8 else ""
        header += [
            f"# APPROXIMATION: the path scales the input of some hops ({shown}{more}); mergekit",
            "# cannot scale a layer's input, so these scales are dropped here and this model",
            "# differs from the scored one. The evomerge checkpoint folder is the exact model.",
        ]
    else:
        header.append("# Exact: every scale is 1, so this is the scored model.")
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(refs[m]), "layer_range": [layer, layer + 1]}]}
            for m, layer in flow.path
        ],
        "dtype": dtype,
    }
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    return "\n".join(header) + "\n" + body
