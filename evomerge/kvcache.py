"""Where transformers takes and returns the KV cache, read off its own signatures.

transformers 5.24 renamed the cache keyword of every model, decoder layer and mask function
from `past_key_values` to `cache`, and keeps the old name only as a deprecated alias that loses
to the new one when both are given. Code that passes a cache by a hard-coded name breaks
silently on such a rename (a wrapped cache is dropped for the caller's), so evomerge asks each
callable for its `Cache`-annotated parameter instead, and fails loudly when it has none.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast


@functools.cache
def _keyword(fn: Callable[..., Any]) -> str:
    for name, param in inspect.signature(fn).parameters.items():
        if "Cache" in str(param.annotation):
            return name
    raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes no KV cache (no Cache parameter)")


def cache_keyword(fn: Callable[..., Any]) -> str:
    """The name of `fn`'s KV cache parameter (`cache` or `past_key_values`, by transformers)."""
    return _keyword(getattr(fn, "__func__", fn))  # one entry per function, not per bound method


# The field of a causal LM's output that carries the cache, by the same rule.
OUTPUT_CACHE_FIELD = next(
    f.name for f in dataclasses.fields(CausalLMOutputWithPast) if "Cache" in str(f.type)
)


def output_cache(output: Any) -> Any:
    """The KV cache a causal LM returned, whatever transformers calls it."""
    return getattr(output, OUTPUT_CACHE_FIELD)
