"""Particle filtering and particle Gibbs: the importance-sampling law against exact enumeration, the
reference chain's stationary law, resampling schemes, and errors."""

import math

import pytest
import torch

from align_decode import AlignedModel, ParticleFilter
from align_decode.decoding.particle_filter import log_potential, resample
from align_decode.rewards.process import ProcessReward
from enumerate_law import chi_square_p, response_law
from tiny import EOS, PAD, tiny_llama

VOCAB, CAP, PROMPT = 5, 2, [3, 4]


class PrefixTable(ProcessReward):
    """A step score looked up by the response so far (token ids): the tests' exact process reward."""

    name = "prefix-table"

    def _score(self, responses):
        return [score_of(tuple(r.response_ids())) for r in responses]


def score_of(prefix: tuple) -> float:
    return 0.9 * ((2 * sum(prefix) + len(prefix)) % 3) - 0.6


@pytest.fixture(scope="module")
def policy():
    return tiny_llama(VOCAB, seed=41, init=0.5, dtype=torch.float64)


@pytest.fixture(scope="module")
def target(policy):
    """gamma(y) = p(y) prod_t exp(s(y_<=t)) over the response's own steps (one token a step), normalised."""
    law = response_law(policy, PROMPT, CAP, EOS)
    gamma = {y: p * math.exp(sum(score_of(y[:t]) for t in range(1, len(y) + 1))) for y, p in law.items()}
    z = sum(gamma.values())
    return {y: g / z for y, g in gamma.items()}, z


def _run(policy, trials, **options):
    pf = ParticleFilter(PrefixTable(), step_delimiter=None, step_tokens=1, potential="score",
                        finished_weight="none", **options)
    out = AlignedModel(policy, strategy=pf).generate(
        input_ids=torch.tensor([PROMPT]).expand(trials, -1), max_new_tokens=CAP, do_sample=True, top_k=0,
        eos_token_id=EOS, pad_token_id=PAD, seed=list(range(trials)), return_dict_in_generate=True)
    return out


@pytest.mark.parametrize("resampling", ["multinomial", "systematic"])
def test_weighted_particles_are_an_importance_sampler_of_the_target(policy, target, resampling):
    """E[Z_hat * sum_i W_i 1{y_i = y}] = gamma(y) exactly, for any N: checked cell by cell against
    enumeration, and E[Z_hat] = Z."""
    law, z = target
    trials, n = 3000, 3
    out = _run(policy, trials, n=n, resampling=resampling)
    a = out.alignment
    contributions = {y: torch.zeros(trials, dtype=torch.float64) for y in law}
    evidence = torch.tensor(a["log_evidence"], dtype=torch.float64).exp()
    for run in range(trials):
        w = torch.softmax(torch.tensor(a["log_weights"][run], dtype=torch.float64), 0)
        for cand, wi in zip(a["candidates"][run], w.tolist()):
            contributions[tuple(cand)][run] += evidence[run] * wi
    assert set(map(tuple, (c for run in a["candidates"] for c in run))) <= set(law)
    assert float(evidence.mean()) == pytest.approx(z, rel=4.5 * float(evidence.std()) / math.sqrt(trials) / z)
    for y, x in contributions.items():
        mean, se = float(x.mean()), float(x.std()) / math.sqrt(trials)
        assert abs(mean - law[y] * z) <= 4.5 * se + 1e-3, (y, mean, law[y] * z, se)


def _picks(out, trials):
    picks = {}
    for run in range(trials):
        chosen = out.alignment["chosen"][run][0]
        y = tuple(out.alignment["candidates"][run][chosen])
        picks[y] = picks.get(y, 0) + 1
    return picks


def test_particle_gibbs_reference_chain_reaches_the_target(policy, target):
    """The particle Gibbs kernel leaves gamma / Z invariant: after a few iterations the draw from the final
    weights (the next reference) follows it. The particle filter's own draw (one iteration) is biased at
    this N, and the test tells the two apart."""
    law, _ = target
    trials = 1200
    gibbs = _run(policy, trials, n=4, iterations=6, select="sample")
    assert chi_square_p(_picks(gibbs, trials), law, trials) > 1e-3
    filtering = _run(policy, trials, n=4, iterations=1, select="sample")
    assert chi_square_p(_picks(filtering, trials), law, trials) < 1e-6


def test_one_particle_without_resampling_is_the_policy(policy):
    """N = 1: the particle is a plain sample of the policy (the weights change nothing)."""
    law = response_law(policy, PROMPT, CAP, EOS)
    trials = 2000
    out = _run(policy, trials, n=1)
    counts = {}
    for run in range(trials):
        y = tuple(out.alignment["candidates"][run][0])
        counts[y] = counts.get(y, 0) + 1
    assert chi_square_p(counts, law, trials) > 1e-3


def test_best_selection_returns_the_heaviest_particle_and_reports_accounting(policy):
    out = _run(policy, 20, n=4, select="best")
    a = out.alignment
    for run in range(20):
        weights = a["log_weights"][run]
        assert a["chosen"][run] == [max(range(4), key=lambda i: (weights[i], -i))]
        chosen = a["candidates"][run][a["chosen"][run][0]]
        row = out.sequences[run, len(PROMPT):len(PROMPT) + len(chosen)].tolist()
        assert row == chosen
    assert a["reward_calls"] > 0 and a["forward_tokens"] > 0 and a["sampled_tokens"] >= 20 * 4


def test_resampling_schemes_draw_each_index_in_proportion_to_its_weight():
    weights = torch.tensor([0.1, 0.0, 0.6, 0.3])
    gen = torch.Generator().manual_seed(0)
    for scheme in ("multinomial", "systematic", "stratified"):
        counts = torch.zeros(4)
        for _ in range(4000):
            for i in resample(weights, 5, torch.rand(5, generator=gen, dtype=torch.float64), scheme):
                counts[i] += 1
        assert counts[1] == 0
        assert torch.allclose(counts / counts.sum(), weights, atol=0.02), (scheme, counts)
    # Systematic resampling with equal weights keeps every particle exactly once.
    assert resample(torch.full((4,), 0.25), 4, torch.tensor([0.3, 0.9, 0.1, 0.5], dtype=torch.float64),
                    "systematic") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="multinomial, systematic or stratified"):
        resample(weights, 2, torch.rand(2, dtype=torch.float64), "residual")


def test_potentials():
    assert log_potential(0.8, "logit", 2.0) == pytest.approx(math.log(4) / 2)
    assert log_potential(0.5, "log", 1.0) == pytest.approx(math.log(0.5))
    assert log_potential(-3.0, "score", 0.5) == -6.0
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\].*potential='score'"):
        log_potential(-0.2, "logit", 1.0)


def test_argument_errors():
    with pytest.raises(ValueError, match="iterations > 1.*n >= 2"):
        ParticleFilter(PrefixTable(), n=1, iterations=2)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ParticleFilter(PrefixTable(), temperature=0)
    with pytest.raises(ValueError, match="resampling must be one of"):
        ParticleFilter(PrefixTable(), resampling="residual")
    with pytest.raises(ValueError, match="step_delimiter or step_tokens"):
        ParticleFilter(PrefixTable(), step_delimiter=None)
    with pytest.raises(ValueError, match="needs a process reward"):
        ParticleFilter(None)
