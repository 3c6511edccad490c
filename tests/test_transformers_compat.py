"""The transformers compatibility point: the KV cache is passed and read under the installed name."""

import logging
import warnings
from types import SimpleNamespace

import torch

from align_decode.decoding import ModelSession
from align_decode.transformers_compat import _library_name, cache_kwarg, forward_with_cache, output_cache
from tiny import tiny_llama


class _Takes(torch.nn.Module):
    """A stand-in model whose forward takes the cache under one name and echoes it back."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, input_ids, **kwargs):
        assert set(kwargs) == {self.name, "use_cache"}, kwargs
        return SimpleNamespace(logits=None, **{self.name: kwargs[self.name]})


class NewName(_Takes):
    def forward(self, input_ids, cache=None, use_cache=False):
        return super().forward(input_ids, cache=cache, use_cache=use_cache)


class OldName(_Takes):
    def forward(self, input_ids, past_key_values=None, use_cache=False):
        return super().forward(input_ids, past_key_values=past_key_values, use_cache=use_cache)


class OnlyKwargs(_Takes):
    pass


def test_the_cache_goes_in_and_comes_out_under_the_models_own_name():
    marker = object()
    for model in (NewName("cache"), OldName("past_key_values"), OnlyKwargs(_library_name())):
        assert cache_kwarg(model) == model.name
        _, cache = forward_with_cache(model, marker, input_ids=None)
        assert cache is marker


def test_output_cache_reads_either_name():
    marker = object()
    assert output_cache(SimpleNamespace(cache=marker)) is marker
    assert output_cache(SimpleNamespace(past_key_values=marker)) is marker


def test_a_real_model_is_called_without_any_deprecated_cache_name(caplog):
    """The installed transformers gets the name it wants: no deprecation warning and no BC log line."""
    model = tiny_llama()
    session = ModelSession(model)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("always")
        session.prefill(torch.tensor([[3, 7, 9]]))
        session.step(torch.tensor([11]))
    deprecated = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    deprecated += [r.getMessage() for r in caplog.records if "past_key_values" in r.getMessage()]
    assert not deprecated, deprecated
    assert cache_kwarg(model) == _library_name()
