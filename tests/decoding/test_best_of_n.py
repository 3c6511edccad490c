"""Best-of-N: the exact law of the chosen response, chunking, votes, and errors."""

import collections

import pytest
import torch

from align_decode import AlignedModel, BestOfN, GenARM, ARM
from align_decode.decoding.best_of_n import vote
from align_decode.rewards import CallableReward, SequenceReward
from enumerate_law import TableReward, bon_law, chi_square_p, response_law
from tiny import EOS, PAD, tiny_llama, tiny_tokenizer

VOCAB, CAP, PROMPT = 5, 2, [3, 4]


@pytest.fixture(scope="module")
def policy():
    return tiny_llama(VOCAB, seed=41, init=0.5, dtype=torch.float64)


@pytest.fixture(scope="module")
def law(policy):
    return response_law(policy, PROMPT, CAP, EOS)


def _table(law):
    # Few reward levels so that ties matter; fixed by the response's tokens.
    return {y: float((3 * sum(y) + len(y)) % 4) for y in law}


def _draw(policy, table, n, trials, **kw):
    strategy = BestOfN(reward=TableReward(table), n=n, max_rows=kw.pop("max_rows", 4096))
    out = AlignedModel(policy, strategy=strategy).generate(
        input_ids=torch.tensor([PROMPT]).expand(trials, -1), max_new_tokens=CAP, do_sample=True, top_k=0,
        eos_token_id=EOS, pad_token_id=PAD, seed=list(range(trials)), return_dict_in_generate=True, **kw)
    picks = [tuple(out.sequences[i, len(PROMPT):len(PROMPT) + int(out.alignment["lengths"][i])].tolist())
             for i in range(trials)]
    return picks, out


@pytest.mark.parametrize("n", [1, 4])
def test_chosen_response_follows_the_exact_best_of_n_law(policy, law, n):
    table = _table(law)
    exact = bon_law(law, table, n)
    assert abs(sum(exact.values()) - 1) < 1e-9
    if n == 1:
        assert all(abs(exact[y] - law[y]) < 1e-12 for y in law)  # N = 1 is the policy itself
    trials = 6000
    picks, _ = _draw(policy, table, n, trials)
    p = chi_square_p(collections.Counter(picks), exact, trials)
    assert p > 1e-3, p  # fixed seeds, stated threshold


def test_best_of_n_quantile_law(policy, law):
    """The chosen reward's CDF is F^N: P(r* <= u) = F(u)^N at every reward level."""
    table, n, trials = _table(law), 3, 6000
    picks, _ = _draw(policy, table, n, trials)
    for u in sorted(set(table.values()))[:-1]:
        f = sum(q for y, q in law.items() if table[y] <= u)
        observed = sum(table[y] <= u for y in picks) / trials
        sd = (f**n * (1 - f**n) / trials) ** 0.5
        assert abs(observed - f**n) < 4 * sd + 1e-9, (u, observed, f**n)


def test_candidates_do_not_depend_on_chunking(policy, law):
    table = _table(law)
    _, a = _draw(policy, table, 5, 7, max_rows=3)
    _, b = _draw(policy, table, 5, 7, max_rows=4096)
    assert a.alignment["candidates"] == b.alignment["candidates"]
    assert torch.equal(a.alignment["rewards"], b.alignment["rewards"])
    assert torch.equal(a.sequences, b.sequences)


def test_returns_all_candidates_rewards_and_first_index_wins_ties(policy):
    table = collections.defaultdict(float)  # every reward 0: a tie everywhere
    out = AlignedModel(policy, strategy=BestOfN(reward=TableReward(table), n=6)).generate(
        input_ids=torch.tensor([PROMPT, PROMPT]), max_new_tokens=CAP, do_sample=True, eos_token_id=EOS,
        pad_token_id=PAD, seed=[1, 2], return_dict_in_generate=True)
    al = out.alignment
    assert al["rewards"].shape == (2, 6) and len(al["candidates"]) == 2 and len(al["candidates"][0]) == 6
    assert al["chosen"] == [[0], [0]]
    for b in range(2):
        got = out.sequences[b, 2:2 + int(al["lengths"][b])].tolist()
        assert got == al["candidates"][b][0]


def test_num_return_sequences_gives_the_top_candidates(policy, law):
    table = _table(law)
    out = AlignedModel(policy, strategy=BestOfN(reward=TableReward(table), n=8)).generate(
        input_ids=torch.tensor([PROMPT]), max_new_tokens=CAP, do_sample=True, eos_token_id=EOS, pad_token_id=PAD,
        seed=3, num_return_sequences=3, return_dict_in_generate=True)
    r = out.alignment["rewards"][0]
    chosen = out.alignment["chosen"][0]
    assert [float(r[i]) for i in chosen] == sorted(r.tolist(), reverse=True)[:3]


def test_majority_and_weighted_majority_votes():
    assert vote(["a", "b", "b", None, "a"]) == ("a", 2.0)  # tie: first seen wins
    assert vote(["a", "b", "b"], [0.5, 0.2, 0.2]) == ("a", 0.5)
    assert vote([None, None]) == (None, 0.0)
    tok = tiny_tokenizer(64)
    model = tiny_llama(64, seed=42)
    extract = lambda text: (text.split() or [None])[0]  # noqa: E731 - the answer is the first word
    reward = CallableReward(lambda p, c: float(len(c)))
    ids = torch.tensor([[7, 8, 9]])
    common = dict(input_ids=ids, max_new_tokens=3, do_sample=True, temperature=2.0, seed=5, return_dict_in_generate=True)
    mv = AlignedModel(model, tokenizer=tok, strategy=BestOfN(n=9, aggregate="majority", extract=extract)).generate(**common)
    answers = mv.alignment["answers"][0]
    counts = collections.Counter(a for a in answers if a is not None)
    top = max(counts.values())
    assert mv.alignment["voted"][0] == next(a for a in answers if a is not None and counts[a] == top)
    wmv = AlignedModel(model, tokenizer=tok, strategy=BestOfN(reward=reward, n=9, aggregate="weighted_majority",
                                                              extract=extract, beta=0.5)).generate(**common)
    r = wmv.alignment["rewards"][0].double()
    w = torch.softmax(r / 0.5, -1)
    totals = collections.defaultdict(float)
    for a, wi in zip(wmv.alignment["answers"][0], w.tolist()):
        if a is not None:
            totals[a] += wi
    assert wmv.alignment["voted"][0] == max(totals, key=totals.get)


def test_guided_proposal(policy):
    arm = tiny_llama(VOCAB, seed=43, dtype=torch.float64)
    strategy = BestOfN(reward=TableReward(collections.defaultdict(float)), n=3, proposal=GenARM(ARM(arm), beta=0.5))
    out = AlignedModel(policy, strategy=strategy).generate(
        input_ids=torch.tensor([PROMPT]), max_new_tokens=CAP, do_sample=True, eos_token_id=EOS, pad_token_id=PAD,
        seed=0, return_dict_in_generate=True)
    # The guided candidates are exactly what GenARM draws for the same seeds.
    direct = AlignedModel(policy, strategy=GenARM(ARM(arm), beta=0.5)).generate(
        input_ids=torch.tensor([PROMPT]), max_new_tokens=CAP, do_sample=True, eos_token_id=EOS, pad_token_id=PAD,
        seed=0, num_return_sequences=3, return_dict_in_generate=True)
    for j in range(3):
        row = direct.sequences[j, 2:2 + int(direct.alignment["lengths"][j])].tolist()
        assert out.alignment["candidates"][0][j] == row


class _Bad(SequenceReward):
    def __init__(self, kind):
        self.kind = kind

    def _score(self, prompts, completions):
        if self.kind == "nan":
            return [float("nan")] * len(prompts)
        return [0.0] * (len(prompts) + 1)


@pytest.mark.parametrize("kwargs,msg", [
    ({"n": 0}, "n must be"),
    ({"n": 2, "aggregate": "weighted_majority", "beta": 0.0, "extract": str}, "beta"),
    ({"n": 2, "aggregate": "mode"}, "aggregate"),
    ({"n": 2, "aggregate": "majority", "answer_kind": "letters"}, "answer_kind"),
    ({"n": 2, "reward": None}, "needs a reward"),
])
def test_bad_arguments(kwargs, msg):
    kwargs.setdefault("reward", TableReward({}))
    with pytest.raises(ValueError, match=msg):
        BestOfN(**kwargs)


@pytest.mark.parametrize("kind,msg", [("nan", "NaN"), ("shape", "shape")])
def test_bad_rewards_are_named(kind, msg):
    tok = tiny_tokenizer(64)
    model = tiny_llama(64)
    with pytest.raises(ValueError, match=msg):
        AlignedModel(model, tokenizer=tok, strategy=BestOfN(reward=_Bad(kind), n=2)).generate(
            input_ids=torch.tensor([[7, 8]]), max_new_tokens=2, do_sample=True)


def test_output_scores_is_refused_with_a_pointer(policy):
    with pytest.raises(ValueError, match="output_scores"):
        AlignedModel(policy, strategy=BestOfN(reward=TableReward({}), n=2)).generate(
            input_ids=torch.tensor([PROMPT]), max_new_tokens=2, output_scores=True, return_dict_in_generate=True)


def test_every_candidate_token_is_counted_and_candidates_are_reported():
    from align_decode.decoding import GenerationSettings, Policy, PromptBatch, left_pad

    model = tiny_llama(seed=3)
    reports = []
    settings = GenerationSettings(max_new_tokens=4, do_sample=True, stop_ids=(1,), pad_id=0,
                                  seeds=torch.tensor([5, 6]), progress=lambda *report: reports.append(report))
    reward = CallableReward(lambda prompts, completions: [float(len(c)) for c in completions], batched=True)
    out = BestOfN(reward, n=6, max_rows=4).run(Policy(model, tiny_tokenizer()), PromptBatch(*left_pad([[3, 4], [5]], 0)),
                                                settings)
    candidates = [c for per_prompt in out.extras["candidates"] for c in per_prompt]
    assert out.total_sampled() == sum(len(c) for c in candidates) > int(out.lengths.sum())
    drawn = [r for r in reports if r[0] == "candidates"]
    assert drawn[0] == ("candidates", 0, 12) and drawn[-1] == ("candidates", 12, 12)
    assert [d for _, d, _ in drawn] == sorted(d for _, d, _ in drawn)  # chunk by chunk (max_rows 4)
    assert len(drawn) > 2
