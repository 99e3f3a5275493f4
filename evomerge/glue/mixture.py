"""`MixtureForCausalLM`: Model-GLUE's model-level mixture of whole causal LMs behind a router.

Models that cannot merge (another initialisation: their weights do not align) can still be
combined: each sequence is answered by the experts its router picks. The router needs no
training. Each expert brings a few prompts of what it is good at; the hidden state of expert
0 at layer `layer`, pooled over each prompt and averaged over an expert's prompts, is that
expert's gate (mergekit-moe's `hidden` gates, at model level). Optionally the router alone is
then trained for `train_steps` to send each of those prompts to its own expert. A sequence's
pooled hidden state scores each gate by cosine similarity over `temperature`; softmax, top-k,
renormalise.

Routing is per sequence and fixed by the first forward (the prompt): the weights live in the
returned `MixtureCache` with each expert's own KV cache, so generation keeps its experts.
The mixture's next-token distribution is Σ w_e · softmax(logits_e); its logits are the log
of that, so a one-hot route gives exactly the expert's log-probabilities. Experts with no
weight in a batch do not run, except expert 0 on the prompt, whose forward yields the
router's hidden state.

Experts keep their own class and config (any causal LM transformers loads) but must share
one tokenizer: the same ids must mean the same tokens to every expert.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import DynamicCache
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import CausalLMOutputWithPast

from evomerge.kvcache import OUTPUT_CACHE_FIELD, cache_keyword, output_cache
from evomerge.recipe import MERGED, Mixture


class MixtureConfig(PretrainedConfig):
    """Config of a mixture: its experts' configs and names, and the router's settings."""

    model_type = "evomerge_mixture"

    expert_names: list[str] | None = None
    expert_configs: list[dict] | None = None
    # Prefixed: `top_k` and `temperature` in a model config would read as generation settings.
    router_layer: int = 0
    router_pooling: str = "mean"
    router_top_k: int = 1
    router_temperature: float = 1.0
    vocab_size: int | None = None
    hidden_size: int | None = None
    # Only for the plain cache `generate` makes before the first forward replaces it.
    num_hidden_layers: int = 1
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


class MixtureCache(DynamicCache):
    """Each expert's KV cache and each sequence's routing weights (set by the prompt)."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.caches: list[Any] = [None] * experts
        self.routing: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        seen = [c.get_seq_length() for c in self.caches if c is not None]
        return max(seen, default=0)


def pooled(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row of `hidden` [B, T, H] over the positions where `mask` is 1."""
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    where = torch.where(mask.bool(), positions, -1 if pooling == "last" else mask.shape[1])
    index = where.amax(1) if pooling == "last" else where.amin(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class MixtureForCausalLM(PreTrainedModel, GenerationMixin):
    """Whole causal LMs behind a hidden-state router; build it with `from_models`, save it with
    `save_pretrained`, load it with `AutoModelForCausalLM.from_pretrained`."""

    config_class = MixtureConfig
    base_model_prefix = "mixture"
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: MixtureConfig) -> None:
        super().__init__(config)
        self.experts = nn.ModuleList(
            AutoModelForCausalLM.from_config(AutoConfig.for_model(**c))
            for c in config.expert_configs
        )
        # Gate vectors (unit length), one row per expert: the only weights a mixture adds.
        self.router = nn.Parameter(torch.zeros(len(config.expert_configs), config.hidden_size))
        self.post_init()
        # post_init registers this model's own tied weights; a mixture's are its experts'
        # (a tied expert saves no LM head, and gets it back from its embeddings on load).
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    def _init_weights(self, module: nn.Module) -> None:
        """Experts initialise themselves; the router is set by `from_models` or loaded."""

    @classmethod
    def from_models(
        cls, mixture: Mixture, models: Sequence[PreTrainedModel], tokenizer: Any
    ) -> MixtureForCausalLM:
        """The mixture of `models` (in `mixture.experts` order), referencing their modules (no
        copies), with gates formed from `mixture.prompts` encoded by `tokenizer`."""
        if len(models) != len(mixture.experts):
            raise ValueError(
                f"the mixture names {len(mixture.experts)} experts {list(mixture.experts)}; "
                f"{len(models)} given"
            )
        configs = [m.config for m in models]
        for name, c in zip(mixture.experts[1:], configs[1:], strict=True):
            if c.vocab_size != configs[0].vocab_size:
                raise ValueError(
                    f"mixture expert {name!r} has a vocabulary of {c.vocab_size} tokens, expert "
                    f"{mixture.experts[0]!r} {configs[0].vocab_size}: experts must share one "
                    "tokenizer (fuse models of other tokenizers instead)"
                )
        layers = configs[0].num_hidden_layers
        if mixture.layer > layers:
            raise ValueError(
                f"mixture.layer {mixture.layer}: expert {mixture.experts[0]!r} has {layers} layers"
            )
        a = configs[0]
        config = MixtureConfig(
            expert_names=list(mixture.experts),
            expert_configs=[{**c.to_diff_dict(), "model_type": c.model_type} for c in configs],
            router_layer=mixture.layer,
            router_pooling=mixture.pooling,
            router_top_k=mixture.top_k,
            router_temperature=mixture.temperature,
            vocab_size=a.vocab_size,
            hidden_size=a.hidden_size,
            pad_token_id=a.pad_token_id,
            bos_token_id=a.bos_token_id,
            eos_token_id=a.eos_token_id,
            dtype=models[0].dtype,
        )
        with torch.device("meta"), no_init_weights():
            model = cls(config)
        model.experts = nn.ModuleList(models)
        model.router = nn.Parameter(gates(models[0], mixture, tokenizer), requires_grad=False)
        model.generation_config = copy.deepcopy(models[0].generation_config)
        return model.train(models[0].training)

    def route(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Routing weights [B, E] of each row: cosine to each gate, softmax, top-k, renormalised."""
        cfg = self.config
        h = F.normalize(pooled(hidden, mask, cfg.router_pooling).float(), dim=-1)
        scores = (h @ self.router.float().T) / cfg.router_temperature
        top = scores.topk(min(cfg.router_top_k, scores.shape[1]), dim=-1)
        weights = torch.zeros_like(scores).scatter(1, top.indices, top.values.softmax(-1))
        return weights

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MixtureCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Log of the routed mixture of the experts' next-token distributions; the cache also
        as `past_key_values` (the name before transformers 5.24). A cache that is not a
        `MixtureCache` (generate makes a plain one) is replaced, before anything is in it."""
        if input_ids is None:
            raise ValueError("a mixture routes on token ids: pass input_ids")
        legacy = kwargs.pop("past_key_values", None)
        cache = legacy if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not isinstance(cache, MixtureCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("a mixture continues only from the MixtureCache it returned")
            cache = MixtureCache(len(self.experts)) if use_cache else None
        shared = {
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": use_cache,
            "logits_to_keep": logits_to_keep,
            **kwargs,
        }
        outputs: dict[int, torch.Tensor] = {}
        routing = cache.routing if cache is not None else None
        if routing is None:
            first = self._run(0, input_ids, cache, shared, hidden=True)
            outputs[0] = first.logits
            mask = attention_mask
            if mask is None:
                pad = self.config.pad_token_id
                mask = input_ids != pad if pad is not None else torch.ones_like(input_ids)
            routing = self.route(first.hidden_states[self.config.router_layer], mask)
            if cache is not None:
                cache.routing = routing
        for e in routing.any(0).nonzero().flatten().tolist():
            if e not in outputs:
                outputs[e] = self._run(e, input_ids, cache, shared).logits
        logits = torch.stack(
            [
                F.log_softmax(outputs[e].float(), -1) + routing[:, e, None, None].log()
                for e in sorted(outputs)
            ]
        ).logsumexp(0)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE_FIELD: cache})

    def _run(
        self,
        e: int,
        input_ids: torch.Tensor,
        cache: MixtureCache | None,
        shared: Mapping[str, Any],
        hidden: bool = False,
    ) -> Any:
        """Expert e's forward on the whole batch, with its own slot of the mixture's cache."""
        expert = self.experts[e]
        past = None if cache is None else cache.caches[e]
        out = expert(
            input_ids=input_ids,
            output_hidden_states=hidden,
            **{cache_keyword(expert.forward): past},
            **shared,
        )
        if cache is not None:
            cache.caches[e] = output_cache(out)
        return out


def gates(model: PreTrainedModel, mixture: Mixture, tokenizer: Any) -> torch.Tensor:
    """[E, H] unit gate vectors: expert e's prompts through `model`, hidden state at
    `mixture.layer`, pooled per prompt, averaged, normalised; then, with `train_steps`, the
    router alone trained to send each prompt to its own expert."""
    device = next(model.parameters()).device
    states, labels = [], []
    with torch.inference_mode():
        for e, prompts in enumerate(mixture.prompts):
            for text in prompts:
                ids = torch.tensor([tokenizer(text)["input_ids"]], device=device)
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
                states.append(pooled(hidden[mixture.layer], torch.ones_like(ids), mixture.pooling))
                labels.append(e)
    h = F.normalize(torch.cat(states).float(), dim=-1)
    y = torch.tensor(labels, device=device)
    centroids = torch.stack([h[y == e].mean(0) for e in range(len(mixture.experts))])
    g = F.normalize(centroids, dim=-1)
    if mixture.train_steps:
        g = _train_router(h, y, g, mixture)
    return g.to(model.dtype)


def _train_router(
    h: torch.Tensor, y: torch.Tensor, g: torch.Tensor, mixture: Mixture
) -> torch.Tensor:
    """Router-only training from the centroid gates: full-batch Adam on the cross-entropy of
    routing each prompt's state to its expert, at the mixture's temperature (a few hundred
    prompts and E x H weights: deterministic, and seconds even at 7B's hidden size)."""
    gate = g.clone().requires_grad_(True)
    opt = torch.optim.Adam([gate], lr=mixture.train_lr)
    with torch.enable_grad():
        for _ in range(mixture.train_steps):
            opt.zero_grad()
            scores = h @ F.normalize(gate, dim=-1).T / mixture.temperature
            F.cross_entropy(scores, y).backward()
            opt.step()
    return F.normalize(gate.detach(), dim=-1)


def mix(
    mixture: Mixture,
    merged: PreTrainedModel | None,
    loaded: Mapping[str, PreTrainedModel],
    tokenizer: Any,
) -> MixtureForCausalLM:
    """The mixture model of `mixture`: `@merge` is the resident weight merge, other refs
    `loaded`."""
    models = []
    for ref in mixture.experts:
        model = merged if ref == MERGED else loaded.get(ref)
        if model is None:
            raise ValueError(f"mixture.experts: {ref!r} is not loaded")
        models.append(model)
    return MixtureForCausalLM.from_models(mixture, models, tokenizer)
