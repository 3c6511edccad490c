"""The one place that knows how the installed transformers names a model's KV cache.

transformers 5.2x renamed the forward argument and output field `past_key_values` to `cache` (the old
name warns, and is removed in 5.40); older releases, and the transformers that vLLM's CPU build pins,
know only `past_key_values`. Every cached forward pass of the package goes through `forward_with_cache`,
so nothing else needs to know which name is current.

The name is chosen per model class from its forward signature (a custom or remote-code model may lag
behind the library), and by the installed library's own output classes when the signature only takes
`**kwargs`.
"""

from __future__ import annotations

import dataclasses
import inspect

NEW, OLD = "cache", "past_key_values"
_KWARG_BY_CLASS: dict[type, str] = {}


def _library_name() -> str:
    """The installed transformers' own name, read from its causal-LM output class."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return NEW if NEW in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else OLD


def cache_kwarg(model) -> str:
    """`cache` or `past_key_values`: the name under which `model.forward` takes a KV cache."""
    cls = type(model)
    if cls not in _KWARG_BY_CLASS:
        params = inspect.signature(model.forward).parameters  # follows decorators' __wrapped__
        if NEW in params:
            _KWARG_BY_CLASS[cls] = NEW
        elif OLD in params:
            _KWARG_BY_CLASS[cls] = OLD
        else:
            _KWARG_BY_CLASS[cls] = _library_name()
    return _KWARG_BY_CLASS[cls]


def output_cache(output):
    """The KV cache a forward pass returned, under whichever name its output carries."""
    try:
        return output.cache
    except AttributeError:
        return getattr(output, OLD, None)


def forward_with_cache(model, cache, **inputs):
    """`model(**inputs, <cache name>=cache, use_cache=True)` -> (output, the cache it returned)."""
    output = model(**inputs, **{cache_kwarg(model): cache}, use_cache=True)
    return output, output_cache(output)
