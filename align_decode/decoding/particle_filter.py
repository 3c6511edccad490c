"""Particle filtering and particle Gibbs over reasoning steps (Puri et al. 2025, "A probabilistic inference
approach to inference-time scaling of LLMs using particle-based Monte Carlo methods"; its_hub ships it).

The partial response after t steps is the hidden state of a state-space model whose transition is the
policy drawing one more step and whose observation is the process reward. With N particles, each round:

  1. every unfinished particle draws its next step from the policy (or a proposal);
  2. every particle gets a log-weight  log G_t = phi(s_t) / tau,  s_t its aggregated step score,
     phi = logit (the paper's: log(s / (1 - s)), s a PRM probability), log, or the score itself;
     a particle that finished in an earlier round keeps its final weight (the paper's code), or weight 1
     (finished_weight="none");
  3. unless every particle finished, N ancestors are drawn with probabilities softmax(log G)
     (multinomial, systematic or stratified resampling) and the particles become copies of them.

This is sequential importance resampling for the target

    gamma(y) = p(y | x) * prod_t G_t(y_<=t)

(with finished_weight="none" the product runs over the response's own steps, so the target does not
depend on how many rounds run). For any N the weighted particles are an importance sampler of it: with
Z_hat = prod_rounds mean_i G_t(particle i) (the evidence, `log_evidence` in the report) and the final
normalised weights W_i, E[Z_hat * sum_i W_i f(y_i)] = sum_y gamma(y) f(y), so the self-normalised
estimate converges to gamma / Z as N or the number of runs grows. The answer is the particle with the
highest final weight (the paper's default) or one drawn from the final weights (select="sample", the
SMC draw of gamma / Z).

Particle Gibbs (iterations > 1): each later iteration keeps one reference particle drawn from the last
iteration's final weights; in every round the reference is held at its own first t steps (conditional
SMC) and the other N - 1 particles are resampled from all N, reference included (a copy of the
reference continues from its first t steps). The reference chain is a Markov chain whose stationary law
is exactly gamma / Z for any N >= 2 (with finished_weight="none").

Random streams: slot j of a prompt draws its step from its own stream in every round and iteration;
resampling and selection draw from the prompt's seed, so a prompt's result never depends on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import derive_seeds
from .loop import Decoded
from .options import ParticleFilterOptions
from .report import Report
from .step_search import Path, StepSearch, choose_best, paths_decoded, round_seeds, score_paths, seeded_uniforms

_RESAMPLE, _SELECT, _REFERENCE = 0, 1, 2  # what a prompt's uniforms are for


@dataclass
class ParticleFilterReport(Report):
    """One call of particle filtering (the last iteration's particles), per prompt."""

    candidates: list[list[list[int]]]  # [prompts][N] the final particles' token ids
    log_weights: list[list[float]]  # [prompts][N] their final log-weights
    step_scores: list[list[list[float]]]  # [prompts][N] every step's score
    chosen: list[list[int]]  # [prompts][returned] indices into candidates
    log_evidence: list[float]  # [prompts] log Z_hat of the last iteration
    resampled: list[list[list[int]]]  # [prompts][rounds] the ancestors drawn in each round
    rounds: int  # rounds run, all iterations together
    forward_tokens: int  # token positions run through the policy (or computed by an engine)
    reward_calls: int  # partial responses scored by the process reward
    sampled_tokens: int  # tokens drawn, kept or not


def resample(weights: torch.Tensor, count: int, uniforms: torch.Tensor, scheme: str) -> list[int]:
    """`count` ancestor indices drawn with probabilities `weights` (normalised, [N]); each index i is drawn
    count * weights[i] times in expectation under every scheme. `uniforms` holds `count` U(0, 1)."""
    cdf = torch.cumsum(weights.double(), 0)
    cdf[-1] = 1.0  # rounding must not leave a gap at the top
    u = uniforms[:count].double()
    if scheme == "stratified":
        u = (torch.arange(count, dtype=torch.float64) + u) / count
    elif scheme == "systematic":
        u = (torch.arange(count, dtype=torch.float64) + u[0]) / count
    elif scheme != "multinomial":
        raise ValueError(f"resampling must be multinomial, systematic or stratified, got {scheme!r}")
    return torch.searchsorted(cdf, u, right=True).clamp(max=weights.shape[0] - 1).tolist()


def log_potential(score: float, phi: str, temperature: float) -> float:
    """log G = phi(s) / tau."""
    if phi == "logit":
        if not 0 <= score <= 1:
            raise ValueError(f"potential='logit' reads step scores as probabilities in [0, 1], got {score}: use "
                             "potential='score' (--potential score) for a scorer that is not a probability")
        s = min(max(score, 1e-7), 1 - 1e-7)
        value = math.log(s / (1 - s))
    elif phi == "log":
        if score < 0:
            raise ValueError(f"potential='log' needs step scores >= 0, got {score}")
        value = math.log(score) if score > 0 else -math.inf
    else:
        value = score
    return value / temperature


class ParticleFilter(StepSearch):
    """Particle filtering (and particle Gibbs) over reasoning steps with a process reward (see the module
    docstring for the algorithm and the law it samples).

    Args:
        scorer: a ProcessReward (e.g. TransformersPRM), a value model from `train-value`, or a sequence
            reward applied to the partial responses.
        n: particles per prompt.
        temperature: tau in G = exp(phi(s) / tau).
        potential: phi: "logit" (PRM probabilities, the paper's), "log", "score", or "auto" (logit for a
            scorer whose scores are probabilities, a TransformersPRM's, else score).
        finished_weight: "final" (a finished particle keeps its final weight, the paper's code) or "none"
            (weight 1 once finished: the target p(y) prod_t G_t over the response's own steps).
        resampling: "multinomial", "systematic" or "stratified".
        iterations: 1 for particle filtering; more for particle Gibbs.
        select: "best" (the highest final weight) or "sample" (a draw from the final weights).
        step_delimiter / step_tokens / max_steps / aggregate / proposal / engine: as StepBeamSearch.
        (The options are declared with their ranges in `decoding.options.ParticleFilterOptions`.)

    Example:
        >>> pf = ParticleFilter(TransformersPRM.from_folder("/models/prm"), n=16)
        >>> out = AlignedModel(model, tokenizer=tok, strategy=pf).generate(**inputs, do_sample=True,
        ...                                                                return_dict_in_generate=True)
        >>> out.alignment["log_weights"][0]   # prompt 0: the final particles' log-weights
    """

    name = "particle_filter"
    options_class = ParticleFilterOptions

    def __init__(self, scorer, n: int = ParticleFilterOptions.n, *,
                 temperature: float = ParticleFilterOptions.temperature,
                 potential: str = ParticleFilterOptions.potential,
                 finished_weight: str = ParticleFilterOptions.finished_weight,
                 resampling: str = ParticleFilterOptions.resampling,
                 iterations: int = ParticleFilterOptions.iterations, select: str = ParticleFilterOptions.select,
                 step_delimiter: str | None = ParticleFilterOptions.step_delimiter,
                 step_tokens: int | None = ParticleFilterOptions.step_tokens,
                 max_steps: int = ParticleFilterOptions.max_steps, aggregate: str = ParticleFilterOptions.aggregate,
                 proposal=None, engine=None):
        super().__init__(scorer, proposal=proposal, engine=engine, n=n, temperature=temperature,
                         potential=potential, finished_weight=finished_weight, resampling=resampling,
                         iterations=iterations, select=select, step_delimiter=step_delimiter,
                         step_tokens=step_tokens, max_steps=max_steps, aggregate=aggregate)
        if iterations > 1 and n < 2:
            raise ValueError("particle Gibbs (iterations > 1) needs n >= 2: one reference and a free particle")
        # auto: a PRM's probabilities are weighted by their log-odds (the paper's), any other score as it is.
        self.phi = potential if potential != "auto" else "logit" if self.scorer.probabilities else "score"

    def _log_weight(self, state: Path, moved: bool) -> float:
        """log G of a particle's state this round; `moved`: it drew a step this round."""
        o = self.options
        if not moved and o.finished_weight == "none":
            return 0.0
        return log_potential(state.score(o.aggregate), self.phi, o.temperature)

    def search(self, frontier, boundary, batch, settings, tokenizer) -> Decoded:
        o, m = self.options, settings.num_return_sequences
        if m > o.n:
            raise ValueError(f"num_return_sequences={m} is more than the n={o.n} particles")
        slot_seeds = settings.row_seeds(batch.size, o.n)
        prompt_seeds = torch.as_tensor(settings.seeds, dtype=torch.long)
        refs: list[Path | None] = [None] * batch.size
        rounds = calls = 0
        for it in range(o.iterations):
            free = o.n - (0 if it == 0 else 1)
            particles = frontier.start([free] * batch.size)
            groups = [[p for p in particles if p.prompt == b] for b in range(batch.size)]
            log_z = [0.0] * batch.size
            resampled: list[list[list[int]]] = [[] for _ in range(batch.size)]
            done = [False] * batch.size
            final = [None] * batch.size
            for r in range(o.max_steps):
                moved = {id(p) for p in frontier.live}
                seeds = self._seeds(frontier.live, groups, slot_seeds, o.n, it * (o.max_steps + 1) + r)
                extended = self.extend(frontier, boundary, seeds, settings)
                score_paths(self.scorer, extended, batch, tokenizer, boundary)
                calls += len(extended)
                rounds += 1
                settings.report("search step", r + 1, o.max_steps)
                sources, adopt = [], []
                for b in range(batch.size):
                    if done[b]:
                        continue
                    states = list(groups[b])
                    flags = [id(p) in moved for p in states]
                    if refs[b] is not None:
                        states.append(refs[b].truncated(r + 1))
                        flags.append(len(refs[b].step_ends) > r)
                    logw = torch.tensor([self._log_weight(p, f) for p, f in zip(states, flags)], dtype=torch.float64)
                    if bool(torch.isinf(logw).all()) and bool((logw < 0).all()):
                        raise ValueError(f"every particle of prompt {b} has weight 0 in round {r + 1}")
                    log_z[b] += float(torch.logsumexp(logw, 0)) - math.log(len(states))
                    if all(p.finished for p in states) or r == o.max_steps - 1:
                        done[b], final[b] = True, (states, logw)
                        continue
                    u = seeded_uniforms(int(prompt_seeds[b]), free, _salt(it, r, _RESAMPLE))
                    ancestors = resample(torch.softmax(logw, 0), free, u, o.resampling)
                    resampled[b].append(ancestors)
                    picked = [states[a] for a in ancestors]
                    if refs[b] is not None:
                        # Copies of the reference go on from its first r + 1 steps: give them model state.
                        ref_state = states[-1]
                        fresh = [ref_state.copy() if a == len(states) - 1 and not ref_state.finished else None
                                 for a in ancestors]
                        adopt += [c for c in fresh if c is not None]
                        picked = [c if c is not None else s for c, s in zip(fresh, picked)]
                    sources += picked
                frontier.adopt(adopt)
                arranged = frontier.arrange(sources) if sources or frontier.live else []
                cursor = 0
                for b in range(batch.size):
                    if not done[b]:
                        groups[b] = arranged[cursor:cursor + free]
                        cursor += free
                if all(done):
                    break
            if it < o.iterations - 1:
                refs = [self._reference(states, logw, int(prompt_seeds[b]), it) for b, (states, logw) in enumerate(final)]
        return self._answer(final, log_z, resampled, frontier, settings, rounds, calls)

    def _seeds(self, live, groups, slot_seeds, n: int, round_: int) -> torch.Tensor:
        slot = {}
        for b, group in enumerate(groups):
            for j, p in enumerate(group):
                slot[id(p)] = b * n + j
        index = torch.tensor([slot[id(p)] for p in live], dtype=torch.long)
        return round_seeds(slot_seeds[index], round_)

    def _reference(self, states, logw, seed: int, it: int) -> Path:
        u = seeded_uniforms(seed, 1, _salt(it, 0, _REFERENCE))
        return states[resample(torch.softmax(logw, 0), 1, u, "multinomial")[0]]

    def _answer(self, final, log_z, resampled, frontier, settings, rounds: int, calls: int) -> Decoded:
        o, m = self.options, settings.num_return_sequences
        chosen, returned = [], []
        for b, (states, logw) in enumerate(final):
            if o.select == "best":
                idx = choose_best(logw.tolist(), m)
            else:
                u = seeded_uniforms(int(settings.seeds[b]), m, _salt(o.iterations, 0, _SELECT))
                idx = resample(torch.softmax(logw, 0), m, u, "multinomial")
            chosen.append(idx)
            returned += [states[i] for i in idx]
        report = ParticleFilterReport(
            candidates=[[p.tokens for p in states] for states, _ in final],
            log_weights=[logw.tolist() for _, logw in final],
            step_scores=[[list(p.scores) for p in states] for states, _ in final],
            chosen=chosen, log_evidence=log_z, resampled=resampled, rounds=rounds,
            forward_tokens=frontier.forward_tokens, reward_calls=calls, sampled_tokens=frontier.sampled,
        )
        device = frontier.batch.input_ids.device
        return paths_decoded(returned, settings.pad_id, device, rounds, report, frontier.sampled)


def _salt(iteration: int, round_: int, purpose: int) -> int:
    return (iteration * 100_003 + round_) * 4 + purpose
