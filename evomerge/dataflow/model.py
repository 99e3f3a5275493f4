"""`PathForCausalLM`: a causal LM whose hidden state walks a path through the decoder layers
of several Llama-style models, with a scale on the input of each hop.

Model 0 (A) supplies the embeddings, the final norm and the LM head. The model holds each
distinct layer of the path once; hop i runs layer `slots[hops[i]]` on its input times
`scales[i]`. Each hop has its own KV cache slot (see `cache.py`), each source model its own
rotary embedding, and each attention kind (full or sliding window) its own mask.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from evomerge.dataflow.cache import HopCache
from evomerge.kvcache import OUTPUT_CACHE_FIELD, cache_keyword
from evomerge.recipe import MERGED, DataFlow

_MASKS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


class PathConfig(PretrainedConfig):
    """Config of a path model: its sources' configs, its distinct layers, its hops.

    `slots[s]` is the [model index, layer index] of distinct layer s (names in
    `source_names`, configs in `source_configs`); hop i runs slot `hops[i]` with its input
    times `scales[i]`. `num_hidden_layers`, `layer_types` and `sliding_window` describe the
    hops, so that `DynamicCache(config=...)` makes one cache slot of the right kind per hop.
    The rest mirrors model A's config.
    """

    model_type = "evomerge_path"

    source_names: list[str] | None = None
    source_configs: list[dict] | None = None
    slots: list[list[int]] | None = None
    hops: list[int] | None = None
    scales: list[float] | None = None
    num_hidden_layers: int = 0
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


def _decoder(model: PreTrainedModel) -> nn.Module:
    """The decoder stack (`model.model`) of a Llama-style causal LM."""
    inner = getattr(model, "model", None)
    parts = (inner, "layers"), (inner, "rotary_emb"), (model, "lm_head")
    if inner is None or not all(hasattr(obj, name) for obj, name in parts):
        raise ValueError(f"{type(model).__name__} is not a Llama-style causal LM")
    return inner


# Families whose model does more between its embeddings and its head than a path model does
# (embed, layers, norm, head): a path through them would silently compute another model.
DEPARTS = {
    "gemma2": "its model scales the embeddings by sqrt(hidden_size) and soft-caps the logits",
    "gemma3_text": "each layer type has its own rotary embedding, and the logits are soft-capped",
}


def _classes(config: PretrainedConfig) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """The decoder layer, RMS norm and rotary embedding classes of a Llama-style config."""
    if config.model_type in DEPARTS:
        raise ValueError(
            f"data-flow routes do not support {config.model_type!r}: "
            f"{DEPARTS[config.model_type]}, which a path model does not do"
        )
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"no causal LM class for model type {config.model_type!r}")
    lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    module, prefix = sys.modules[lm_class.__module__], lm_class.__name__.removesuffix("ForCausalLM")
    names = [f"{prefix}{part}" for part in ("DecoderLayer", "RMSNorm", "RotaryEmbedding")]
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise ValueError(
            f"{config.model_type!r} is not Llama-style: {module.__name__} lacks {missing}"
        )
    layer, norm, rotary = (getattr(module, n) for n in names)
    return layer, norm, rotary


def _hop_kinds(
    configs: Sequence[PretrainedConfig], path: Sequence[tuple[int, int]]
) -> tuple[list[str], int | None]:
    """Attention kind of each hop and the sliding window they share (None if none slides)."""
    kinds, windows = [], set()
    for m, layer in path:
        # Read off the config by hand: transformers' own helper for this is only in 5.2x.
        window = getattr(configs[m], "sliding_window", None)
        types = getattr(configs[m], "layer_types", None)
        kind = (
            types[layer] if types else "full_attention" if window is None else "sliding_attention"
        )
        if kind not in _MASKS:
            raise ValueError(f"model {m} layer {layer}: unsupported attention kind {kind!r}")
        kinds.append(kind)
        if kind == "sliding_attention":
            windows.add(window)
    if len(windows) > 1:
        raise ValueError(f"cannot route between layers of sliding windows {sorted(windows)}")
    return kinds, next(iter(windows), None)


def check_path(
    path: Sequence[tuple[int, int]], scales: Sequence[float], num_layers: Sequence[int]
) -> None:
    """ValueError unless `path` runs from A's first to A's last layer through existing
    layers of the models (`num_layers[m]` decoder layers each) with one finite scale a hop."""
    if not path:
        raise ValueError("the path is empty")
    if len(scales) != len(path):
        raise ValueError(f"{len(scales)} scales for {len(path)} hops")
    for i, ((m, layer), scale) in enumerate(zip(path, scales, strict=True)):
        if not 0 <= m < len(num_layers):
            raise ValueError(f"hop {i}: model {m} out of range ({len(num_layers)} models)")
        if not 0 <= layer < num_layers[m]:
            raise ValueError(
                f"hop {i}: layer {layer} out of range for model {m} ({num_layers[m]} layers)"
            )
        if not math.isfinite(scale):
            raise ValueError(f"hop {i}: scale {scale} is not finite")
    first, last = (0, 0), (0, num_layers[0] - 1)
    if tuple(path[0]) != first:
        raise ValueError(f"the path must start with A's first layer {first}, not {tuple(path[0])}")
    if tuple(path[-1]) != last:
        raise ValueError(f"the path must end with A's last layer {last}, not {tuple(path[-1])}")


class PathForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM that runs a data-flow path; build it with `from_models`, save it with
    `save_pretrained`, load it with `AutoModelForCausalLM.from_pretrained`."""

    config_class = PathConfig
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "embed_tokens.weight"}
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: PathConfig) -> None:
        super().__init__(config)
        sources = [AutoConfig.for_model(**c) for c in config.source_configs]
        for c in sources:  # the rebuilt layers attend as this model was asked to
            c._attn_implementation_internal = config._attn_implementation
        classes = [_classes(c) for c in sources]
        a, (_, norm_class, _) = sources[0], classes[0]
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size, a.pad_token_id)
        self.layers = nn.ModuleList(classes[m][0](sources[m], layer) for m, layer in config.slots)
        self.norm = norm_class(a.hidden_size, eps=a.rms_norm_eps)
        self.rotary_embs = nn.ModuleList(
            cls(c) for c, (_, _, cls) in zip(sources, classes, strict=True)
        )
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self._no_split_modules = sorted({layer.__name__ for layer, _, _ in classes})
        self.post_init()

    @classmethod
    def from_models(cls, flow: DataFlow, models: Sequence[PreTrainedModel]) -> PathForCausalLM:
        """The path of `flow` over `models` (A first), referencing their modules: no copies."""
        if len(models) != len(flow.models):
            raise ValueError(
                f"the flow names {len(flow.models)} models {list(flow.models)}; {len(models)} given"
            )
        decoders = [_decoder(m) for m in models]
        configs = [m.config for m in models]
        for c in configs[1:]:
            if c.hidden_size != configs[0].hidden_size:
                raise ValueError(
                    f"cannot route between models of hidden size {configs[0].hidden_size} "
                    f"and {c.hidden_size}"
                )
        path = [tuple(p) for p in flow.path]
        check_path(path, flow.scales, [len(d.layers) for d in decoders])
        kinds, window = _hop_kinds(configs, path)
        slots = list(dict.fromkeys(path))
        a = configs[0]
        config = PathConfig(
            source_names=list(flow.models),
            source_configs=[c.to_diff_dict() for c in configs],
            slots=[list(s) for s in slots],
            hops=[slots.index(p) for p in path],
            scales=[float(s) for s in flow.scales],
            num_hidden_layers=len(path),
            layer_types=kinds,
            sliding_window=window,
            vocab_size=a.vocab_size,
            hidden_size=a.hidden_size,
            max_position_embeddings=a.max_position_embeddings,
            tie_word_embeddings=a.tie_word_embeddings,
            pad_token_id=a.pad_token_id,
            bos_token_id=a.bos_token_id,
            eos_token_id=a.eos_token_id,
            dtype=models[0].dtype,
            attn_implementation=a._attn_implementation,
        )
        with torch.device("meta"), no_init_weights():
            model = cls(config)
        model.embed_tokens, model.norm = decoders[0].embed_tokens, decoders[0].norm
        model.lm_head = models[0].lm_head
        model.layers = nn.ModuleList(decoders[m].layers[layer] for m, layer in slots)
        model.rotary_embs = nn.ModuleList(d.rotary_emb for d in decoders)
        model.generation_config = copy.deepcopy(models[0].generation_config)
        return model.train(models[0].training)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of the path, as a Hugging Face causal LM computes them (same arguments;
        the cache also as `past_key_values`, the name transformers gave it before 5.24)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        legacy = kwargs.pop("past_key_values", None)
        cache = legacy if cache is None else cache
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)  # one slot per hop
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(seen, seen + hidden.shape[1], device=hidden.device)[None]
        cfg = self.config
        masks: dict[tuple, torch.Tensor | None] = {}
        rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for hop, (slot, scale, kind) in enumerate(
            zip(cfg.hops, cfg.scales, cfg.layer_types, strict=True)
        ):
            m, layer = cfg.slots[slot][0], self.layers[slot]
            if m not in rotary:
                rotary[m] = self.rotary_embs[m](hidden, position_ids=position_ids)
            # A mask per attention kind, made for the implementation the layer attends with.
            attn_config = layer.self_attn.config
            key = (kind, attn_config._attn_implementation)
            if key not in masks:
                make_mask = _MASKS[kind]
                masks[key] = make_mask(
                    config=attn_config,
                    inputs_embeds=hidden,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    layer_idx=hop,
                    **{cache_keyword(make_mask): cache},
                )
            # The layer gets the hop's view of the cache under whatever name it takes it.
            hop_cache = None if cache is None else HopCache(cache, hop)
            hidden = layer(
                hidden if scale == 1.0 else hidden * scale,
                attention_mask=masks[key],
                position_ids=position_ids,
                use_cache=use_cache,
                **{cache_keyword(type(layer).forward): hop_cache},
                position_embeddings=rotary[m],
                **kwargs,
            )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(self.norm(hidden)[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE_FIELD: cache})


def route(
    flow: DataFlow, merged: PreTrainedModel | None, loaded: Mapping[str, PreTrainedModel]
) -> PathForCausalLM:
    """The path model of `flow`: `@merge` is the resident weight merge, other refs `loaded`."""
    models = []
    for ref in flow.models:
        model = merged if ref == MERGED else loaded.get(ref)
        if model is None:
            raise ValueError(f"dataflow.models: {ref!r} is not loaded")
        models.append(model)
    return PathForCausalLM.from_models(flow, models)
