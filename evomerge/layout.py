"""Which layer group each tensor of a decoder-only causal LM belongs to, found from the model.

No per-architecture table: the module tree transformers builds for a config (on the meta
device, so nothing is allocated) says where the embeddings, the decoder layers, the final norm
and the LM head are. Any decoder-only LM whose layers form one indexed stack `model.layers.N.`
is then supported, whatever each layer holds (q/k norms, post-norms, fused qkv or gate_up
projections, biases): every parameter under `model.layers.N.` is layer N's.

A tied head is the embedding matrix under a second name: it is merged once, in the embedding
group, and a copy the checkpoint files may also store is not read (transformers ignores it
when it loads the model, so the model is what the embedding group makes it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from evomerge.recipe import EMBED, LM_HEAD, NORM

LAYERS = "model.layers"

# Config fields that must agree for two checkpoints to be mergeable.
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class Layout:
    """The layer group of every parameter of one architecture's model."""

    model_type: str
    num_layers: int
    params: dict[str, str | int]  # parameter -> special group name or decoder layer index
    tied: frozenset[str]  # parameters that are the embedding matrix under another name

    @classmethod
    def of(cls, config: PretrainedConfig) -> Layout:
        """The layout of `config`'s causal LM; ValueError saying why a model is not one."""
        kind = config.model_type
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"unsupported architecture {kind!r}: an encoder-decoder model; evomerge merges "
                "decoder-only causal LMs"
            )
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(
                f"unsupported architecture {kind!r}: transformers has no causal LM class for it"
            )
        with no_init_weights(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # skipped under no_init_weights
        stacks = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and not name.startswith(f"{LAYERS}.")
        ]
        if stacks != [LAYERS]:
            raise ValueError(
                f"unsupported architecture {kind!r}: not a decoder-only LM with one stack of "
                f"decoder layers at {LAYERS}.N (its layer stacks: {stacks or 'none'})"
            )
        module_name = {id(m): name for name, m in model.named_modules()}
        embed = module_name[id(model.get_input_embeddings())]
        head_module = model.get_output_embeddings()
        head = module_name[id(head_module)]
        is_tied = head_module.weight is model.get_input_embeddings().weight
        params: dict[str, str | int] = {}
        tied, rest = set(), []
        for name, _ in model.named_parameters(remove_duplicate=False):
            if name.startswith(f"{LAYERS}."):
                params[name] = int(name.split(".")[2])
            elif name.startswith(f"{head}."):
                if is_tied:
                    tied.add(name)
                else:
                    params[name] = LM_HEAD
            elif name.startswith(f"{embed}."):
                params[name] = EMBED
            else:
                rest.append(name)
        owners = {name.rsplit(".", 1)[0] for name in rest}
        if len(owners) > 1:
            raise ValueError(
                f"unsupported architecture {kind!r}: parameters {rest} lie outside the "
                "embeddings, the decoder layers, one final norm and the LM head"
            )
        params |= dict.fromkeys(rest, NORM)
        return cls(kind, len(model.get_submodule(LAYERS)), params, frozenset(tied))

    def parts(self, tensors: Iterable[str], who: str) -> dict[str, str | int]:
        """The group of each of a checkpoint's `tensors`, tied copies left out; ValueError
        naming `who` when a tensor fits no group or a parameter is missing."""
        tensors = set(tensors)
        unknown = sorted(tensors - set(self.params) - self.tied)
        if unknown:
            raise ValueError(f"{who}: tensor {unknown[0]} fits no {self.model_type} layer group")
        missing = sorted(set(self.params) - tensors)
        if missing:
            raise ValueError(f"{who} lacks tensor(s) {missing}")
        return {t: self.params[t] for t in sorted(tensors - self.tied)}

    def tensors(self, group: str) -> tuple[str, ...]:
        """The parameters of special group `group` (embed, norm or lm_head)."""
        return tuple(name for name, part in self.params.items() if part == group)
