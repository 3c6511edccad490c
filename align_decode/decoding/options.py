"""Each decoding method's options, declared once (see `align_decode.options` for how a declaration
becomes constructor defaults, command-line flags, config keys and validation).

    >>> QAlignOptions(steps=32, beta=0.5).burn_in
    0
    >>> with named_as_flags():
    ...     QAlignOptions(beta=-1.0)
    Traceback (most recent call last):
    ValueError: --beta must be a finite number > 0, got -1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..options import Options, named_as_flags, option
from ..validation import AT_LEAST_ONE, FINITE, NON_NEGATIVE_INT, POSITIVE, Bounds

__all__ = ["METHOD_OPTIONS", "MethodOptions", "named_as_flags"]


class MethodOptions(Options):
    """A method's options; `method` is the method's command-line name."""

    method: ClassVar[str] = ""


_DEFAULT_BETA = 1.0  # GenARM's and TokenwiseCD's single-guide strength when no weights are given


class _GuideWeights(MethodOptions):
    """Options of a method that mixes several guides: `weights` (one per guide, in order) or one option
    that weighs a single guide (GenARM's beta, TokenwiseCD's strength), never both."""

    _single: ClassVar[str]  # the single-guide option's field
    _guide: ClassVar[str]  # what a guide is called in messages
    _default_each: ClassVar[bool]  # without either option: the default weight for every guide (else one guide only)

    def _single_weight(self) -> float:
        raise NotImplementedError

    def check(self) -> None:
        if getattr(self, self._single) is not None and self.weights is not None:
            raise ValueError(f"give either {self.label(self._single)} (one {self._guide}) or {self.label('weights')} "
                             f"(one per {self._guide}), not both")

    def guide_weights(self, count: int) -> list[float]:
        """One weight per guide: the given weights, or the single-guide option's weight."""
        if self.weights is not None:
            if len(self.weights) != count:
                raise ValueError(f"{self.label('weights')} has {len(self.weights)} value(s) for {count} "
                                 f"{self._guide}(s)")
            return list(self.weights)
        if count != 1 and (getattr(self, self._single) is not None or not self._default_each):
            raise ValueError(f"{self.label(self._single)} sets the weight of a single {self._guide}; with {count} "
                             f"{self._guide}s give {self.label('weights')} (one per {self._guide})")
        return [self._single_weight()] * count


# ------------------------------------------------------------------------------------------ GenARM
@dataclass(frozen=True)
class GenARMOptions(_GuideWeights):
    method: ClassVar[str] = "genarm"
    _single, _guide, _default_each = "beta", "ARM", False
    beta: float | None = option(None, f"KL strength of a single ARM, weight 1/beta [{_DEFAULT_BETA} without weights]",
                                bounds=Bounds(gt=0, allow_none=True))
    weights: tuple[float, ...] | None = option(None, "one weight per ARM, in order (instead of beta)", flag="weight",
                                               multiple=True, bounds=FINITE, metavar="W")
    temperature_semantics: str = option("paper", "how the temperature enters the mix: the paper's, or the official "
                                        "code's 'model_arithmetic'", choices=("paper", "model_arithmetic"))
    normalize_logit: bool = option(False, "with model_arithmetic, divide by 1 + sum(weights) only (the official "
                                   "flag)", cli=False)

    def _single_weight(self) -> float:
        return 1.0 / (_DEFAULT_BETA if self.beta is None else self.beta)


# ------------------------------------------------------------------------------------ best-of-N
ANSWER_KINDS = ("number", "boxed", "option")


@dataclass(frozen=True)
class BestOfNOptions(MethodOptions):
    method: ClassVar[str] = "best_of_n"
    n: int = option(4, "candidates per prompt (the command line's --n)", bounds=AT_LEAST_ONE, cli=False)
    aggregate: str = option("best", "how the answer is picked: the best reward, or a (reward-weighted) vote on "
                            "extracted answers", choices=("best", "majority", "weighted_majority"))
    beta: float = option(1.0, "temperature of the weighted vote's softmax(r / beta)", bounds=POSITIVE)
    answer_kind: str = option("number", "what a vote compares: the final number, the \\boxed{} answer or the "
                              "option letter", choices=ANSWER_KINDS)
    max_rows: int = option(64, "most rows decoded at once (memory bound; the result does not depend on it)",
                           bounds=AT_LEAST_ONE, cli=False)


# --------------------------------------------------------------------------------------- QAlign
@dataclass(frozen=True)
class QAlignOptions(MethodOptions):
    method: ClassVar[str] = "qalign"
    beta: float = option(1.0, "reward temperature of the target p(y|x) exp(r/beta): smaller trusts the reward more",
                         bounds=POSITIVE)
    steps: int = option(16, "Metropolis-Hastings steps per chain", bounds=NON_NEGATIVE_INT)
    chains: int = option(1, "independent chains per prompt (command line default: --n)", bounds=AT_LEAST_ONE)
    burn_in: int = option(0, "steps left out of the majority / best answers", bounds=NON_NEGATIVE_INT)
    thin: int = option(1, "keep every thin-th step for the majority / best answers", bounds=AT_LEAST_ONE)
    answer: str = option("last", "the answer: each chain's last state, a vote over kept states, or the best kept "
                         "state", choices=("last", "majority", "best"), flag="chain_answer")
    answer_kind: str = option("number", "what a vote compares: the final number, the \\boxed{} answer or the "
                              "option letter", choices=ANSWER_KINDS)
    length_cap: str = option("response", "what the token budget caps: the whole response, or each resampled "
                             "suffix (the official code)", choices=("response", "suffix"))
    reward_clamp: float | None = option(40.0, "rewards are clamped to [-c, c] (the official code's 40)",
                                        bounds=Bounds(gt=0, allow_none=True), cli=False)
    log_ratio_clamp: float | None = option(20.0, "the acceptance log-ratio is clamped to [-c, c]",
                                           bounds=Bounds(gt=0, allow_none=True), cli=False)
    reuse_prefix: bool = option(True, "keep the kept prefix's KV cache between steps", cli=False)

    def check(self) -> None:
        if self.burn_in > self.steps:
            raise ValueError(f"{self.label('burn_in')} {self.burn_in} leaves no state of the {self.steps} steps "
                             f"({self.label('steps')})")


# --------------------------------------------------------------------------- controlled decoding
@dataclass(frozen=True)
class TokenwiseCDOptions(_GuideWeights):
    method: ClassVar[str] = "cd_tokenwise"
    _single, _guide, _default_each = "strength", "value model", True
    strength: float | None = option(None, f"lambda, the weight of a single value model [{_DEFAULT_BETA}]",
                                    bounds=Bounds(allow_none=True), cli=False)
    weights: tuple[float, ...] | None = option(None, "lambda of each value model, in order [1.0 each]",
                                               flag="value_weight", multiple=True, bounds=FINITE, metavar="W")

    def _single_weight(self) -> float:
        return _DEFAULT_BETA if self.strength is None else self.strength


@dataclass(frozen=True)
class BlockwiseCDOptions(MethodOptions):
    method: ClassVar[str] = "cd_blockwise"
    num_candidates: int = option(4, "blocks drawn per step, K", bounds=AT_LEAST_ONE)
    block_size: int = option(8, "tokens per block, M; M >= the token budget is best-of-K", bounds=AT_LEAST_ONE)


# ------------------------------------------------------------------------------------------- ARGS
@dataclass(frozen=True)
class ARGSOptions(MethodOptions):
    method: ClassVar[str] = "args"
    weight: float = option(1.5, "w in log p(v) + w * r(prefix + v)", bounds=FINITE, flag="reward_weight")
    k: int = option(10, "top-k tokens of the policy scored per step", bounds=AT_LEAST_ONE, flag="candidate_tokens")
    stop_at_eos: bool = option(True, "false: write the whole token budget whatever comes, as the official code")


# ------------------------------------------------------------------------------------- Transfer Q*
@dataclass(frozen=True)
class TransferQOptions(MethodOptions):
    method: ClassVar[str] = "transfer_q"
    alpha: float = option(1.0, "alpha in log pi(v) + alpha Q(prefix + v)", bounds=FINITE)
    k: int = option(10, "top-k tokens of the prior scored per step", bounds=AT_LEAST_ONE, flag="candidate_tokens")
    rollout_len: int | None = option(20, "tokens per rollout (0 scores prefix + candidate; None: to the end of the "
                                     "response budget)", bounds=Bounds(ge=0, integer=True, allow_none=True))
    num_rollouts: int = option(1, "rollouts per candidate (> 1 needs sampled rollouts)", bounds=AT_LEAST_ONE)
    rollout_sampling: str = option("greedy", "greedy rollouts (the official code) or sampled ones",
                                   choices=("greedy", "sample"))
    rollout_temperature: float = option(1.0, "temperature of sampled rollouts", bounds=POSITIVE, cli=False)
    transfer: str = option("direct", "direct (the baseline's reward is the target), or indirect with a second "
                           "reward r_BL that the baseline is aligned to", choices=("direct", "indirect"))
    beta: float = option(1.0, "indirect transfer's temperature in exp((r - r_BL)/beta)", bounds=POSITIVE)
    normalize_weights: bool = option(True, "indirect transfer: importance weights normalised over the rollouts, "
                                     "or raw exp((r - r_BL)/beta) as the official code", flag="importance_weights",
                                     from_flag=lambda text: text == "normalized", flag_choices=("normalized", "raw"))
    prior: str = option("policy", "the prior term and candidate source: the policy (the paper) or the baseline "
                        "(the official code)", choices=("policy", "baseline"))
    max_rollout_rows: int = option(256, "most rollout rows decoded at once (memory bound)", bounds=AT_LEAST_ONE,
                                   cli=False)
    trace_rollouts: bool = option(False, "keep every rollout's tokens and rewards in the trace", cli=False)

    def check(self) -> None:
        if self.rollout_sampling == "greedy" and self.num_rollouts > 1:
            raise ValueError(f"{self.label('num_rollouts')} {self.num_rollouts} with greedy rollouts repeats one "
                             f"rollout; use {self.label('rollout_sampling')} sample")


# ------------------------------------------------------------------------------ step-level search
STEP_AGGREGATES = ("last", "min", "product")


def _delimiter_from_flag(text: str) -> str | None:
    """--step-delimiter as typed: backslash escapes read ("\\n\\n" is a blank line), "none" turns it off."""
    return None if text.lower() == "none" else text.encode("latin-1", "backslashreplace").decode("unicode_escape")


@dataclass(frozen=True)
class _StepSearchOptions(MethodOptions):
    """What every step-level search takes: where a step ends, how many rounds, how a path is scored."""

    step_delimiter: str | None = option("\n\n", "text that ends a reasoning step, backslash escapes read (none: "
                                        "steps of --step-tokens tokens only)", from_flag=_delimiter_from_flag,
                                        metavar="TEXT")
    step_tokens: int | None = option(None, "most tokens per step (a step also ends at the delimiter)",
                                     bounds=Bounds(ge=1, integer=True, allow_none=True))
    max_steps: int = option(32, "most steps per response: rounds of the search", bounds=AT_LEAST_ONE)
    aggregate: str = option("last", "a path's score from its step scores: the last, the smallest, or their product",
                            choices=STEP_AGGREGATES, flag="step_aggregate")

    def check(self) -> None:
        if self.step_delimiter is None and self.step_tokens is None:
            raise ValueError(f"a step needs {self.label('step_delimiter')} or {self.label('step_tokens')}")
        if self.step_delimiter == "":
            raise ValueError(f"{self.label('step_delimiter')} must not be empty (none turns it off)")


@dataclass(frozen=True)
class BeamSearchOptions(_StepSearchOptions):
    method: ClassVar[str] = "beam_search"
    n: int = option(8, "beams: paths extended each round (the command line's --n)", bounds=AT_LEAST_ONE, cli=False)
    beam_width: int = option(4, "M: every kept path is extended M ways, n / M paths are kept each round",
                             bounds=AT_LEAST_ONE)

    def check(self) -> None:
        super().check()
        if self.beam_width > self.n:
            raise ValueError(f"{self.label('beam_width')} {self.beam_width} is more than the {self.n} beams "
                             f"({self.label('n')})")


@dataclass(frozen=True)
class DVTSOptions(BeamSearchOptions):
    method: ClassVar[str] = "dvts"

    def check(self) -> None:
        super().check()
        if self.n % self.beam_width:
            raise ValueError(f"DVTS splits the {self.n} beams ({self.label('n')}) into subtrees of "
                             f"{self.label('beam_width')} {self.beam_width}: n must be a multiple of it")


@dataclass(frozen=True)
class ParticleFilterOptions(_StepSearchOptions):
    method: ClassVar[str] = "particle_filter"
    n: int = option(8, "particles (the command line's --n)", bounds=AT_LEAST_ONE, cli=False)
    temperature: float = option(1.0, "tau: a particle's weight is exp(phi(score) / tau)", bounds=POSITIVE,
                                flag="weight_temperature")
    potential: str = option("auto", "phi, how a step score becomes a log-weight: log(s / (1 - s)) (the paper's, "
                            "for PRM probabilities), log(s), or s itself; auto: logit for a --prm giving probabilities, "
                            "else score", choices=("auto", "logit", "log", "score"))
    finished_weight: str = option("final", "the weight of a particle that finished in an earlier round: its final "
                                  "one (the paper's code) or 1 (none: the exact target p(y) prod_t G_t)",
                                  choices=("final", "none"))
    resampling: str = option("multinomial", "how particles are resampled each round",
                             choices=("multinomial", "systematic", "stratified"))
    iterations: int = option(1, "particle Gibbs iterations (1: particle filtering; each later one keeps a reference "
                             "particle drawn from the last)", bounds=AT_LEAST_ONE, flag="gibbs_iterations")
    select: str = option("best", "the answer: the highest final weight, or a draw from the final weights",
                         choices=("best", "sample"), flag="particle_select")


@dataclass(frozen=True)
class PrunedBestOfNOptions(MethodOptions):
    method: ClassVar[str] = "pruned_best_of_n"
    n: int = option(16, "candidates per prompt at the start (the command line's --n)", bounds=AT_LEAST_ONE,
                    cli=False)
    prune_at: tuple[int, ...] | None = option((16,), "token counts at which the candidates are scored on their "
                                              "partial responses and the weakest pruned", multiple=True,
                                              bounds=AT_LEAST_ONE, metavar="TOKENS")
    keep_fraction: float = option(0.5, "share of the candidates kept at each pruning point (1: plain best-of-N)",
                                  bounds=Bounds(gt=0, le=1))


METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    cls.method: cls
    for cls in (GenARMOptions, BestOfNOptions, QAlignOptions, TokenwiseCDOptions, BlockwiseCDOptions, ARGSOptions,
                TransferQOptions, BeamSearchOptions, DVTSOptions, ParticleFilterOptions, PrunedBestOfNOptions)
}
