"""ARGS through AlignedModel.generate(): s(v) = log p(v) + w * r(prefix + v) on the policy's top-k,
greedy and sampled, checked step by step against the formula recomputed from scratch."""

import types

import pytest
import torch

from align_decode import ARGS, AlignedModel, ScalarValueModel
from align_decode.rewards import CallableReward
from test_controlled import ConstantIds, policy_logprobs, scalar_value, tiny_value_head
from tiny import EOS, PAD, tiny_tokenizer
from tiny import tiny_llama64 as tiny_llama



class IdsReward:
    """r(x, y) from token ids: depends on the prompt, the response and its length; counts its calls."""

    name = "ids"

    def __init__(self):
        self.calls = []

    @staticmethod
    def value(prompt, completion):
        return float((sum(completion) * 7 + len(prompt) + 3 * len(completion)) % 11) / 4

    def score_ids(self, prompt_ids, completion_ids):
        self.calls.append(len(completion_ids))
        return torch.tensor([self.value(p, c) for p, c in zip(prompt_ids, completion_ids)])


def _prompts():
    ids = torch.tensor([[PAD, PAD, 7, 8, 9], [6, 10, 11, 12, 13]])
    return ids, (ids != PAD).long()


def _args_scores(policy, prompt, gen, k, w, reward):
    """(top-k token ids, s(v) = log p(v) + w * r(prefix + v)) at the prefix prompt + gen."""
    logp = policy_logprobs(policy, torch.cat([prompt, gen]))
    top = logp.topk(k).indices
    r = torch.tensor([reward(prompt.tolist(), gen.tolist() + [int(v)]) for v in top], dtype=torch.float32)
    return top, logp[top] + w * r


def _walk(out, ids, mask, eos=(EOS,)):
    width = ids.shape[1]
    for row in range(out.sequences.shape[0]):
        prompt, gen = ids[row][mask[row].bool()], out.sequences[row, width:]
        for t in range(gen.shape[0]):
            if t > 0 and int(gen[t - 1]) in eos:
                break
            yield row, t, prompt, gen


@pytest.mark.parametrize("k,w,tau", [(10, 1.5, 0.7), (4, -2.0, 1.0)])
def test_sampled_step_law_is_softmax_of_scores_over_tau(k, w, tau):
    policy = tiny_llama(64, seed=31)
    ids, mask = _prompts()
    reward = IdsReward()
    out = AlignedModel(policy, strategy=ARGS(reward, weight=w, k=k)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=tau, seed=[3, 4],
        return_dict_in_generate=True, output_scores=True)
    for row, t, prompt, gen in _walk(out, ids, mask):
        top, s = _args_scores(policy, prompt, gen[:t], k, w, IdsReward.value)
        want = torch.full((64,), float("-inf"))
        want[top] = torch.log_softmax(s / tau, -1)
        torch.testing.assert_close(out.scores[t][row], want, atol=1e-5, rtol=0)
    # One reward call per step, all rows' k candidates in it.
    assert reward.calls[0] == 2 * k and len(reward.calls) == len(out.scores)


def test_greedy_takes_the_argmax_of_the_scores():
    policy = tiny_llama(64, seed=32)
    ids, mask = _prompts()
    seqs = AlignedModel(policy, strategy=ARGS(IdsReward(), weight=3.0, k=6)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True)
    for row, t, prompt, gen in _walk(seqs, ids, mask):
        top, s = _args_scores(policy, prompt, gen[:t], 6, 3.0, IdsReward.value)
        assert int(gen[t]) == int(top[s.argmax()])
    base = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert not torch.equal(seqs.sequences, base)  # the reward does steer


def test_weight_zero_or_one_candidate_gives_the_policy():
    policy = tiny_llama(64, seed=33)
    ids, mask = _prompts()
    greedy = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    args = ARGS(IdsReward(), weight=0.0, k=5)
    assert torch.equal(AlignedModel(policy, strategy=args).generate(input_ids=ids, attention_mask=mask,
                                                                    max_new_tokens=8), greedy)
    # k = 1: the only candidate is the policy's argmax, whatever w, even when sampling.
    one = AlignedModel(policy, strategy=ARGS(IdsReward(), weight=5.0, k=1)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=2.0, seed=[1, 2])
    assert torch.equal(one, greedy)
    # EngineOutput with w = 0: top-k sampling from the tempered policy.
    out = AlignedModel(policy, strategy=args).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, temperature=0.7, seed=[1, 2],
        return_dict_in_generate=True, output_scores=True)
    for row, t, prompt, gen in _walk(out, ids, mask):
        logp = policy_logprobs(policy, torch.cat([prompt, gen[:t]]))
        top = logp.topk(5).indices
        want = torch.full((64,), float("-inf"))
        want[top] = torch.log_softmax(logp[top] / 0.7, -1)
        torch.testing.assert_close(out.scores[t][row], want, atol=1e-5, rtol=0)


def test_text_reward_reads_the_prompt_and_the_partial_response():
    tok = tiny_tokenizer(64)
    policy = tiny_llama(64, seed=34)
    seen = []

    def reward(prompt, completion):
        seen.append((prompt, completion))
        return float(completion.count("w1")) - 0.1 * len(completion.split())

    ids, mask = _prompts()
    out = AlignedModel(policy, tokenizer=tok, strategy=ARGS(CallableReward(reward), weight=2.0, k=3)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=True, seed=[5, 6], eos_token_id=[],
        return_dict_in_generate=True, output_scores=True)
    assert seen[0][0] == tok.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
    assert len(seen) == 3 * 2 * 3  # steps * rows * k
    for row, t, prompt, gen in _walk(out, ids, mask, eos=()):
        top, s = _args_scores(policy, prompt, gen[:t], 3, 2.0,
                              lambda p, c: reward("", tok.decode(c, skip_special_tokens=True)))
        want = torch.full((64,), float("-inf"))
        want[top] = torch.log_softmax(s, -1)
        torch.testing.assert_close(out.scores[t][row], want, atol=1e-5, rtol=0)


def test_cached_reward_model_gives_the_same_scores_as_scoring_from_scratch():
    policy, head = tiny_llama(64, seed=35), tiny_value_head(64, seed=36)
    ids, mask = _prompts()
    rm = ScalarValueModel(head)
    uncached = types.SimpleNamespace(name="uncached", score_ids=rm.score_ids)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, seed=[1, 2],
              return_dict_in_generate=True, output_scores=True, eos_token_id=[1, 20, 30], pad_token_id=PAD)
    a = AlignedModel(policy, strategy=ARGS(rm, weight=1.5, k=4)).generate(**kw)
    b = AlignedModel(policy, strategy=ARGS(uncached, weight=1.5, k=4)).generate(**kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    # and both are the formula with the pooled model from scratch
    for row, t, prompt, gen in _walk(a, ids, mask, eos=(1, 20, 30)):
        top, s = _args_scores(policy, prompt, gen[:t], 4, 1.5,
                              lambda p, c: scalar_value(head, torch.tensor(p + c)))
        want = torch.full((64,), float("-inf"))
        want[top] = torch.log_softmax(s, -1)
        torch.testing.assert_close(a.scores[t][row], want, atol=1e-5, rtol=0)


def test_official_no_eos_stop_writes_max_new_tokens():
    policy = tiny_llama(64, seed=37)
    ids, mask = _prompts()
    # A stop id the greedy ARGS path hits early (its first token), so stopping is visible.
    first = AlignedModel(policy, strategy=ARGS(IdsReward(), k=5)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=1, eos_token_id=[])[0, -1]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=int(first), pad_token_id=PAD,
              return_dict_in_generate=True)
    stops = AlignedModel(policy, strategy=ARGS(IdsReward(), k=5)).generate(**kw)
    runs = AlignedModel(policy, strategy=ARGS(IdsReward(), k=5, stop_at_eos=False)).generate(**kw)
    assert int(stops.alignment["lengths"][0]) == 1 and bool(stops.alignment["stopped"][0])
    assert runs.alignment["lengths"].tolist() == [6, 6] and not bool(runs.alignment["stopped"].any())
    assert torch.equal(runs.sequences[0, :6], stops.sequences[0, :6])


def test_weights_per_call():
    policy = tiny_llama(64, seed=38)
    ids, mask = _prompts()
    args = ARGS(IdsReward(), weight=0.0, k=6)
    aligned = AlignedModel(policy, strategy=args)
    out = aligned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, strategy=args.with_weights([3.0]))
    assert torch.equal(out, AlignedModel(policy, strategy=ARGS(IdsReward(), weight=3.0, k=6)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6))
    assert not torch.equal(out, aligned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6))


@pytest.mark.parametrize("kwargs,msg", [
    ({"k": 0}, "k must be an integer >= 1"),
    ({"weight": float("nan")}, "weight must be a finite"),
    ({"weight": float("inf")}, "weight must be a finite"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ARGS(IdsReward(), **kwargs)
    with pytest.raises(ValueError, match="one reward weight"):
        ARGS(IdsReward()).with_weights([1.0, 2.0])


def test_bad_input_at_generation():
    policy = tiny_llama(64)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="k=65 is larger than the vocabulary"):
        AlignedModel(policy, strategy=ARGS(IdsReward(), k=65)).generate(input_ids=ids, attention_mask=mask,
                                                                      max_new_tokens=2)
    with pytest.raises(ValueError, match="non-finite"):
        AlignedModel(policy, strategy=ARGS(ConstantIds(float("inf")))).generate(input_ids=ids, attention_mask=mask,
                                                                              max_new_tokens=2)
    with pytest.raises(ValueError, match="NaN"):
        AlignedModel(policy, strategy=ARGS(ConstantIds(float("nan")))).generate(input_ids=ids, attention_mask=mask,
                                                                              max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer is needed"):
        AlignedModel(policy, strategy=ARGS(CallableReward(lambda p, c: 0.0))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)
