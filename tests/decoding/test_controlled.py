"""Tokenwise controlled decoding through AlignedModel.generate(): every step's law against
softmax(log p / T + sum_i w_i V_i) recomputed from scratch, for Q-head and top-k scalar value models.

The tiny models run in float64 so the forward passes add no noise: what is compared is the mix."""

import copy

import pytest
import torch
from transformers import LlamaForSequenceClassification

from align_decode import AlignedModel, QValueModel, ScalarValueModel, TokenwiseCD
from align_decode.decoding.guides import PrefixRewardGuide
from align_decode.rewards import CallableReward
from tiny import EOS, PAD, tiny_tokenizer
from tiny import tiny_llama as _tiny_llama
from tiny import tiny_llama64 as tiny_llama



class ConstantIds:
    """A prefix scorer on token ids that always says `value`."""

    name = "constant"

    def __init__(self, value):
        self.value = value

    def score_ids(self, prompt_ids, completion_ids):
        return torch.full((len(completion_ids),), self.value)


def _prompts(vocab=64):
    ids = torch.tensor([[PAD, PAD, 7, 8, 9], [6, 10, 11, 12, 13], [PAD, PAD, PAD, 20, 21]]).clamp(max=vocab - 1)
    return ids, (ids != PAD).long()


def tiny_value_head(vocab=64, seed=0):
    """A scalar value model: a tiny Llama with a one-output classification head. No pad id, so the HF
    model pools a single sequence at its last token: an independent oracle for the cached guide."""
    cfg = copy.deepcopy(_tiny_llama(vocab, seed=seed).config)
    cfg.num_labels, cfg.pad_token_id = 1, None
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(cfg).double().eval()


@torch.no_grad()
def policy_logprobs(model, seq):
    return torch.log_softmax(model(input_ids=seq[None]).logits[0, -1].float(), -1)


@torch.no_grad()
def q_values(model, seq):
    """Q(prefix, z) for every z: the Q-head's raw outputs, no normalisation."""
    return model(input_ids=seq[None]).logits[0, -1].float()


@torch.no_grad()
def scalar_value(model, seq):
    return float(model(input_ids=seq[None]).logits[0, 0])


def _rows(out, ids, mask):
    """(prompt, generated tokens) of every output row."""
    width = ids.shape[1]
    for row in range(out.sequences.shape[0]):
        yield row, ids[row][mask[row].bool()], out.sequences[row, width:]


def _check_steps(out, ids, mask, law, eos=(EOS,)):
    """Every recorded step's scores equal log_softmax(law(prefix)) until the row ends."""
    for row, prompt, gen in _rows(out, ids, mask):
        for t, s in enumerate(out.scores):
            if t > 0 and int(gen[t - 1]) in eos:
                break
            z = law(torch.cat([prompt, gen[:t]]))
            torch.testing.assert_close(s[row], torch.log_softmax(z, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("vocab,strength,temperature", [(64, 2.0, 1.0), (97, 0.7, 0.8)])
def test_q_head_step_law_is_softmax_of_logp_plus_lambda_q(vocab, strength, temperature):
    policy, q = tiny_llama(vocab, seed=1), tiny_llama(vocab, seed=2)
    ids, mask = _prompts(vocab)
    out = AlignedModel(policy, strategy=TokenwiseCD(QValueModel(q), strength=strength)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, temperature=temperature,
        seed=[1, 2, 3], return_dict_in_generate=True, output_scores=True)
    assert len(out.scores) >= 1
    _check_steps(out, ids, mask, lambda s: policy_logprobs(policy, s) / temperature + strength * q_values(q, s))


def test_several_value_models_add_linearly_and_weights_change_per_call():
    policy, q1, q2 = (tiny_llama(64, seed=s) for s in (3, 4, 5))
    ids, mask = _prompts()
    cd = TokenwiseCD([QValueModel(q1), QValueModel(q2)], weights=[0.6, -1.3])
    aligned = AlignedModel(policy, strategy=cd)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=0, seed=4,
              return_dict_in_generate=True, output_scores=True)
    out = aligned.generate(**kw)
    _check_steps(out, ids, mask, lambda s: policy_logprobs(policy, s) + 0.6 * q_values(q1, s) - 1.3 * q_values(q2, s))
    out = aligned.generate(**kw, strategy=cd.with_weights([2.0, 0.25]))
    _check_steps(out, ids, mask, lambda s: policy_logprobs(policy, s) + 2.0 * q_values(q1, s) + 0.25 * q_values(q2, s))


def test_lambda_zero_gives_the_base_policy():
    policy, q = tiny_llama(64, seed=6), tiny_llama(64, seed=7)
    ids, mask = _prompts()
    cd = TokenwiseCD(QValueModel(q), strength=0.0)
    greedy = AlignedModel(policy, strategy=cd).generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(greedy, policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
    out = AlignedModel(policy, strategy=cd).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=0, temperature=1.3, seed=0,
        return_dict_in_generate=True, output_scores=True)
    _check_steps(out, ids, mask, lambda s: policy_logprobs(policy, s) / 1.3)
    # and a strong value model does move the greedy path away from the policy's
    strong = AlignedModel(policy, strategy=cd.with_weights([50.0])).generate(input_ids=ids, attention_mask=mask,
                                                                           max_new_tokens=12)
    assert not torch.equal(strong, greedy)


def _topk_law(policy, k, temperature, value, weight):
    """log p / T + w * V(prefix + v) on the policy's top-k tokens, -inf elsewhere."""
    def law(seq):
        logp = policy_logprobs(policy, seq)
        top = logp.topk(k).indices
        z = torch.full_like(logp, float("-inf"))
        vals = torch.tensor([value(torch.cat([seq, v.reshape(1)])) for v in top], dtype=torch.float32)
        z[top] = logp[top] / temperature + weight * vals
        return z
    return law


def test_scalar_value_model_on_the_top_k_with_its_kv_cache():
    policy, head = tiny_llama(64, seed=8), tiny_value_head(64, seed=9)
    ids, mask = _prompts()
    out = AlignedModel(policy, strategy=TokenwiseCD(ScalarValueModel(head, k=5), strength=1.5)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, temperature=0.9,
        seed=[5, 6, 7], return_dict_in_generate=True, output_scores=True)
    _check_steps(out, ids, mask, _topk_law(policy, 5, 0.9, lambda s: scalar_value(head, s), 1.5))
    assert all(int(torch.isfinite(s[0]).sum()) == 5 for s in out.scores)


def test_scalar_value_model_scores_whole_prefixes_like_the_pooled_model():
    head = tiny_value_head(64, seed=10)
    model = ScalarValueModel(head)
    prompts, completions = [[7, 8], [9], [3, 4, 5]], [[10, 11, 12], [13], []]
    got = model.score_ids(prompts, completions)
    want = [scalar_value(head, torch.tensor(p + c)) for p, c in zip(prompts, completions)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=0)


def test_q_head_and_top_k_value_models_combine():
    policy, q, head = tiny_llama(64, seed=11), tiny_llama(64, seed=12), tiny_value_head(64, seed=13)
    ids, mask = _prompts()
    # A negative weight on a top-k model: -inf outside the candidates must stay -inf.
    cd = TokenwiseCD([QValueModel(q), ScalarValueModel(head, k=4)], weights=[0.5, -2.0])
    out = AlignedModel(policy, strategy=cd).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=0, seed=1,
        return_dict_in_generate=True, output_scores=True)
    topk = _topk_law(policy, 4, 1.0, lambda s: scalar_value(head, s), -2.0)
    _check_steps(out, ids, mask, lambda s: topk(s) + 0.5 * q_values(q, s))


def test_prefix_reward_guide_scores_all_candidates_in_one_text_call_per_step():
    tok = tiny_tokenizer(64)
    policy = tiny_llama(64, seed=14)
    calls = []

    def reward(prompts, completions):
        calls.append((list(prompts), list(completions)))
        # Rewards text: how many of the words have an even number in them.
        return [float(sum(int(w[1:]) % 2 == 0 for w in c.split())) for c in completions]

    ids, mask = _prompts()
    cd = TokenwiseCD(PrefixRewardGuide(CallableReward(reward, batched=True), k=3), strength=0.8)
    out = AlignedModel(policy, tokenizer=tok, strategy=cd).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=0, seed=2,
        return_dict_in_generate=True, output_scores=True, eos_token_id=[])
    assert len(calls) == len(out.scores) == 4
    assert all(len(c) == 3 * 3 for _, c in calls)  # B * k pairs per call
    assert calls[0][0][0] == tok.decode(ids[0][mask[0].bool()], skip_special_tokens=True)

    for row, prompt, gen in _rows(out, ids, mask):
        for t, s in enumerate(out.scores):
            prefix = torch.cat([prompt, gen[:t]])
            logp = policy_logprobs(policy, prefix)
            top = logp.topk(3).indices
            r = [reward([""], [tok.decode(torch.cat([gen[:t], v.reshape(1)]), skip_special_tokens=True)])[0]
                 for v in top]
            z = torch.full_like(logp, float("-inf"))
            z[top] = logp[top] + 0.8 * torch.tensor(r)
            torch.testing.assert_close(s[row], torch.log_softmax(z, -1), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- bad input
def test_k_larger_than_the_vocabulary_is_refused():
    policy, head = tiny_llama(64), tiny_value_head(64)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="k=65 is larger than the vocabulary"):
        AlignedModel(policy, strategy=TokenwiseCD(ScalarValueModel(head, k=65))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="k=100 is larger"):
        AlignedModel(policy, strategy=TokenwiseCD(PrefixRewardGuide(CallableReward(lambda p, c: 0.0), k=100))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)


def test_value_model_with_another_vocabulary_is_refused():
    policy = tiny_llama(64)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        AlignedModel(policy, strategy=TokenwiseCD(QValueModel(tiny_llama(80)))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        AlignedModel(policy, strategy=TokenwiseCD(ScalarValueModel(tiny_value_head(80), k=3))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)
    tok, shifted = tiny_tokenizer(64, name="policy-tok"), tiny_tokenizer(64, name="value-tok", shift=2)
    with pytest.raises(ValueError, match="value model does not share"):
        AlignedModel(policy, tokenizer=tok, strategy=TokenwiseCD(QValueModel(tiny_llama(64), shifted))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad):
    policy, q, head = tiny_llama(64), tiny_llama(64, seed=1), tiny_value_head(64)
    q.lm_head.bias = torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
    q.lm_head.bias.data[9] = bad
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="non-finite"):
        AlignedModel(policy, strategy=TokenwiseCD(QValueModel(q))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)
    head.score.weight.data[:] = bad
    with pytest.raises(ValueError, match="non-finite"):
        AlignedModel(policy, strategy=TokenwiseCD(ScalarValueModel(head, k=3))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="non-finite|NaN"):
        AlignedModel(policy, strategy=TokenwiseCD(PrefixRewardGuide(ConstantIds(bad), k=3))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("kwargs,err,msg", [
    ({"strength": float("nan")}, ValueError, "strength must be a finite"),
    ({"weights": [1.0, 2.0]}, ValueError, "weights has 2 value"),
    ({"strength": 1.0, "weights": [1.0]}, ValueError, "either strength"),
])
def test_bad_arguments(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        TokenwiseCD(QValueModel(tiny_llama(64)), **kwargs)
    with pytest.raises(TypeError, match="value_models must be"):
        TokenwiseCD(object())
    with pytest.raises(ValueError, match="k .* must be an integer >= 1"):
        ScalarValueModel(tiny_value_head(64), k=0)
    with pytest.raises(TypeError, match="sequence-classification"):
        ScalarValueModel(tiny_llama(64))
