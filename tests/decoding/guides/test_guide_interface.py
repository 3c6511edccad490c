"""The guide interface: a new token-level method is one module (the README's worked example,
examples/token_bonus.py), and the loop draws from exactly the mix it declares."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from align_decode import AlignedModel
from align_decode.decoding.guides import Guide, GuideContext
from align_decode.decoding.guides.base import as_guides
from tiny import EOS, PAD, tiny_llama64, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "token_bonus.py"


def _example():
    spec = importlib.util.spec_from_file_location("token_bonus_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_shows_the_example_module_as_it_is():
    assert EXAMPLE.read_text().strip() in (ROOT / "README.md").read_text()


def test_the_example_method_draws_from_the_mix_it_declares():
    example = _example()
    model, tok = tiny_llama64(seed=7), tiny_tokenizer()
    ids, bonus, weight, temperature = [10, 11, 12], 1.5, 2.0, 0.8
    strategy = example.KeywordSteer(ids, bonus=bonus, weight=weight)
    prompt = torch.tensor([[3, 20, 21], [PAD, 3, 22]])
    out = AlignedModel(model, tokenizer=tok, strategy=strategy).generate(
        input_ids=prompt, attention_mask=(prompt != PAD).long(), max_new_tokens=5, do_sample=True,
        temperature=temperature, top_k=0, eos_token_id=EOS, pad_token_id=PAD, seed=[1, 2], output_scores=True,
        return_dict_in_generate=True)
    mask = torch.zeros(64, dtype=torch.float64)
    mask[ids] = 1.0
    for row in range(2):
        given = prompt[row][prompt[row] != PAD]
        generated = out.sequences[row, prompt.shape[1]:]
        for t, scores in enumerate(out.scores):
            if t > 0 and generated[t - 1] in (EOS, PAD):
                break
            context = torch.cat([given, generated[:t]]).unsqueeze(0)
            logits = model(input_ids=context).logits[0, -1].double()
            expected = torch.log_softmax(torch.log_softmax(logits, -1) / temperature + weight * bonus * mask, -1)
            torch.testing.assert_close(scores[row].double(), expected, atol=1e-5, rtol=0)
    # Weight 0 gives the policy back: the same draws as plain sampling.
    plain = AlignedModel(model, tokenizer=tok).generate(
        input_ids=prompt, attention_mask=(prompt != PAD).long(), max_new_tokens=5, do_sample=True,
        temperature=temperature, eos_token_id=EOS, pad_token_id=PAD, seed=[1, 2])
    off = AlignedModel(model, tokenizer=tok, strategy=example.KeywordSteer(ids, bonus=bonus, weight=0.0)).generate(
        input_ids=prompt, attention_mask=(prompt != PAD).long(), max_new_tokens=5, do_sample=True,
        temperature=temperature, eos_token_id=EOS, pad_token_id=PAD, seed=[1, 2])
    assert torch.equal(plain, off)


def test_guides_must_implement_the_interface():
    class Partial(Guide):
        def width_for(self, policy_model, policy_tokenizer):
            return 64

    with pytest.raises(TypeError, match="abstract"):
        Partial()
    with pytest.raises(TypeError, match="must be Guide objects"):
        as_guides([object()], "GenARM arms")
    with pytest.raises(ValueError, match="at least one"):
        as_guides([], "GenARM arms")
    assert GuideContext.__dataclass_fields__.keys() >= {"batch", "width", "settings", "seeds", "tokenizer",
                                                        "policy_session"}
