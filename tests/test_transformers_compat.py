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


def test_a_tokenizer_folder_saved_by_transformers_5_loads_under_any_version(tmp_path):
    # transformers 5 writes "tokenizer_class": "TokenizersBackend" (e.g. into the default model's cache,
    # shared by every environment); 4.x does not know that class and reads the folder's tokenizer.json.
    import json

    from align_decode.models import load_tokenizer
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer(64)
    tok.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config_file.write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert loaded("w1 w2 w3")["input_ids"] == tok("w1 w2 w3")["input_ids"]
    assert "token_type_ids" not in loaded("w1 w2 w3")  # as transformers 5 loads it: model.generate() takes it
    assert loaded.eos_token == tok.eos_token and loaded.pad_token == tok.pad_token
