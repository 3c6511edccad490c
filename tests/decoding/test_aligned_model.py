"""AlignedModel.generate() as a drop-in for model.generate(): arguments, return types, stopping, seeds."""

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from align_decode import AlignedModel, Sample
from align_decode.decoding import left_pad
from tiny import EOS, PAD, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_llama(64, seed=31)


def _batch():
    return left_pad([[5, 6, 7], [8, 9, 10, 11, 12], [13]], PAD)


def test_returns_a_long_tensor_like_model_generate(model):
    ids, mask = _batch()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7)
    out = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=7)
    assert out.dtype == torch.long and torch.equal(out, ref)
    # Positional `inputs` and a bare **inputs dict work unchanged.
    assert torch.equal(AlignedModel(model).generate(ids, attention_mask=mask, max_new_tokens=7), ref)
    assert torch.equal(AlignedModel(model).generate(**{"input_ids": ids, "attention_mask": mask}, max_new_tokens=7), ref)


def test_dict_output_with_scores(model):
    ids, mask = _batch()
    out = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True,
                                       return_dict_in_generate=True, output_scores=True, seed=1)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert isinstance(out.scores, tuple) and len(out.scores) == 4 and out.scores[0].shape == (3, 64)
    # scores are log-probs of the law drawn from: each row sums to one; top_k=50 (transformers' default) masks 14.
    torch.testing.assert_close(out.scores[0].exp().sum(-1), torch.ones(3))
    assert int(torch.isinf(out.scores[0][0]).sum()) == 64 - 50
    drawn = out.sequences[:, ids.shape[1]]
    assert bool(torch.isfinite(out.scores[0].gather(1, drawn[:, None])).all())
    no_scores = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                                             return_dict_in_generate=True)
    assert no_scores.scores is None


def test_generation_config_and_max_length(model):
    ids, mask = _batch()
    cfg = GenerationConfig(max_new_tokens=3, do_sample=False)
    assert AlignedModel(model).generate(input_ids=ids, attention_mask=mask, generation_config=cfg).shape[1] == 5 + 3
    assert AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_length=9).shape[1] == 9
    # Keyword arguments override the config.
    assert AlignedModel(model).generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                        max_new_tokens=1).shape[1] == 6


def test_stops_at_any_of_several_eos_ids_and_pads(model):
    ids, mask = _batch()
    free = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    gen = free[:, ids.shape[1]:]
    stops = [int(gen[0, 2]), int(gen[1, 4])]
    out = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=stops,
                                       pad_token_id=63)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=stops, pad_token_id=63)
    assert torch.equal(out, ref)
    row0 = out[0, ids.shape[1]:].tolist()
    first = min(i for i, t in enumerate(row0) if t in stops)
    assert all(t == 63 for t in row0[first + 1:])


def test_num_return_sequences_layout_and_distinct_samples(model):
    ids, mask = _batch()
    out = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                       num_return_sequences=4, seed=[1, 2, 3], eos_token_id=[])
    assert out.shape[0] == 12
    assert torch.equal(out[:, :5], ids.repeat_interleave(4, dim=0))
    assert len({tuple(r) for r in out[:4, 5:].tolist()}) > 1
    greedy = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                          num_return_sequences=2)
    single = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(greedy, single.repeat_interleave(2, dim=0))


def test_a_prompt_gives_the_same_sample_alone_or_in_any_batch(model):
    ids, mask = _batch()
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.3, top_p=0.95, eos_token_id=[])
    together = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, seed=[10, 20, 30], **kw)
    for b, (seed, prompt) in enumerate(zip([10, 20, 30], [[5, 6, 7], [8, 9, 10, 11, 12], [13]])):
        alone = AlignedModel(model).generate(input_ids=torch.tensor([prompt]), seed=seed, **kw)
        assert alone[0, -8:].tolist() == together[b, -8:].tolist()
    # Reordered batch, same seeds per prompt.
    order = torch.tensor([2, 0, 1])
    shuffled = AlignedModel(model).generate(input_ids=ids[order], attention_mask=mask[order], seed=[30, 10, 20], **kw)
    assert torch.equal(shuffled[:, -8:], together[order, -8:])
    # Without a seed, torch's global RNG decides, as with model.generate().
    torch.manual_seed(0)
    a = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(0)
    b = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(a, b)


def test_mixed_length_batch_equals_one_by_one_greedy(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    ids, mask = left_pad(prompts, PAD)
    batch = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    for b, p in enumerate(prompts):
        single = AlignedModel(model).generate(input_ids=torch.tensor([p]), max_new_tokens=12)
        assert single[0, len(p):].tolist() == batch[b, 5:].tolist()


class _Recorder(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_each_token(model):
    ids = torch.tensor([[5, 6, 7]])
    rec = _Recorder()
    out = AlignedModel(model).generate(input_ids=ids, max_new_tokens=5, streamer=rec, eos_token_id=[])
    assert rec.ended and torch.equal(rec.chunks[0], ids)
    assert torch.cat([c.flatten() for c in rec.chunks[1:]]).tolist() == out[0, 3:].tolist()


@pytest.mark.parametrize("kwargs,msg", [
    ({"num_beams": 2}, "num_beams"),
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "top_p": 0.0}, "top_p"),
    ({"logits_processor": [lambda i, s: s]}, "logits_processor"),
    ({"inputs_embeds": torch.zeros(1, 2, 64)}, "inputs_embeds"),
    ({"num_return_sequences": 0}, "num_return_sequences"),
    ({"eos_token_id": 999}, "outside the vocabulary"),
])
def test_arguments_it_cannot_honour_are_errors(model, kwargs, msg):
    ids, mask = _batch()
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=msg):
        AlignedModel(model).generate(input_ids=ids, attention_mask=mask, **kwargs)


def test_neutral_values_of_unsupported_arguments_are_accepted(model):
    ids, mask = _batch()
    out = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=1,
                                       repetition_penalty=1.0, use_cache=True)
    assert out.shape == (3, 7)


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="empty prompt"):
        AlignedModel(model).generate(input_ids=torch.tensor([[PAD, 5], [PAD, PAD]]),
                                     attention_mask=torch.tensor([[0, 1], [0, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="length >= 1"):
        AlignedModel(model).generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_max_new_tokens_zero_returns_the_prompt(model):
    ids, mask = _batch()
    assert torch.equal(AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=0), ids)


def test_wrapper_passes_through_model_attributes(model):
    aligned = AlignedModel(model, tokenizer=tiny_tokenizer(64), strategy=Sample())
    assert aligned.config is model.config and aligned.device == model.device
    ids = torch.tensor([[5, 6]])
    torch.testing.assert_close(aligned(input_ids=ids).logits, model(input_ids=ids).logits)


def test_eos_from_tokenizer_and_model_config(model):
    tok = tiny_tokenizer(64)
    ids = torch.tensor([[5, 6]])
    out = AlignedModel(model, tokenizer=tok).generate(input_ids=ids, max_new_tokens=30, do_sample=True, seed=4,
                                                      return_dict_in_generate=True)
    lengths = out.alignment["lengths"]
    stopped = out.alignment["stopped"]
    if bool(stopped[0]):
        assert out.sequences[0, 2 + int(lengths[0]) - 1] == EOS


def test_all_zero_token_type_ids_from_a_tokenizer_are_accepted(model):
    # transformers 4.x tokenizers built on PreTrainedTokenizerFast return all-zero token_type_ids by
    # default, so generate(**tok(...)) passes them: one segment, nothing changes for a decoder-only model.
    tok = tiny_tokenizer(64)
    inputs = tok(["w1 w2 w3", "w4"], return_tensors="pt", padding=True, return_token_type_ids=True)
    assert "token_type_ids" in inputs and not bool(inputs["token_type_ids"].any())
    kwargs = {"max_new_tokens": 4, "do_sample": True, "seed": 3}
    ref = AlignedModel(model, tokenizer=tok).generate(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"], **kwargs)
    assert torch.equal(AlignedModel(model, tokenizer=tok).generate(**inputs, **kwargs), ref)
    ids, mask = _batch()
    out = AlignedModel(model).generate(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                                       max_new_tokens=3)
    assert torch.equal(out, AlignedModel(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=3))


def test_token_type_ids_that_would_change_the_output_are_refused(model):
    ids, mask = _batch()
    segments = torch.zeros_like(ids)
    segments[0, -1] = 1
    with pytest.raises(ValueError, match="token_type_ids with a non-zero segment id is not supported"):
        AlignedModel(model).generate(input_ids=ids, attention_mask=mask, token_type_ids=segments, max_new_tokens=2)
    with pytest.raises(ValueError, match="token_type_ids must have input_ids' shape"):
        AlignedModel(model).generate(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros(3, 2),
                                     max_new_tokens=2)
    # GPT-2's forward embeds segment ids (even zeros shift its output), so dropping them is not a no-op.
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    with pytest.raises(ValueError, match="GPT2LMHeadModel: its forward embeds segment ids"):
        AlignedModel(gpt2).generate(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                                    max_new_tokens=2)
