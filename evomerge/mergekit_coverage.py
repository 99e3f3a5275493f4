"""Whether mergekit can rebuild a checkpoint: the tensors its architecture table leaves out.

mergekit writes only the tensors its table for an architecture lists (its Llama table, for
one, has no bias tensors), so the YAML of a checkpoint holding others rebuilds another model.
mergekit is a development dependency of evomerge: where it is not installed the check cannot
be made, and the note says that instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PretrainedConfig

SHOWN = 4  # tensor names a note lists before it counts the rest


def gap(config: PretrainedConfig, tensors: Iterable[str]) -> str | None:
    """Why mergekit's merge of a checkpoint with `tensors` is not that checkpoint; None if
    mergekit's architecture table covers every tensor."""
    try:
        from mergekit.architecture import arch_info_for_config
    except ImportError:
        return (
            "mergekit is not installed where this was exported, so whether its architecture "
            "table covers every tensor of this checkpoint was not checked"
        )
    if not config.architectures:
        return (
            "the model's config.json names no `architectures`, which mergekit reads to pick "
            "its architecture table"
        )
    arch = arch_info_for_config(config)
    if arch is None:
        return (
            f"mergekit has no architecture table for {config.architectures}; it infers one "
            "from the checkpoints, which was not checked"
        )
    covered = set()
    for w in arch.all_weights(config):
        covered |= {w.name, *(w.aliases or ()), *(w.tied_names or ())}
    missing = sorted(set(tensors) - covered)
    if not missing:
        return None
    more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
    return (
        f"mergekit's {arch.expected_model_type} table lacks {len(missing)} "
        f"tensor(s) of this checkpoint ({', '.join(missing[:SHOWN])}{more}): mergekit's "
        "merge leaves them out, so it is not this model"
    )
