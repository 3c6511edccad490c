"""Process rewards: a PRM folder read at its step markers (three head kinds) against a direct reading of
the model, causality of step scores, sequence rewards and value models on prefixes, aggregation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaForTokenClassification

from align_decode.rewards import CallableReward
from align_decode.rewards.process import (PartialResponse, PrefixReward, TransformersPRM, ValuePRM,
                                          aggregate_scores)
from tiny import tiny_llama, tiny_tokenizer

VOCAB = 32
PROMPT, STEPS, MARKER = "w1 w2", ["w3 w4", "w5", "w6 w7 w8"], " w9"
TEXT = "w1 w2 w3 w4 w9 w5 w9 w6 w7 w8 w9"  # the same input written out: the markers are tokens 4, 6, 10


def _config(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, **kw)


def _direct(model, tok):
    ids = tok(TEXT, return_tensors="pt").input_ids
    marker = tok.convert_tokens_to_ids("w9")
    positions = (ids[0] == marker).nonzero().flatten()
    return model(input_ids=ids), positions


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(VOCAB)


def test_token_classification_prm_reads_the_positive_label_at_each_marker(tok):
    torch.manual_seed(0)
    model = LlamaForTokenClassification(_config(num_labels=2)).eval()
    prm = TransformersPRM(model, tok, step_marker=MARKER, prompt_separator=" ")
    out, positions = _direct(model, tok)
    expected = torch.softmax(out.logits[0, positions], -1)[:, 1]
    got = prm.step_scores([PROMPT], [STEPS])[0]
    assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert prm.score([PROMPT], [STEPS]).item() == pytest.approx(got[-1], abs=1e-6)
    # A step's score depends only on the steps up to it (the model is causal).
    assert prm.score([PROMPT], [STEPS[:2]]).item() == pytest.approx(got[1], abs=1e-5)
    assert prm.probabilities


def test_label_token_prm_reads_good_over_good_plus_bad(tok):
    model = tiny_llama(VOCAB, seed=5)
    prm = TransformersPRM(model, tok, read="label_tokens", label_tokens=("w10", "w11"), step_marker=MARKER,
                          prompt_separator=" ")
    out, positions = _direct(model, tok)
    good, bad = tok.convert_tokens_to_ids(["w10", "w11"])
    logits = out.logits[0, positions][:, [good, bad]]
    assert prm.step_scores([PROMPT], [STEPS])[0] == pytest.approx(torch.softmax(logits, -1)[:, 0].tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="must each be one token"):
        TransformersPRM(model, tok, read="label_tokens", label_tokens=("w10 w11", "w3"), step_marker=MARKER)
    with pytest.raises(ValueError, match="encodes to no token"):
        TransformersPRM(model, tok, read="label_tokens", step_marker="\n\n")


def test_sequence_head_prm_applies_the_head_at_every_marker_and_batches_like_one(tok):
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(_config(num_labels=1)).eval()
    prm = TransformersPRM(model, tok, step_marker=MARKER, prompt_separator=" ", batch_size=2)
    assert prm.read == "sequence_head" and not prm.probabilities
    ids = tok(TEXT, return_tensors="pt").input_ids
    hidden = model.model(input_ids=ids).last_hidden_state
    positions = (ids[0] == tok.convert_tokens_to_ids("w9")).nonzero().flatten()
    expected = model.score(hidden[0, positions])[:, 0]
    got = prm.step_scores([PROMPT, "w1", PROMPT], [STEPS, ["w3"], STEPS[:1]])
    assert got[0] == pytest.approx(expected.tolist(), abs=1e-5)
    assert got[2] == pytest.approx(expected[:1].tolist(), abs=1e-5)  # padded in a batch, same scores


def test_from_folder_picks_the_head_from_the_config(tmp_path, tok):
    torch.manual_seed(0)
    model = LlamaForTokenClassification(_config(num_labels=2)).eval()
    model.save_pretrained(tmp_path / "prm")
    tok.save_pretrained(tmp_path / "prm")
    prm = TransformersPRM.from_folder(tmp_path / "prm", step_marker=MARKER, prompt_separator=" ")
    assert prm.read == "token_classification"
    direct = TransformersPRM(model, tok, step_marker=MARKER, prompt_separator=" ")
    assert prm.step_scores([PROMPT], [STEPS])[0] == pytest.approx(direct.step_scores([PROMPT], [STEPS])[0])
    with pytest.raises(FileNotFoundError, match="only from a local folder"):
        TransformersPRM.from_folder(tmp_path / "missing")


def test_prefix_reward_and_value_prm():
    words = CallableReward(lambda prompt, completion: float(len(completion.split())), name="words")
    prefix = PrefixReward(words)
    assert prefix.step_scores(["q"], [["a b ", "c"]]) == [[2.0, 3.0]]
    responses = [PartialResponse(None, (None, None), (5, 6), ((7,), (8, 9)))]
    with pytest.raises(ValueError, match="reads text: the policy's tokenizer is needed"):
        prefix.score_partial(responses)

    class Value:
        name = "v"

        def score_ids(self, prompt_ids, completion_ids):
            return torch.tensor([float(sum(p) + 10 * len(c)) for p, c in zip(prompt_ids, completion_ids)])

    assert ValuePRM(Value()).score_partial(responses).tolist() == [11.0 + 30.0]
    with pytest.raises(TypeError, match="needs a value model"):
        ValuePRM(words)


def test_aggregation():
    assert aggregate_scores([0.9, 0.5, 0.8], "last") == 0.8
    assert aggregate_scores([0.9, 0.5, 0.8], "min") == 0.5
    assert aggregate_scores([0.9, 0.5, 0.8], "product") == pytest.approx(0.36)
    with pytest.raises(ValueError, match="negative step score"):
        aggregate_scores([0.5, -1.0], "product")
    with pytest.raises(ValueError, match="aggregate must be one of"):
        aggregate_scores([0.5], "mean")
