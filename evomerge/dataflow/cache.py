"""The KV cache as one hop of a path sees it.

A decoder layer's attention writes to `past_key_values.update(k, v, self.layer_idx)`, its
own index in its source model. On a path a layer can run several times (and layer 3 of A
and layer 3 of B share an index), so keying the cache by that index would mix the keys and
values of different hops. Each hop gets a `HopCache` instead: the same cache, with every
write redirected to the hop's own slot. The shared layer modules stay untouched, so A and B
keep working as models of their own.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class HopCache:
    """`cache` seen by hop `hop`: `update` writes slot `hop`, whatever `layer_idx` says.

    Only `update` is offered: an attention module that asks the cache anything else fails
    loudly instead of reading another hop's slot.
    """

    def __init__(self, cache: Cache, hop: int) -> None:
        self.cache, self.hop = cache, hop

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(key_states, value_states, self.hop, *args, **kwargs)
