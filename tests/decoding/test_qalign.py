"""QAlign: the exact MH kernel has the target as its stationary law, and the implementation follows it."""

import collections
import math

import pytest
import torch

from align_decode import AlignedModel, QAlign
from align_decode.decoding.qalign import acceptance_log_ratio, clamp_reward
from enumerate_law import TableReward, chi_square_p, response_law, suffix_law
from tiny import EOS, PAD, tiny_llama, tiny_tokenizer

VOCAB, CAP, PROMPT = 4, 3, [3, 2]


@pytest.fixture(scope="module")
def policy():
    return tiny_llama(VOCAB, seed=51, init=0.1)


@pytest.fixture(scope="module")
def law(policy):
    return response_law(policy, PROMPT, CAP, EOS)


@pytest.fixture(scope="module")
def table(law):
    g = torch.Generator().manual_seed(5)
    return {y: float(v) for y, v in zip(sorted(law), torch.randn(len(law), generator=g))}


def kernel(policy, law, table, beta, reward_clamp=40.0, ratio_clamp=20.0):
    """The exact transition matrix: index uniform on the current response, suffix from p, MH acceptance
    computed by the implementation's own acceptance function."""
    states = sorted(law)
    pos = {y: i for i, y in enumerate(states)}
    k = torch.zeros(len(states), len(states), dtype=torch.float64)
    r = {y: float(clamp_reward(torch.tensor(table[y]), reward_clamp)) for y in states}
    for y in states:
        for i in range(len(y)):
            for suffix, q in suffix_law(policy, PROMPT, list(y[:i]), CAP, EOS).items():
                y2 = y[:i] + suffix
                log_a = acceptance_log_ratio(torch.tensor(r[y2]), torch.tensor(r[y]), torch.tensor(len(y2)),
                                             torch.tensor(len(y)), beta, ratio_clamp)
                a = min(1.0, math.exp(float(log_a)))
                k[pos[y], pos[y2]] += q * a / len(y)
                k[pos[y], pos[y]] += q * (1 - a) / len(y)
    return states, k


def target(law, table, beta, reward_clamp=40.0):
    states = sorted(law)
    w = torch.tensor([law[y] * math.exp(float(clamp_reward(torch.tensor(table[y]), reward_clamp)) / beta)
                      for y in states], dtype=torch.float64)
    return w / w.sum()


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_exact_kernel_satisfies_detailed_balance_and_keeps_the_target(policy, law, table, beta):
    states, k = kernel(policy, law, table, beta)
    assert len(states) == 1 + 3 + 36
    torch.testing.assert_close(k.sum(1), torch.ones(len(states), dtype=torch.float64), atol=1e-12, rtol=0)
    pi = target(law, table, beta)
    flow = pi[:, None] * k
    torch.testing.assert_close(flow, flow.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(pi @ k, pi, atol=1e-12, rtol=0)


def test_beta_to_infinity_leaves_the_policy(policy, law, table):
    states, k = kernel(policy, law, table, 1e12)
    p = torch.tensor([law[y] for y in states], dtype=torch.float64)
    torch.testing.assert_close(p @ k, p, atol=1e-10, rtol=0)
    torch.testing.assert_close(target(law, table, 1e12), p, atol=1e-10, rtol=0)


def test_reward_clamp_changes_the_target_only_where_it_binds(policy, law, table):
    big = {y: v * 40 for y, v in table.items()}  # rewards well beyond ±40
    assert any(abs(v) > 40 for v in big.values())
    states, k = kernel(policy, law, big, 20.0, reward_clamp=40.0, ratio_clamp=None)
    pi = target(law, big, 20.0, reward_clamp=40.0)
    torch.testing.assert_close(pi @ k, pi, atol=1e-12, rtol=0)
    unclamped = target(law, big, 20.0, reward_clamp=None)
    assert float((pi - unclamped).abs().sum()) > 1e-3  # the clamp binds: the target moved
    inside = target(law, table, 2.0, reward_clamp=40.0)
    torch.testing.assert_close(inside, target(law, table, 2.0, reward_clamp=None))


def _chains(policy, table, beta, steps, chains, **kw):
    strategy = QAlign(reward=TableReward(table), beta=beta, steps=steps, chains=chains, **kw)
    out = AlignedModel(policy, strategy=strategy).generate(
        input_ids=torch.tensor([PROMPT]), max_new_tokens=CAP, do_sample=True, top_k=0, eos_token_id=EOS,
        pad_token_id=PAD, seed=11, num_return_sequences=chains if kw.get("answer", "last") == "last" else 1,
        return_dict_in_generate=True)
    return out


def test_implementation_follows_the_exact_kernel_step_by_step(policy, law, table):
    beta, steps, chains = 1.0, 4, 3000
    states, k = kernel(policy, law, table, beta)
    mu = torch.tensor([law[y] for y in states], dtype=torch.float64)
    out = _chains(policy, table, beta, steps, chains)
    trace = out.alignment["trace"]
    for step in (0, 1, steps):
        counts = collections.Counter(tuple(y) for y in trace["states"][step])
        exact = {y: float(p) for y, p in zip(states, mu @ torch.linalg.matrix_power(k, step))}
        assert chi_square_p(counts, exact, chains) > 1e-3, step
    # And the chain's law approaches the target, which is far from the policy.
    pi = target(law, table, beta)
    assert float((mu - pi).abs().sum()) / 2 > 0.3
    assert float((mu @ torch.linalg.matrix_power(k, 60) - pi).abs().sum()) / 2 < 1e-3


def test_long_run_frequencies_match_the_target_in_total_variation(policy, law, table):
    beta, chains, steps = 1.0, 1000, 40
    out = _chains(policy, table, beta, steps, chains)
    states = sorted(law)
    pi = dict(zip(states, target(law, table, beta).tolist()))
    visits = collections.Counter(tuple(y) for s in out.alignment["trace"]["states"][20:] for y in s)
    total = sum(visits.values())
    tv = 0.5 * sum(abs(visits.get(y, 0) / total - pi[y]) for y in states)
    assert tv < 0.03, tv


def test_trace_bookkeeping(policy, table):
    out = _chains(policy, table, 1.0, 6, 5)
    tr = out.alignment["trace"]
    assert tr["rewards"].shape == (7, 5) and tr["accepted"].shape == (7, 5) and bool(tr["accepted"][0].all())
    for step in range(1, 7):
        for c in range(5):
            prop, prev, now = tr["proposals"][step - 1][c], tr["states"][step - 1][c], tr["states"][step][c]
            assert now == (prop if tr["accepted"][step, c] else prev)
            cut = int(tr["indices"][step - 1][c])
            assert prop[:cut] == prev[:cut] and len(prop) > cut and 0 <= cut < len(prev)
            assert float(tr["rewards"][step, c]) == table[tuple(now)]
    torch.testing.assert_close(tr["acceptance_rate"], tr["accepted"][1:].float().mean(0))
    # The returned rows are the final states.
    for c in range(5):
        n = int(out.alignment["lengths"][c])
        assert out.sequences[c, 2:2 + n].tolist() == tr["states"][-1][c]


def test_prefix_reuse_equals_regeneration_and_costs_less(policy, table):
    a = _chains(policy, table, 0.7, 8, 6)
    b = _chains(policy, table, 0.7, 8, 6, reuse_prefix=False)
    assert a.alignment["trace"]["states"] == b.alignment["trace"]["states"]
    assert torch.equal(a.sequences, b.sequences)


def test_final_answers_majority_and_best(policy, table):
    tok = tiny_tokenizer(64)
    model = tiny_llama(64, seed=52)
    extract = lambda text: (text.split() or [None])[0]  # noqa: E731
    from align_decode.rewards import CallableReward

    reward = CallableReward(lambda p, c: float(len(c.split())))
    common = dict(input_ids=torch.tensor([[7, 8, 9]]), max_new_tokens=4, do_sample=True, seed=2,
                  return_dict_in_generate=True)
    mv = AlignedModel(model, tokenizer=tok, strategy=QAlign(reward, steps=6, chains=3, burn_in=2, answer="majority",
                                                           extract=extract)).generate(**common)
    tr = mv.alignment["trace"]
    kept = [(k, c) for c in range(3) for k in range(2, 7)]
    answers = [extract(tok.decode(tr["states"][k][c], skip_special_tokens=True)) for k, c in kept]
    counts = collections.Counter(a for a in answers if a is not None)
    (step, chain), = mv.alignment["chosen"][0]
    chosen_answer = extract(tok.decode(tr["states"][step][chain], skip_special_tokens=True))
    assert counts[chosen_answer] == max(counts.values())
    best = AlignedModel(model, tokenizer=tok, strategy=QAlign(reward, steps=6, chains=3, answer="best")).generate(**common)
    assert float(best.alignment["rewards"][0]) == float(best.alignment["trace"]["rewards"].max())


@pytest.mark.parametrize("kwargs,msg", [
    ({"beta": 0.0}, "beta"),
    ({"beta": -2.0}, "beta"),
    ({"steps": -1}, "steps"),
    ({"chains": 0}, "chains"),
    ({"burn_in": 5, "steps": 2}, "burn_in"),
    ({"answer": "mode"}, "answer"),
    ({"answer": "majority", "answer_kind": "letters"}, "answer_kind"),
    ({"length_cap": "none"}, "length_cap"),
    ({"reward_clamp": 0.0}, "reward_clamp"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        QAlign(TableReward({}), **kwargs)


def test_official_suffix_cap_lets_responses_grow(policy):
    table = collections.defaultdict(float)
    out = _chains(policy, table, 1.0, 12, 50, length_cap="suffix")
    longest = max(len(y) for s in out.alignment["trace"]["states"] for y in s)
    assert longest > CAP


def test_every_sampled_token_is_counted_and_chain_steps_are_reported(policy, table):
    """The call's token count is every token drawn (state 0 and each proposal's suffix, accepted or not),
    not just the answers; progress reports each chain step, and the decoding steps inside them."""
    from align_decode.decoding import GenerationSettings, Policy, PromptBatch, left_pad

    reports = []
    steps, chains = 5, 4
    settings = GenerationSettings(max_new_tokens=CAP, do_sample=True, stop_ids=(EOS,), pad_id=PAD,
                                  num_return_sequences=chains, seeds=torch.tensor([7]),
                                  progress=lambda *report: reports.append(report))
    out = QAlign(reward=TableReward(table), steps=steps, chains=chains).run(
        Policy(policy), PromptBatch(*left_pad([PROMPT], PAD)), settings)
    trace = out.extras["trace"]
    suffixes = sum(len(p) - int(c) for k in range(steps) for p, c in zip(trace["proposals"][k], trace["indices"][k]))
    assert out.total_sampled() == sum(len(y) for y in trace["states"][0]) + suffixes
    assert out.total_sampled() > int(out.lengths.sum())
    assert [r for r in reports if r[0] == "chain step"] == [("chain step", k, steps) for k in range(steps + 1)]
    assert ("step", 1, CAP) in reports
