"""Transfer Q*: the per-step law against Q recomputed from scratch, rollouts on forked caches against
`model.generate` from scratch, the reductions (alpha = 0, k = 1, indirect with r = r_BL), the candidate
set, seeding, accounting and bad input.

The tiny models run in float64 so cached and from-scratch forwards agree to ~1e-12: the comparisons
test the method, not float32 noise."""

import copy
import math

import pytest
import torch

from align_decode import AlignedModel, TransferQ
from align_decode.decoding.transfer_q import q_estimate
from align_decode.rewards import SequenceReward
from tiny import EOS, PAD, tiny_tokenizer
from tiny import tiny_llama64 as tiny_llama
VOCAB = 40


class IdReward(SequenceReward):
    """A table reward keyed by token ids: r(y) = sum_t c[y_t] * 0.8^t with fixed random c, so every
    token of the rollout (and its position) changes the value."""

    name = "ids"

    def __init__(self, seed: int = 0, scale: float = 1.0, vocab: int = VOCAB):
        self.c = torch.randn(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
        self.calls = 0

    def value(self, completion) -> float:
        return float(sum(self.c[tok] * 0.8**t for t, tok in enumerate(completion)))

    def score_ids(self, prompt_ids, completion_ids):
        self.calls += 1
        return torch.tensor([self.value(c) for c in completion_ids])

    def _score(self, prompts, completions):
        raise AssertionError("reads token ids")


class ConstantReward(SequenceReward):
    name = "constant"

    def __init__(self, value):
        self.v = value

    def score_ids(self, prompt_ids, completion_ids):
        return torch.full((len(completion_ids),), self.v)

    def _score(self, prompts, completions):
        raise AssertionError("reads token ids")


@pytest.fixture(scope="module")
def models():
    return tiny_llama(VOCAB, seed=11), tiny_llama(VOCAB, seed=12)


def _prompts():
    ids = torch.tensor([[PAD, PAD, 7, 8, 9], [6, 10, 11, 12, 13]])
    return ids, (ids != PAD).long()


def _logp(model, seq):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([list(seq)])).logits[0, -1].double(), -1)


_ROLLOUTS: dict = {}


def _scratch_rollout(baseline, seq, h, stops=EOS):
    """The official pattern: model.generate from the full prefix + candidate, greedy, H tokens, EOS stop
    (memoised: several tests ask for the same rollouts)."""
    key = (id(baseline), tuple(seq), h, str(stops))
    if key not in _ROLLOUTS:
        _ROLLOUTS[key] = _generate_rollout(baseline, seq, h, stops)
    return _ROLLOUTS[key]


def _generate_rollout(baseline, seq, h, stops=EOS):
    if h == 0:
        return []
    with torch.no_grad():
        # An explicit mask: generate() would otherwise take a pad id inside the sequence for padding.
        seq_ids = torch.tensor([list(seq)])
        out = baseline.generate(input_ids=seq_ids, attention_mask=torch.ones_like(seq_ids), max_new_tokens=h,
                                do_sample=False, eos_token_id=stops, pad_token_id=PAD)
    return out[0, len(seq):].tolist()


def _rows(out, ids, mask):
    """(prompt tokens, generated tokens up to the end) per row."""
    width = ids.shape[1]
    rows = []
    for r in range(out.sequences.shape[0]):
        n = int(out.alignment["lengths"][r])
        rows.append((ids[r][mask[r].bool()].tolist(), out.sequences[r, width: width + n].tolist()))
    return rows


ALPHA, K, H, T = 1.5, 5, 4, 0.8


@pytest.fixture(scope="module")
def sampled_run(models):
    policy, baseline = models
    reward = IdReward(seed=3, scale=2.0)
    ids, mask = _prompts()
    tq = TransferQ(baseline, reward, alpha=ALPHA, k=K, rollout_len=H, trace_rollouts=True)
    out = AlignedModel(policy, strategy=tq).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=T, top_k=0,
        seed=[4, 5], return_dict_in_generate=True, output_scores=True, eos_token_id=EOS, pad_token_id=PAD)
    return out, reward, ids, mask


def test_step_law_is_softmax_of_log_prior_plus_alpha_q_from_scratch(models, sampled_run):
    policy, baseline = models
    out, reward, ids, mask = sampled_run
    moved = 0
    for row, (prompt, gen) in enumerate(_rows(out, ids, mask)):
        for t in range(len(gen)):
            prefix = prompt + gen[:t]
            logp = _logp(policy, prefix)
            top = logp.topk(K).indices
            q = torch.tensor([reward.value(gen[:t] + [c] + ([] if c == EOS else _scratch_rollout(baseline, prefix + [c], H)))
                              for c in top.tolist()], dtype=torch.float64)
            z = torch.full_like(logp, float("-inf"))
            z[top] = logp[top] / T + ALPHA * q
            expected = torch.log_softmax(z, -1)
            torch.testing.assert_close(out.scores[t][row].double(), expected, atol=1e-5, rtol=0)
            plain = torch.full_like(logp, float("-inf"))
            plain[top] = torch.log_softmax(logp[top] / T, -1)
            moved += float((expected[top] - plain[top]).abs().max()) > 0.05
    assert moved > 3  # Q really moves the law away from the truncated prior


def test_forked_cache_rollouts_equal_generate_from_scratch(models, sampled_run):
    _, baseline = models
    out, _, ids, mask = sampled_run
    checked = 0
    for row, (prompt, gen) in enumerate(_rows(out, ids, mask)):
        trace = out.alignment["trace"][row]
        assert len(trace) == len(gen)
        for t, step in enumerate(trace):
            for c, rollouts in zip(step["candidates"], step["rollouts"]):
                assert rollouts == [_scratch_rollout(baseline, prompt + gen[:t] + [c], 0 if c == EOS else H)]
                checked += 1
    assert checked == K * sum(len(g) for _, g in _rows(out, ids, mask))


def test_accounting_counts_this_calls_rollouts_and_reward_calls(sampled_run):
    out, _, ids, mask = sampled_run
    steps = sum(len(g) for _, g in _rows(out, ids, mask))
    a = out.alignment
    candidates = [c for tr in a["trace"] for s in tr for c in s["candidates"]]
    assert len(candidates) == K * steps and a["rollouts"] == sum(c != EOS for c in candidates)
    assert a["rollout_tokens"] == sum(len(r[0]) for tr in a["trace"] for s in tr for r in s["rollouts"])
    assert 0 < a["rollout_tokens"] <= H * K * steps
    assert a["reward_pairs"] == K * steps
    assert a["reward_calls"] == out.sequences.shape[1] - ids.shape[1]  # one batched call per loop step
    assert a["baseline_forward_tokens"] > a["rollout_tokens"]


def test_alpha_zero_gives_the_base_policy(models):
    policy, baseline = models
    ids, mask = _prompts()
    reward = IdReward()
    aligned = AlignedModel(policy, strategy=TransferQ(baseline, reward, alpha=0.0, k=3))
    greedy = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(aligned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=EOS), greedy)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, seed=[1, 2],
              eos_token_id=EOS, return_dict_in_generate=True)
    base = AlignedModel(policy).generate(**kw)
    out = aligned.generate(**kw)
    assert torch.equal(out.sequences, base.sequences)
    assert out.alignment["rollouts"] == 0 and reward.calls == 0


def test_k_one_is_greedy_decoding_of_the_prior(models):
    policy, baseline = models
    ids, mask = _prompts()
    greedy = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD)
    tq = TransferQ(baseline, IdReward(scale=10.0), alpha=5.0, k=1, rollout_len=3)
    out = AlignedModel(policy, strategy=tq).generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                                     do_sample=True, top_k=0, seed=7, eos_token_id=EOS)
    assert torch.equal(out, greedy)


@pytest.mark.parametrize("normalize", [True, False])
def test_indirect_transfer_with_the_baseline_reward_equals_direct(models, normalize):
    policy, baseline = models
    ids, mask = _prompts()
    reward = IdReward(seed=5)
    common = dict(alpha=2.0, k=4, rollout_len=3, num_rollouts=3, rollout_sampling="sample")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=0, seed=[3, 9],
              eos_token_id=EOS, return_dict_in_generate=True, output_scores=True)
    direct = AlignedModel(policy, strategy=TransferQ(baseline, reward, **common)).generate(**kw)
    indirect = AlignedModel(policy, strategy=TransferQ(
        baseline, reward, transfer="indirect", baseline_reward=reward, beta=0.3, normalize_weights=normalize,
        **common)).generate(**kw)
    assert torch.equal(direct.sequences, indirect.sequences)
    for a, b in zip(direct.scores, indirect.scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert indirect.alignment["reward_calls"] == 2 * direct.alignment["reward_calls"]


@pytest.mark.parametrize("normalize", [True, False])
def test_indirect_q_is_the_importance_weighted_rollout_reward(models, normalize):
    policy, baseline = models
    ids, mask = _prompts()
    r, r_bl, beta, n = IdReward(seed=5), IdReward(seed=6), 0.7, 3
    tq = TransferQ(baseline, r, transfer="indirect", baseline_reward=r_bl, beta=beta, normalize_weights=normalize,
                   k=3, rollout_len=2, num_rollouts=n, rollout_sampling="sample", trace_rollouts=True)
    out = AlignedModel(policy, strategy=tq).generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                                     seed=1, eos_token_id=EOS, return_dict_in_generate=True)
    for (prompt, gen), trace in zip(_rows(out, ids, mask), out.alignment["trace"]):
        for t, step in enumerate(trace):
            for c, rollouts, q in zip(step["candidates"], step["rollouts"], step["q"]):
                ys = [gen[:t] + [c] + tail for tail in rollouts]
                w = [math.exp((r.value(y) - r_bl.value(y)) / beta) for y in ys]
                total = sum(wi * r.value(y) for wi, y in zip(w, ys))
                expected = total / sum(w) if normalize else total / n
                assert q == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_q_estimate_normalised_with_one_rollout_is_the_reward_and_official_weights_are_raw():
    r, r_bl = torch.tensor([[2.0]]), torch.tensor([[0.5]])
    assert q_estimate(r, r_bl, beta=2.0, normalize=True).item() == pytest.approx(2.0)
    assert q_estimate(r, r_bl, beta=2.0, normalize=False).item() == pytest.approx(math.exp(0.5 * 1.5) * 2.0)
    with pytest.raises(ValueError, match="overflowed"):
        q_estimate(torch.tensor([[1e3]]), torch.tensor([[0.0]]), beta=0.1, normalize=False)


def test_candidates_are_the_top_k_of_the_prior_only(models):
    policy, baseline = models
    ids, mask = _prompts()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=EOS, return_dict_in_generate=True)
    differs = 0
    for prior, source in (("policy", policy), ("baseline", baseline)):
        tq = TransferQ(baseline, IdReward(seed=8, scale=5.0), alpha=3.0, k=4, rollout_len=2, prior=prior)
        out = AlignedModel(policy, strategy=tq).generate(**kw)
        for (prompt, gen), trace in zip(_rows(out, ids, mask), out.alignment["trace"]):
            for t, step in enumerate(trace):
                prefix = prompt + gen[:t]
                assert step["candidates"] == _logp(source, prefix).topk(4).indices.tolist()
                other = baseline if source is policy else policy
                differs += set(step["candidates"]) != set(_logp(other, prefix).topk(4).indices.tolist())
                # Greedy: the argmax of log prior + alpha * Q over the candidates.
                logp = _logp(source, prefix)
                best = max(zip(step["candidates"], step["q"]), key=lambda cq: float(logp[cq[0]]) + 3.0 * cq[1])[0]
                assert gen[t] == best
    assert differs > 0  # the two models' top-k sets do differ, so the test tells them apart


def test_official_preset_decodes_with_the_baseline_as_prior(models):
    policy, baseline = models
    ids, mask = _prompts()
    tq = TransferQ.official(baseline, IdReward())
    hp = tq.hyperparameters()
    assert (hp["prior"], hp["k"], hp["rollout_len"], hp["rollout_sampling"], hp["alpha"]) == ("baseline", 10, 20, "greedy", 1.0)
    ind = TransferQ.official(baseline, IdReward(), transfer="indirect", baseline_reward=IdReward(1)).hyperparameters()
    assert (ind["rollout_len"], ind["beta"], ind["normalize_weights"]) == (5, 2.0, False)
    # With the baseline as prior, the AlignedModel's own model is not what decodes.
    a = AlignedModel(policy, strategy=TransferQ(baseline, IdReward(), k=3, rollout_len=2, prior="baseline"))
    b = AlignedModel(baseline, strategy=TransferQ(baseline, IdReward(), k=3, rollout_len=2))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=EOS)
    assert torch.equal(a.generate(**kw), b.generate(**kw))


def test_rows_depend_only_on_their_seed_not_on_batch_or_chunking(models):
    policy, baseline = models
    ids, mask = _prompts()
    common = dict(alpha=1.0, k=4, rollout_len=3, num_rollouts=2, rollout_sampling="sample", trace_rollouts=True)
    kw = dict(max_new_tokens=4, do_sample=True, top_k=0, eos_token_id=EOS, return_dict_in_generate=True)
    both = AlignedModel(policy, strategy=TransferQ(baseline, IdReward(), **common)).generate(
        input_ids=ids, attention_mask=mask, seed=[21, 22], **kw)
    alone = AlignedModel(policy, strategy=TransferQ(baseline, IdReward(), max_rollout_rows=3, **common)).generate(
        input_ids=ids[1:], attention_mask=mask[1:], seed=[22], **kw)
    assert torch.equal(both.sequences[1], alone.sequences[0])
    assert both.alignment["trace"][1] == alone.alignment["trace"][0]
    rollouts = [r for s in both.alignment["trace"][0] for r in s["rollouts"]]
    assert any(pair[0] != pair[1] for pair in rollouts)  # the two sampled rollouts of a candidate differ


def test_stop_candidates_are_not_rolled_out_and_full_rollouts_fill_the_budget(models):
    policy, baseline = models
    ids, mask = _prompts()
    reward = IdReward(seed=2)
    tq = TransferQ(baseline, reward, alpha=1.0, k=VOCAB, rollout_len=None, trace_rollouts=True)
    out = AlignedModel(policy, strategy=tq).generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                                     eos_token_id=EOS, return_dict_in_generate=True)
    for (prompt, gen), trace in zip(_rows(out, ids, mask), out.alignment["trace"]):
        for t, step in enumerate(trace):
            for c, (tail,), q in zip(step["candidates"], step["rollouts"], step["q"]):
                if c == EOS:
                    assert tail == [] and q == pytest.approx(reward.value(gen[:t] + [EOS]), abs=1e-5)
                else:
                    assert tail == _scratch_rollout(baseline, prompt + gen[:t] + [c], 3 - t - 1)


def test_text_rewards_see_the_prompt_text_and_the_prefix_candidate_rollout_text(models):
    policy, baseline = models
    tok = tiny_tokenizer(VOCAB)
    seen = []

    class Recorder(SequenceReward):
        name = "recorder"

        def _score(self, prompts, completions):
            seen.append((list(prompts), list(completions)))
            return torch.tensor([float(c.count("w1")) for c in completions])

    ids = torch.tensor([[7, 8, 9]])
    tq = TransferQ(baseline, Recorder(), baseline_tokenizer=tok, alpha=1.0, k=3, rollout_len=2, trace_rollouts=True)
    out = AlignedModel(policy, tokenizer=tok, strategy=tq).generate(
        input_ids=ids, max_new_tokens=3, return_dict_in_generate=True, prompt_texts=["w1 w2 w3"])
    trace = out.alignment["trace"][0]
    gen = out.sequences[0, 3:].tolist()
    assert len(seen) == len(trace)
    for t, ((prompts, texts), step) in enumerate(zip(seen, trace)):
        assert prompts == ["w1 w2 w3"] * 3
        expected = [tok.decode(gen[:t] + [c] + tail, skip_special_tokens=True)
                    for c, (tail,) in zip(step["candidates"], step["rollouts"])]
        assert texts == expected
        assert step["q"] == [float(x.count("w1")) for x in expected]


def test_with_weights_changes_alpha_only(models):
    policy, baseline = models
    ids, mask = _prompts()
    tq = TransferQ(baseline, IdReward(seed=4, scale=3.0), alpha=0.1, k=4, rollout_len=2)
    aligned = AlignedModel(policy, strategy=tq)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=EOS)
    fresh = AlignedModel(policy, strategy=TransferQ(baseline, IdReward(seed=4, scale=3.0), alpha=4.0, k=4,
                                                    rollout_len=2)).generate(**kw)
    assert torch.equal(aligned.generate(**kw, strategy=tq.with_weights([4.0])), fresh)
    assert not torch.equal(aligned.generate(**kw), fresh)
    other = tq.with_weights(2.0)
    assert tq.alpha == 0.1 and (tq.guide.alpha, other.guide.alpha) == (0.1, 2.0)  # the guide prunes with its own
    assert other.guide.baseline is tq.guide.baseline and other.guide.reward is tq.guide.reward  # nothing reloaded


# ---------------------------------------------------------------------------------------- bad input
def test_k_larger_than_the_vocabulary_is_refused(models):
    policy, baseline = models
    with pytest.raises(ValueError, match="k=41 is larger than the vocabulary"):
        AlignedModel(policy, strategy=TransferQ(baseline, IdReward(), k=41)).generate(
            input_ids=torch.tensor([[5, 6]]), max_new_tokens=2)


def test_a_baseline_with_another_vocabulary_is_refused(models):
    policy, _ = models
    with pytest.raises(ValueError, match="does not share the policy's tokenizer"):
        AlignedModel(policy, tokenizer=tiny_tokenizer(VOCAB), strategy=TransferQ(
            tiny_llama(VOCAB, seed=13), IdReward(), baseline_tokenizer=tiny_tokenizer(VOCAB, shift=1))).generate(
            input_ids=torch.tensor([[5, 6]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        AlignedModel(policy, strategy=TransferQ(tiny_llama(VOCAB + 8, seed=13), IdReward())).generate(
            input_ids=torch.tensor([[5, 6]]), max_new_tokens=2)


@pytest.mark.parametrize("value, msg", [(float("inf"), "non-finite"), (float("-inf"), "non-finite"),
                                        (float("nan"), "NaN")])
def test_non_finite_rewards_are_refused(models, value, msg):
    policy, baseline = models
    with pytest.raises(ValueError, match=msg):
        AlignedModel(policy, strategy=TransferQ(baseline, ConstantReward(value), k=2, rollout_len=1)).generate(
            input_ids=torch.tensor([[5, 6]]), max_new_tokens=2)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(k=0), "k .* >= 1"),
    (dict(rollout_len=-1), "rollout_len"),
    (dict(num_rollouts=0), "num_rollouts"),
    (dict(num_rollouts=2), "greedy rollouts repeats"),
    (dict(rollout_sampling="beam"), "rollout_sampling"),
    (dict(rollout_sampling="sample", rollout_temperature=0.0), "rollout_temperature"),
    (dict(transfer="both"), "transfer"),
    (dict(transfer="indirect"), "needs baseline_reward"),
    (dict(baseline_reward=ConstantReward(1.0)), "indirect"),
    (dict(transfer="indirect", baseline_reward=ConstantReward(1.0), beta=0.0), "beta"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(prior="sft"), "prior"),
    (dict(max_rollout_rows=0), "max_rollout_rows"),
])
def test_bad_arguments_are_named(models, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TransferQ(models[1], IdReward(), **kwargs)
    with pytest.raises(TypeError, match="reward"):
        TransferQ(models[1], object())


STOPS, STOP_SEED = [EOS, 20, 21, 22], 3  # with these, row 0 stops after 3 tokens and row 1 runs on


def test_a_baseline_that_is_the_decoding_model_shares_its_session_with_the_same_result(models):
    policy, _ = models
    twin = copy.deepcopy(policy)  # same weights, another object: rolled out from its own prefix cache
    ids, mask = _prompts()
    common = dict(alpha=2.0, k=4, rollout_len=3, num_rollouts=2, rollout_sampling="sample", trace_rollouts=True)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, seed=[STOP_SEED, 1],
              eos_token_id=STOPS, return_dict_in_generate=True)
    shared = AlignedModel(policy, strategy=TransferQ(policy, IdReward(), **common)).generate(**kw)
    separate = AlignedModel(policy, strategy=TransferQ(twin, IdReward(), **common)).generate(**kw)
    lengths = shared.alignment["lengths"].tolist()
    assert lengths[0] < lengths[1]  # a row ended early: the loop pruned it from the shared session
    assert torch.equal(shared.sequences, separate.sequences)
    assert shared.alignment["trace"] == separate.alignment["trace"]
    # The shared prefix cache costs the baseline nothing: only its rollouts run.
    own_prefix = separate.alignment["baseline_forward_tokens"] - shared.alignment["baseline_forward_tokens"]
    assert own_prefix == separate.alignment["prior_forward_tokens"]


def _recycling_cases(out, ids, mask):
    """How each step's recycled candidate (the one that starts the last chosen token's rollout) was served:
    'stopped' (that rollout ended on a stop), 'cut' (it covers the new limit), 'extended' (tokens missing)."""
    cases = []
    stops = set(STOPS)
    for row, (prompt, gen) in enumerate(_rows(out, ids, mask)):
        trace = out.alignment["trace"][row]
        for t in range(1, len(trace)):
            before = trace[t - 1]
            tau = before["rollouts"][before["candidates"].index(gen[t - 1])][0]
            if tau and tau[0] in trace[t]["candidates"] and tau[0] not in stops:  # a stop needs no rollout
                new = trace[t]["rollouts"][trace[t]["candidates"].index(tau[0])][0]
                if not new:  # the response budget is spent: no rollout at all
                    continue
                cases.append("stopped" if tau[-1] in stops else "cut" if len(new) <= len(tau) - 1 else "extended")
    return cases


_RECYCLING: dict = {}


def _recycling_run(models, prior, rollout_len, via):
    """The same decoding with rollout recycling on and off (memoised): (on, off, prompt ids, mask)."""
    from engine_support import LoopEngine

    key = (prior, rollout_len, via)
    if key not in _RECYCLING:
        policy, baseline = models
        ids, mask = _prompts()
        engine = LoopEngine(baseline) if via == "engine" else None
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=True, top_k=0,
                  seed=[STOP_SEED, 1], eos_token_id=STOPS, pad_token_id=PAD, return_dict_in_generate=True)
        runs = []
        for recycle in (True, False):
            tq = TransferQ(baseline, IdReward(seed=2), alpha=1.0, k=4, rollout_len=rollout_len, prior=prior,
                           trace_rollouts=True, engine=engine, recycle_rollouts=recycle)
            runs.append(AlignedModel(policy, strategy=tq).generate(**kw))
        _RECYCLING[key] = (*runs, ids, mask)
    return _RECYCLING[key]


RECYCLING_CASES = [(prior, rollout_len, via) for prior in ("baseline", "policy") for rollout_len in (3, None)
                   for via in ("in process", "engine")]


@pytest.mark.parametrize("prior, rollout_len, via", RECYCLING_CASES)
def test_recycled_rollouts_are_the_rollouts_from_scratch(models, prior, rollout_len, via):
    """Recycling the chosen token's greedy rollout for the candidate it starts with changes nothing: the
    same tokens, candidates, Q-values and rollouts as rolling every candidate out (each rollout also equal
    to generate() from scratch), with that candidate's rollout taken from the old one (cut to the new limit,
    complete when it had stopped, or continued for the missing tokens only)."""
    _, baseline = models
    on, off, ids, mask = _recycling_run(models, prior, rollout_len, via)
    assert torch.equal(on.sequences, off.sequences)
    assert on.alignment["trace"] == off.alignment["trace"]
    assert off.alignment["recycled_rollouts"] == 0
    cases = _recycling_cases(on, ids, mask)
    assert on.alignment["recycled_rollouts"] == len(cases) > 0
    assert on.alignment["recycled_tokens"] > 0
    assert on.alignment["rollout_tokens"] == off.alignment["rollout_tokens"]
    for row, (prompt, gen) in enumerate(_rows(on, ids, mask)):
        for t, step in enumerate(on.alignment["trace"][row]):
            for c, rollouts in zip(step["candidates"], step["rollouts"]):
                limit = 0 if c in STOPS else rollout_len if rollout_len is not None else 7 - t - 1
                assert rollouts == [_scratch_rollout(baseline, prompt + gen[:t] + [c], limit, STOPS)]
    if rollout_len is None:  # the old rollout always covers the new limit: nothing generated for it again
        assert "extended" not in cases
        assert on.alignment["baseline_forward_tokens"] < off.alignment["baseline_forward_tokens"]
    else:
        assert "extended" in cases


def test_recycling_covers_stopped_cut_and_extended_rollouts_and_pruned_rows(models):
    """Between them, the cases above serve a recycled rollout in each of the three ways, and in some of them
    a row ends early (the loop prunes it: the recycling state must follow the remaining rows)."""
    seen, early = set(), 0
    for case in RECYCLING_CASES:
        on, _, ids, mask = _recycling_run(models, *case)
        seen |= set(_recycling_cases(on, ids, mask))
        lengths = on.alignment["lengths"].tolist()
        early += min(lengths) < max(lengths) and on.alignment["recycled_rollouts"] > 0
    assert seen == {"stopped", "cut", "extended"}
    assert early > 0


def test_recycling_is_off_for_sampled_rollouts_and_must_be_a_bool(models):
    tq = TransferQ(models[1], IdReward(), num_rollouts=2, rollout_sampling="sample")
    assert tq.hyperparameters()["recycle_rollouts"] is False
    assert TransferQ(models[1], IdReward()).hyperparameters()["recycle_rollouts"] is True
    with pytest.raises(TypeError, match="recycle_rollouts"):
        TransferQ(models[1], IdReward(), recycle_rollouts="yes")


@pytest.mark.vllm
def test_official_settings_on_vllm_recycle_and_share_the_prefix_through_the_cache(tmp_path_factory):
    """On vLLM's CPU build (block size 32): greedy Transfer Q* with the official settings gives the tokens,
    candidates, Q-values and rollouts of the in-process path, with and without recycling; every rollout
    request finds the prompt's first 32-token block in the engine's prefix cache."""
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")
    from align_decode.serving.engines import VLLMEngine
    from vllm_support import load, save_models

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        path = save_models(tmp_path_factory.mktemp("tq-vllm"))["policy"]
        engine = VLLMEngine(path, dtype="float32", max_model_len=128, max_num_seqs=64, enforce_eager=True,
                            block_size=32)
        try:
            model = load(path)
            prompts = [[2] + [6 + (5 * j) % 50 for j in range(40)], [2] + [7 + (3 * j) % 50 for j in range(36)]]
            width = max(map(len, prompts))
            ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
            kw = dict(input_ids=ids, attention_mask=(ids != PAD).long(), max_new_tokens=6, do_sample=False,
                      eos_token_id=EOS, pad_token_id=PAD, return_dict_in_generate=True)
            runs = {}
            for name, eng, recycle in (("hf", None, True), ("vllm", engine, True), ("vllm-off", engine, False)):
                tq = TransferQ.official(model, IdReward(seed=4, vocab=64), k=4, rollout_len=5, engine=eng,
                                        trace_rollouts=True, recycle_rollouts=recycle)
                engine.llm.reset_prefix_cache()  # each run starts from a cold cache: their counts compare
                runs[name] = AlignedModel(model, strategy=tq).generate(**kw)
        finally:
            engine.close()
    for name in ("vllm", "vllm-off"):
        assert torch.equal(runs[name].sequences, runs["hf"].sequences)
        assert runs[name].alignment["trace"] == runs["hf"].alignment["trace"]
    on, off = runs["vllm"].alignment, runs["vllm-off"].alignment
    assert on["recycled_rollouts"] > 0 and off["recycled_rollouts"] == 0
    # A recycled request prefills the old rollout's tokens (from the cache where they fill a block) instead of
    # decoding them: never more positions than rolling out again.
    assert on["baseline_forward_tokens"] <= off["baseline_forward_tokens"]
    # Every request's prompt (> 32 tokens) finds its first block in the cache, but the first one of each
    # prompt (the others of its step share the block it fills in the same engine step).
    assert off["rollout_cached_tokens"] >= 32 * (off["rollouts"] - len(prompts))
    assert runs["hf"].alignment["rollout_cached_tokens"] == 0


class TanhReward(IdReward):
    """IdReward squashed into (-1, 1): a reward with a known range that it nearly reaches."""

    name = "tanh_ids"

    def value(self, completion) -> float:
        return math.tanh(super().value(completion) / 2)


@pytest.mark.parametrize("alpha", [0.5, 1.0, -1.0])
@pytest.mark.parametrize("prior, via", [("policy", "in process"), ("baseline", "in process"), ("baseline", "engine")])
def test_pruning_by_the_reward_range_keeps_the_greedy_tokens(models, alpha, prior, via):
    """With greedy decoding and the reward's range declared, candidates out of reach are not rolled out; the
    tokens are those of rolling every candidate out (where Q does move the choice away from the prior's
    argmax), and the other candidates' Q-values are unchanged."""
    from engine_support import LoopEngine

    policy, baseline = models
    ids, mask = _prompts()
    reward = TanhReward(seed=6, scale=2.0)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=EOS,
              pad_token_id=PAD, return_dict_in_generate=True)
    runs = []
    for bounds in (None, (-1.0, 1.0)):
        tq = TransferQ(baseline, reward, alpha=alpha, k=6, rollout_len=3, prior=prior, reward_bounds=bounds,
                       engine=LoopEngine(baseline) if via == "engine" else None)
        runs.append(AlignedModel(policy, strategy=tq).generate(**kw))
    full, pruned = runs
    assert torch.equal(full.sequences, pruned.sequences)
    a, b = full.alignment, pruned.alignment
    assert a["pruned_candidates"] == 0 < b["pruned_candidates"]
    # (a pruned stop candidate had no rollout to save)
    assert a["rollouts"] - b["pruned_candidates"] <= b["rollouts"] < a["rollouts"]
    assert b["rollout_tokens"] < a["rollout_tokens"]
    lowest = -1.0 if alpha > 0 else 1.0
    moved = 0
    for row, (prompt, gen) in enumerate(_rows(full, ids, mask)):
        for t, (sf, sp) in enumerate(zip(a["trace"][row], b["trace"][row], strict=True)):
            assert sf["candidates"] == sp["candidates"]
            assert [lowest if gone else q for q, gone in zip(sf["q"], sp["pruned"])] == sp["q"]
            moved += gen[t] != sf["candidates"][0]  # Q chose another token than the prior's argmax
    _PRUNING_MOVED[(alpha, prior, via)] = moved


_PRUNING_MOVED: dict = {}


def test_pruning_cases_include_choices_that_q_moved(models):
    """The comparisons above have teeth: in them Q often picks another token than the prior's argmax."""
    for alpha in (0.5, 1.0, -1.0):
        for prior, via in (("policy", "in process"), ("baseline", "in process"), ("baseline", "engine")):
            if (alpha, prior, via) not in _PRUNING_MOVED:
                test_pruning_by_the_reward_range_keeps_the_greedy_tokens(models, alpha, prior, via)
    assert sum(moved > 0 for moved in _PRUNING_MOVED.values()) >= 5


def test_pruning_needs_greedy_decoding_and_rewards_inside_the_declared_range(models):
    policy, baseline = models
    ids, mask = _prompts()
    reward = TanhReward(seed=6, scale=2.0)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD,
              return_dict_in_generate=True)
    sampled = dict(kw, do_sample=True, top_k=0, seed=[1, 2])
    common = dict(alpha=0.5, k=6, rollout_len=3)
    plain = AlignedModel(policy, strategy=TransferQ(baseline, reward, **common)).generate(**sampled)
    bounded = AlignedModel(policy, strategy=TransferQ(baseline, reward, reward_bounds=(-1, 1),
                                                      **common)).generate(**sampled)
    assert bounded.alignment["pruned_candidates"] == 0  # sampling needs every candidate's Q
    assert torch.equal(plain.sequences, bounded.sequences)
    too_narrow = TransferQ(baseline, reward, reward_bounds=(-0.01, 0.01), **common)
    with pytest.raises(ValueError, match="outside reward_bounds"):
        AlignedModel(policy, strategy=too_narrow).generate(**dict(kw, do_sample=False))


@pytest.mark.parametrize("kwargs", [dict(reward_bounds=(1.0, 0.0)), dict(reward_bounds=(float("nan"), 1.0)),
                                    dict(reward_bounds="(-1, 1)"), dict(reward_bounds=(0.0,)),
                                    dict(reward_bounds=(-1, 1), transfer="indirect", normalize_weights=False,
                                         baseline_reward=ConstantReward(0.0))])
def test_bad_reward_bounds_are_named(models, kwargs):
    with pytest.raises(ValueError, match="reward_bounds"):
        TransferQ(models[1], IdReward(), **kwargs)
