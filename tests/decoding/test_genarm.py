"""GenARM through AlignedModel.generate(): the per-step law, weight 0, several ARMs, official semantics.

Formula tests run the tiny models in float64 so the forward pass adds no noise: what is compared is
the mixing itself (done in float32), to 1e-5."""

import pytest
import torch
from scipy.stats import chisquare

from align_decode import ARM, AlignedModel, GenARM, PromptedARM
from tiny import EOS, PAD, tiny_tokenizer
from tiny import tiny_llama64 as tiny_llama


def _prompts(vocab):
    ids = torch.tensor([[PAD, PAD, 7, 8, 9], [6, 10, 11, 12, 13], [PAD, PAD, PAD, 20, 21]])
    ids = ids.clamp(max=vocab - 1)
    return ids, (ids != PAD).long()


def _scratch_logprobs(model, seq, width):
    """Next-token log-probs for a prefix, computed from scratch (no cache, no padding)."""
    with torch.no_grad():
        logits = model(input_ids=seq.unsqueeze(0)).logits[0, -1, :width]
    return torch.log_softmax(logits.float(), -1)


def _check_steps(out, prompt_ids, prompt_mask, models, weights, temperature, width):
    """Every recorded step's scores equal log_softmax(log p_pol / T + sum_i w_i log p_arm_i) from scratch."""
    prompt_width = prompt_ids.shape[1]
    for row in range(out.sequences.shape[0]):
        prompt = prompt_ids[row][prompt_mask[row].bool()]
        gen = out.sequences[row, prompt_width:]
        for t, step_scores in enumerate(out.scores):
            if t > 0 and gen[t - 1] in (EOS,):
                break
            prefix = torch.cat([prompt, gen[:t]])
            z = _scratch_logprobs(models[0], prefix, width) / temperature
            for m, w in zip(models[1:], weights):
                z = z + w * _scratch_logprobs(m, prefix, width)
            torch.testing.assert_close(step_scores[row], torch.log_softmax(z, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("vocab", [64, 97, 256])
def test_step_scores_equal_the_genarm_formula(vocab):
    policy, arm = tiny_llama(vocab, seed=1), tiny_llama(vocab, seed=2)
    ids, mask = _prompts(vocab)
    aligned = AlignedModel(policy, strategy=GenARM(ARM(arm), beta=0.5))
    out = aligned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                           temperature=0.8, seed=[1, 2, 3], return_dict_in_generate=True, output_scores=True)
    assert len(out.scores) == out.sequences.shape[1] - ids.shape[1]
    _check_steps(out, ids, mask, [policy, arm], [2.0], 0.8, vocab)


def test_several_arms_add_linearly_in_log_space():
    vocab = 64
    policy, a1, a2 = (tiny_llama(vocab, seed=s) for s in (1, 2, 3))
    ids, mask = _prompts(vocab)
    strategy = GenARM([ARM(a1), ARM(a2)], weights=[0.7, -0.4])
    out = AlignedModel(policy, strategy=strategy).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=0,
        return_dict_in_generate=True, output_scores=True, seed=9,
    )
    _check_steps(out, ids, mask, [policy, a1, a2], [0.7, -0.4], 1.0, vocab)
    # New weights per call, same loaded models.
    out2 = AlignedModel(policy, strategy=strategy).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=0,
        return_dict_in_generate=True, output_scores=True, seed=9, strategy=strategy.with_weights([0.1, 1.5]),
    )
    _check_steps(out2, ids, mask, [policy, a1, a2], [0.1, 1.5], 1.0, vocab)


@pytest.mark.parametrize("vocab", [64, 300])
def test_weight_zero_greedy_reproduces_model_generate(vocab):
    policy, arm = tiny_llama(vocab, seed=4), tiny_llama(vocab, seed=5)
    ids, mask = _prompts(vocab)
    ref = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    ours = AlignedModel(policy, strategy=GenARM(ARM(arm), weights=[0.0])).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False
    )
    assert torch.equal(ref, ours)


def test_weight_zero_sampling_scores_are_the_policys_tempered_logprobs():
    vocab = 97
    policy, arm = tiny_llama(vocab, seed=6), tiny_llama(vocab, seed=7)
    ids, mask = _prompts(vocab)
    out = AlignedModel(policy, strategy=GenARM(ARM(arm), weights=[0.0])).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=1.7, top_k=0,
        return_dict_in_generate=True, output_scores=True, seed=0,
    )
    _check_steps(out, ids, mask, [policy], [], 1.7, vocab)


def _exact_sequence_law(policy, arm, prompt, weight, temperature, horizon, vocab):
    """Enumerate every continuation of `horizon` tokens (EOS ends early): prob = product of the
    per-step GenARM laws computed from scratch."""
    law = {}

    def expand(prefix, prob, depth):
        if depth == horizon or (depth > 0 and prefix[-1] == EOS):
            law[tuple(prefix[len(prompt):])] = prob
            return
        seq = torch.tensor(prefix)
        p = torch.softmax(
            _scratch_logprobs(policy, seq, vocab) / temperature + weight * _scratch_logprobs(arm, seq, vocab), -1
        )
        for tok in range(vocab):
            expand(prefix + [tok], prob * float(p[tok]), depth + 1)

    expand(list(prompt), 1.0, 0)
    return law


def test_sampled_sequences_follow_the_exact_enumerated_law():
    vocab, horizon, draws = 8, 3, 30000
    policy, arm = tiny_llama(vocab, seed=11, init=0.6), tiny_llama(vocab, seed=12, init=0.6)
    prompt = [3, 4]
    law = _exact_sequence_law(policy, arm, prompt, 0.8, 1.2, horizon, vocab)
    assert abs(sum(law.values()) - 1) < 1e-6
    aligned = AlignedModel(policy, strategy=GenARM(ARM(arm), weights=[0.8]))
    ids = torch.tensor([prompt]).expand(draws, -1)
    seqs = aligned.generate(input_ids=ids, max_new_tokens=horizon, do_sample=True, temperature=1.2, top_k=0,
                            eos_token_id=EOS, pad_token_id=PAD, seed=list(range(draws)))
    keys = list(law)
    index = {k: i for i, k in enumerate(keys)}
    counts = torch.zeros(len(keys))
    for row in seqs[:, len(prompt):].tolist():
        if EOS in row:
            row = row[: row.index(EOS) + 1]
        counts[index[tuple(row)]] += 1
    expected = torch.tensor([law[k] for k in keys], dtype=torch.float64) * draws
    # Pool the rare sequences so every chi-square cell expects at least 5 draws.
    rare = expected < 5
    obs = torch.cat([counts[~rare].double(), counts[rare].double().sum().reshape(1)])
    exp = torch.cat([expected[~rare], expected[rare].sum().reshape(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # float32 step laws sum to 1 only within ~1e-7
    stat, p = chisquare(obs.numpy(), exp.numpy())
    assert p > 1e-3, (stat, p)  # fixed seeds: deterministic; 1e-3 is the stated threshold


def test_model_arithmetic_semantics_equal_the_direct_formula():
    vocab = 64
    policy, arm = tiny_llama(vocab, seed=13), tiny_llama(vocab, seed=14)
    ids, mask = _prompts(vocab)
    alpha = 1.5
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=0,
                  return_dict_in_generate=True, output_scores=True, seed=5)
    # The official scripts pass T_in = T / (1 + alpha): then P = softmax(log p_b / T + alpha log p_r / T)
    # which at T = 1 is the paper's law.
    official = AlignedModel(policy, strategy=GenARM(ARM(arm), weights=[alpha], temperature_semantics="model_arithmetic"))
    direct = AlignedModel(policy, strategy=GenARM(ARM(arm), weights=[alpha]))
    a = official.generate(temperature=1.0 / (1 + alpha), **kwargs)
    b = direct.generate(temperature=1.0, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    # At another T_in: softmax((log p_b + a log p_r) / ((1 + a) T_in)).
    t_in = 0.9
    c = official.generate(temperature=t_in, **kwargs)
    t_eff = (1 + alpha) * t_in
    _check_steps(c, ids, mask, [policy, arm], [alpha / t_eff], t_eff, vocab)
    # normalize_logit forces T_in = 1: the weighted geometric mean with weights summing to 1.
    norm = AlignedModel(policy, strategy=GenARM(ARM(arm), weights=[alpha], temperature_semantics="model_arithmetic",
                                                normalize_logit=True))
    d = norm.generate(temperature=0.3, **kwargs)
    _check_steps(d, ids, mask, [policy, arm], [alpha / (1 + alpha)], 1 + alpha, vocab)


def test_weak_to_strong_small_arm_with_padded_vocabulary():
    tok = tiny_tokenizer(64)
    policy = tiny_llama(64, seed=15, layers=3, hidden=128, heads=4)
    small = tiny_llama(65, seed=16, layers=1, hidden=64)  # one padding row beyond the tokenizer
    ids, mask = _prompts(64)
    out = AlignedModel(policy, tokenizer=tok, strategy=GenARM(ARM(small, tok), beta=1.0)).generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=0,
        return_dict_in_generate=True, output_scores=True, seed=1,
    )
    assert out.scores[0].shape == (3, 64)
    _check_steps(out, ids, mask, [policy, small], [1.0], 1.0, 64)


def test_prompted_arm_reads_the_instruction_and_equals_an_arm_on_that_prompt():
    tok = tiny_tokenizer(64)
    policy, guide = tiny_llama(64, seed=17), tiny_llama(64, seed=18)
    enc = tok.apply_chat_template([[{"role": "user", "content": "w1 w2"}], [{"role": "user", "content": "w3"}]],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt", padding=True)
    arm = PromptedARM(guide, tok, "w40 w41")
    out = AlignedModel(policy, tokenizer=tok, strategy=GenARM(arm, beta=0.5)).generate(
        **enc, max_new_tokens=4, do_sample=True, top_k=0, return_dict_in_generate=True, output_scores=True, seed=3
    )
    guide_ids, guide_mask = arm.guide_prompts(__import__("align_decode").decoding.PromptBatch(enc["input_ids"], enc["attention_mask"]))
    assert "w40 w41" in tok.decode(guide_ids[0])
    for row in range(2):
        p_prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()]
        g_prompt = guide_ids[row][guide_mask[row].bool()]
        gen = out.sequences[row, enc["input_ids"].shape[1]:]
        for t, s in enumerate(out.scores):
            z = _scratch_logprobs(policy, torch.cat([p_prompt, gen[:t]]), 64) + 2.0 * _scratch_logprobs(
                guide, torch.cat([g_prompt, gen[:t]]), 64)
            torch.testing.assert_close(s[row], torch.log_softmax(z, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,msg", [
    ({"beta": 0.0}, "beta must be a finite number > 0"),
    ({"beta": -1.0}, "beta must be a finite number > 0"),
    ({"beta": float("nan")}, "beta must be a finite number > 0"),
    ({"beta": True}, "beta must be a finite number > 0"),
    ({"weights": [1.0, 2.0]}, "weights has 2 value"),
    ({"weights": ["1"]}, r"weights\[0\] must be a finite number"),
    ({"beta": 1.0, "weights": [1.0]}, "either beta"),
    ({"temperature_semantics": "nope"}, "temperature_semantics"),
])
def test_bad_genarm_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GenARM(ARM(tiny_llama(64)), **kwargs)


def test_mismatched_vocabularies_are_refused():
    policy, other = tiny_llama(64), tiny_llama(80)
    ids, mask = _prompts(64)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        AlignedModel(policy, strategy=GenARM(ARM(other))).generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    tok, shifted = tiny_tokenizer(64, name="policy-tok"), tiny_tokenizer(64, name="guide-tok", shift=3)
    with pytest.raises(ValueError, match="policy-tok.*guide-tok"):
        AlignedModel(policy, tokenizer=tok, strategy=GenARM(ARM(tiny_llama(64), shifted))).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=2)


def test_nan_in_guide_logits_is_an_error():
    policy, arm = tiny_llama(64), tiny_llama(64)
    arm.lm_head.weight.data[5, 0] = float("nan")
    ids, mask = _prompts(64)
    with pytest.raises(ValueError, match="NaN"):
        AlignedModel(policy, strategy=GenARM(ARM(arm))).generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)


def test_all_rows_follow_the_weights_given_per_call_without_reloading():
    policy, arm = tiny_llama(64, seed=21), tiny_llama(64, seed=22)
    ids, mask = _prompts(64)
    base = GenARM(ARM(arm), beta=1.0)
    aligned = AlignedModel(policy, strategy=base)
    outs = [aligned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             strategy=base.with_weights([w])) for w in (0.0, 5.0, 50.0)]
    assert torch.equal(outs[0], policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
    assert not torch.equal(outs[0], outs[2])


def test_a_prompted_arm_on_the_policy_itself_shares_its_forward_and_keeps_the_law():
    import copy

    tok = tiny_tokenizer(64)
    policy = tiny_llama(64, seed=19)
    twin = copy.deepcopy(policy)  # same weights, another object: decoded with separate forwards
    enc = tok.apply_chat_template([[{"role": "user", "content": "w1 w2"}], [{"role": "user", "content": "w3"}]],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=6, do_sample=True, top_k=0, return_dict_in_generate=True, output_scores=True,
              seed=[4, 5], eos_token_id=[])
    calls = []
    for m in (policy, twin):
        m.register_forward_hook(lambda module, args, output: calls.append(module))
    fused = AlignedModel(policy, tokenizer=tok, strategy=GenARM(PromptedARM(policy, tok, "w40"), beta=0.5)).generate(
        **enc, **kw)
    # Two prefills, then one forward per new token for policy and ARM together.
    assert len(calls) == 2 + 5 and all(c is policy for c in calls)
    calls.clear()
    separate = AlignedModel(policy, tokenizer=tok, strategy=GenARM(PromptedARM(twin, tok, "w40"), beta=0.5)).generate(
        **enc, **kw)
    assert len(calls) == 2 * (1 + 5)
    assert torch.equal(fused.sequences, separate.sequences)
    for a, b in zip(fused.scores, separate.scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
