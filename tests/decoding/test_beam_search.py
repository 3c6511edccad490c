"""Step-level beam search and DVTS: with nothing pruned they are best-of-n (the exact law, against
enumeration), the answer is the argmax of what was completed, pruning keeps n / M beams, and errors."""

import pytest
import torch

from align_decode import DVTS, AlignedModel, StepBeamSearch
from align_decode.rewards.process import PrefixReward, ProcessReward
from enumerate_law import TableReward, bon_law, chi_square_p, response_law
from tiny import EOS, PAD, tiny_llama

VOCAB, CAP, PROMPT = 5, 2, [3, 4]


class Formula(TableReward):
    """The table's reward as a formula of the token ids, so partial responses have one too."""

    def __init__(self):
        super().__init__({})

    def score_ids(self, prompt_ids, completion_ids):
        return torch.tensor([reward_of(tuple(c)) for c in completion_ids])


def reward_of(y: tuple) -> float:
    return float((3 * sum(y) + len(y)) % 4)


class Steps(ProcessReward):
    """Records every call: how many partial responses each round scored."""

    name = "recording"

    def __init__(self):
        self.calls = []

    def _score(self, responses):
        self.calls.append(len(responses))
        return [float(sum(r.response_ids()) % 4) for r in responses]


@pytest.fixture(scope="module")
def policy():
    return tiny_llama(VOCAB, seed=41, init=0.5, dtype=torch.float64)


@pytest.fixture(scope="module")
def table(policy):
    law = response_law(policy, PROMPT, CAP, EOS)
    return law, {y: reward_of(y) for y in law}


def _generate(policy, strategy, trials, cap=CAP, **kw):
    return AlignedModel(policy, strategy=strategy).generate(
        input_ids=torch.tensor([PROMPT]).expand(trials, -1), max_new_tokens=cap, do_sample=True, top_k=0,
        eos_token_id=EOS, pad_token_id=PAD, seed=list(range(trials)), return_dict_in_generate=True, **kw)


def _answers(out, trials):
    a = out.alignment
    return [tuple(a["candidates"][r][a["chosen"][r][0]]) for r in range(trials)]


@pytest.mark.parametrize("cls", [StepBeamSearch, DVTS])
def test_beam_width_one_is_best_of_n_exactly(policy, table, cls):
    """Nothing pruned (beam width 1): n independent paths, the best by the final score, the first beam on
    ties: the exact best-of-n law, with the reward as the score of the last step."""
    law, rewards = table
    n, trials = 3, 3000
    search = cls(PrefixReward(Formula()), n=n, beam_width=1, step_delimiter=None, step_tokens=1)
    out = _generate(policy, search, trials)
    counts = {}
    for y in _answers(out, trials):
        counts[y] = counts.get(y, 0) + 1
    assert chi_square_p(counts, bon_law(law, rewards, n), trials) > 1e-3
    # ... and each answer is the argmax of the completed paths' scores, the first on ties.
    a = out.alignment
    for r in range(50):
        scores = a["scores"][r]
        assert len(a["candidates"][r]) == n
        assert scores == [rewards[tuple(c)] for c in a["candidates"][r]]
        assert a["chosen"][r] == [scores.index(max(scores))]


def test_beam_search_keeps_n_over_m_beams_and_extends_each_m_ways(policy):
    scorer = Steps()
    search = StepBeamSearch(scorer, n=6, beam_width=3, step_delimiter=None, step_tokens=1)
    out = _generate(policy, search, 1, cap=4)
    # Round 1 scores the 6 first steps; later rounds score 2 kept beams x 3 (fewer once beams complete).
    assert scorer.calls[0] == 6 and all(c <= 6 for c in scorer.calls[1:])
    a = out.alignment
    assert a["reward_calls"] == sum(scorer.calls) and a["rounds"] == len(scorer.calls)
    best = max(a["scores"][0])
    assert a["scores"][0][a["chosen"][0][0]] == best
    row = out.sequences[0, len(PROMPT):].tolist()
    chosen = a["candidates"][0][a["chosen"][0][0]]
    assert row[:len(chosen)] == chosen


def test_greedy_search_from_one_beam_is_the_policys_greedy_answer(policy):
    """With greedy steps every beam draws the same step: the answer is greedy decoding's."""
    search = StepBeamSearch(Steps(), n=4, beam_width=2, step_delimiter=None, step_tokens=2)
    out = AlignedModel(policy, strategy=search).generate(
        input_ids=torch.tensor([PROMPT]), max_new_tokens=5, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        return_dict_in_generate=True)
    plain = policy.generate(torch.tensor([PROMPT]), max_new_tokens=5, do_sample=False, eos_token_id=EOS,
                            pad_token_id=PAD)
    assert out.sequences[0].tolist()[:plain.shape[1]] == plain[0].tolist()


def test_dvts_answers_come_from_distinct_subtrees(policy):
    search = DVTS(Steps(), n=6, beam_width=2, step_delimiter=None, step_tokens=1)
    out = _generate(policy, search, 4, cap=3, num_return_sequences=3)
    for r in range(4):
        assert len(out.alignment["candidates"][r]) == 3  # one answer per subtree
    assert out.sequences.shape[0] == 12


def test_argument_errors(policy):
    with pytest.raises(ValueError, match="beam_width 5 is more than the 4 beams"):
        StepBeamSearch(Steps(), n=4, beam_width=5)
    with pytest.raises(ValueError, match="n must be a multiple of it"):
        DVTS(Steps(), n=6, beam_width=4)
    with pytest.raises(TypeError, match="a process reward, a value model or a sequence reward"):
        StepBeamSearch(object())
    with pytest.raises(ValueError, match="num_return_sequences=3 is more than the 2 answers"):
        _generate(policy, DVTS(Steps(), n=4, beam_width=2, step_tokens=1, step_delimiter=None), 1,
                  num_return_sequences=3)


def test_a_guided_proposal_keeps_its_guide_states_through_forks_and_segments():
    """Steps drawn by GenARM: every kept path's recorded log-probs are the mixed law's, recomputed from
    scratch (guide caches forked and dropped with the paths); and pruned best-of-N with one candidate
    draws exactly what GenARM draws, segment after segment."""
    from align_decode import ARM, GenARM, PrunedBestOfN
    from align_decode.decoding import GenerationSettings, Policy, PromptBatch

    policy, arm_model = tiny_llama(64, seed=2, dtype=torch.float64), tiny_llama(64, seed=9, dtype=torch.float64)
    proposal = GenARM([ARM(arm_model)], beta=1.0)
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    batch = PromptBatch(prompts, torch.ones_like(prompts))
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, stop_ids=(EOS,), pad_id=PAD,
                                  seeds=torch.tensor([3, 4]))
    search = StepBeamSearch(Steps(), n=4, beam_width=2, step_delimiter=None, step_tokens=2, proposal=proposal)
    out = search.run(Policy(policy), batch, settings)
    for row in range(2):
        seq = prompts[row].tolist()
        for t in range(int(out.lengths[row])):
            with torch.no_grad():
                p = torch.log_softmax(policy(torch.tensor([seq])).logits[0, -1], -1)
                a = torch.log_softmax(arm_model(torch.tensor([seq])).logits[0, -1], -1)
            mixed = torch.log_softmax(p + a, -1)
            token = int(out.tokens[row, t])
            assert float(out.logprobs[row, t]) == pytest.approx(float(mixed[token]), abs=1e-6)
            seq.append(token)

    kw = dict(input_ids=prompts, max_new_tokens=7, do_sample=True, top_k=0, seed=[1, 2], eos_token_id=EOS,
              pad_token_id=PAD)
    direct = AlignedModel(policy, strategy=proposal).generate(**kw)
    pruned = PrunedBestOfN(Formula(), n=1, prune_at=(2, 5), keep_fraction=0.5, proposal=proposal)
    assert torch.equal(AlignedModel(policy, strategy=pruned).generate(**kw), direct)
