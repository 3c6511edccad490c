"""Decoding methods by name, for the command line: one entry per method.

An entry says how to build the method's Strategy from its options, which method options apply to it
(any other method option given is an error, never silently ignored), and how its output rows map to
each prompt's completion and candidates. Options shared by every method (model, sampling settings,
--n, --seed, --reward, ...) belong to the command itself; method options are declared once in
METHOD_OPTIONS, so two methods that both take e.g. `--arm` share one flag.

Adding a method:

    register_option(MethodOption("lookahead", "tokens of each rollout [default: 8]", type=int))

    def _build_tqstar(options, ctx):
        from ..decoding.tqstar import TransferQStar
        lookahead = 8 if options["lookahead"] is None else options["lookahead"]
        return TransferQStar(reward=ctx.reward, lookahead=lookahead)

    register_method(Method("tqstar", "Transfer Q*: ...", _build_tqstar, options=("lookahead",), needs_reward=True))

`--backend vllm` sends a method's sampling to a vLLM engine (built once per run, on the folder the
method names through `ctx.engine()`); a method lists the backends it runs on in `backends`, and sets
`engine_only` when, under an engine, it needs no local copy of the policy (only its tokenizer).

`--n` asks for n rows per prompt (num_return_sequences), all written as candidates, the first as the
completion. A method whose n means something else sets `n_is_candidates` (best-of-N: n candidates, one
answer) and reads ctx.n; a method whose run() returns its candidates and choice another way (in
Decoded.extras) passes its own `layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import click

# A steering instruction that makes sense for any chat model out of the box (the default method).
DEFAULT_ARM_PROMPT = "Reply in a warm, kind and positive tone."
DEFAULT_METHOD = "genarm"
# Where sampling runs: in process (transformers + this package's loop), or in a vLLM engine.
BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class MethodOption:
    """A command-line option that belongs to one or more methods.

    It has no default value: it is None (or () when repeatable) unless given on the command line or in
    the config, so that a builder can tell "not given" apart, and only given options are checked against
    the method. Builders apply their own defaults (and the help text states them).
    """

    name: str  # python name; the flag is --name with dashes
    help: str
    type: Any = str
    multiple: bool = False
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def click_option(self, used_by: list[str] = ()):
        """The click option, its help saying which methods take it."""
        methods = f" [for {', '.join(used_by)}]" if used_by else ""
        return click.option(
            self.flag,
            self.name,
            type=self.type,
            multiple=self.multiple,
            default=() if self.multiple else None,
            metavar=self.metavar,
            help=self.help + methods,
        )


@dataclass
class BuildContext:
    """What a method builder gets besides its options: the loaded policy, the configured rewards, and a
    loader for further models (ARMs, value models) that reuses already loaded folders."""

    policy: Any  # decoding.Policy
    policy_path: Path
    device: str
    dtype: str
    rewards: dict = field(default_factory=dict)  # {spec: SequenceReward}, in --reward order
    n: int = 1  # --n
    _loaded: dict = field(default_factory=dict)
    backend: str = "hf"  # --backend
    engine_options: dict = field(default_factory=dict)  # vllm.LLM keyword arguments (--tensor-parallel-size, ...)
    _engines: dict = field(default_factory=dict)

    @property
    def reward(self):
        """The reward a method selects or steers with: the first --reward (None without one)."""
        return next(iter(self.rewards.values()), None)

    def load(self, name_or_path) -> tuple[Any, Any]:
        """(model, tokenizer) of a local model folder; the policy's own folder gives the policy."""
        from ..models import load_model, resolve_model_path

        path = resolve_model_path(name_or_path).resolve()
        if path == self.policy_path.resolve():
            return self.policy.model, self.policy.tokenizer
        if path not in self._loaded:
            self._loaded[path] = load_model(path, device=self.device, dtype=self.dtype)
        return self._loaded[path]

    def engine(self, name_or_path=None):
        """The sampling backend serving a model folder (the policy's by default), built once per run and
        folder; None with --backend hf."""
        if self.backend == "hf":
            return None
        from ..models import resolve_model_path

        path = (self.policy_path if name_or_path is None else resolve_model_path(name_or_path)).resolve()
        if path not in self._engines:
            from ..serving.engines import VLLMBackend

            self._engines[path] = VLLMBackend(path, **self.engine_options)
        return self._engines[path]

    def close_engines(self) -> None:
        """Stop the engines this context built (their memory and worker processes go back)."""
        while self._engines:
            self._engines.popitem()[1].close()


@dataclass(frozen=True)
class PromptOutput:
    """One prompt's result: every candidate's generated token ids (stop token included), and which one is
    the answer."""

    candidates: list[list[int]]
    chosen: int = 0
    extras: dict = field(default_factory=dict)  # per-prompt method output for the result line


def rows_layout(decoded, prompts: int) -> list[PromptOutput]:
    """n rows per prompt, prompt-major (as num_return_sequences lays them out); the first is the answer."""
    from ..decoding.candidates import completion_ids

    rows = int(decoded.tokens.shape[0])
    if prompts < 1 or rows % prompts:
        raise RuntimeError(f"the method returned {rows} rows for {prompts} prompts")
    n = rows // prompts
    ids = completion_ids(decoded)
    return [PromptOutput(candidates=ids[b * n : (b + 1) * n]) for b in range(prompts)]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Callable[[dict, BuildContext], Any]  # (its option values, context) -> Strategy
    options: tuple[str, ...] = ()
    layout: Callable[[Any, int], list[PromptOutput]] = rows_layout  # (Decoded, prompts) -> one per prompt
    needs_reward: bool = False  # the method selects or steers with the first --reward (ctx.reward)
    n_is_candidates: bool = False  # --n is the method's own candidate count; one row per prompt comes back
    backends: tuple[str, ...] = ("hf",)  # where its sampling can run (--backend)
    engine_only: bool = False  # under an engine backend, no policy forward pass runs in process


METHOD_OPTIONS: dict[str, MethodOption] = {}
METHODS: dict[str, Method] = {}


def register_option(option: MethodOption) -> MethodOption:
    if option.name in METHOD_OPTIONS:
        raise ValueError(f"method option {option.flag} is registered twice")
    METHOD_OPTIONS[option.name] = option
    return option


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    unknown = [o for o in method.options if o not in METHOD_OPTIONS]
    if unknown:
        raise ValueError(f"method {method.name!r} names unregistered options {unknown}; register_option() them first")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_backend(method: Method, backend: str) -> None:
    """Refuse a backend the method cannot run on, naming the methods that can."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend not in method.backends:
        able = ", ".join(sorted(m.name for m in METHODS.values() if backend in m.backends))
        raise ValueError(
            f"--backend {backend} does not apply to method {method.name!r} (methods that run on it: {able})"
        )


def check_applicable(method: Method, given: dict[str, str]) -> None:
    """Refuse a method option that was given (on the command line or in the config) but that this
    method does not take: a silently ignored --beta would be a wrong experiment."""
    for name, origin in given.items():
        if name in METHOD_OPTIONS and name not in method.options:
            accepted = ", ".join(METHOD_OPTIONS[o].flag for o in method.options) or "none"
            where = "" if origin == "the command line" else f" (set in {origin})"
            raise ValueError(
                f"{METHOD_OPTIONS[name].flag}{where} does not apply to method {method.name!r} "
                f"(its options: {accepted})"
            )


# --------------------------------------------------------------------------------------- options
register_option(MethodOption("arm", "ARM model folder (repeatable: several ARMs, one --weight each)",
                             multiple=True, metavar="DIR"))
register_option(MethodOption("weight", "weight of each --arm, in order (instead of --beta)",
                             type=float, multiple=True, metavar="W"))
register_option(MethodOption(
    "beta",
    "strength: genarm, the KL strength of one ARM (weight 1/beta) [1.0]; qalign, the reward temperature "
    "(smaller trusts the reward more) [1.0]; best_of_n, the temperature of the weighted vote [1.0]",
    type=float,
))
register_option(MethodOption(
    "arm_prompt",
    "steering instruction: makes a prompted ARM of each --arm, or of the policy itself when no --arm "
    f"is given [default without --arm: {DEFAULT_ARM_PROMPT!r}]",
    metavar="TEXT",
))
register_option(MethodOption(
    "temperature_semantics",
    "how --temperature enters GenARM's mix: 'paper' or 'model_arithmetic' (the official code's) [default: paper]",
    type=click.Choice(["paper", "model_arithmetic"]),
))

register_option(MethodOption("aggregate", "how best-of-N picks: the best reward, or a (reward-weighted) vote on "
                             "extracted answers [default: best]",
                             type=click.Choice(["best", "majority", "weighted_majority"])))
register_option(MethodOption("answer_kind", "what a vote compares: the final number, the \\boxed{} answer or the "
                             "option letter [default: number]", type=click.Choice(["number", "boxed", "option"])))
register_option(MethodOption("steps", "Metropolis-Hastings steps per chain [default: 16]", type=int))
register_option(MethodOption("chains", "independent chains per prompt [default: --n]", type=int))
register_option(MethodOption("burn_in", "steps left out of the majority / best answers [default: 0]", type=int))
register_option(MethodOption("thin", "keep every thin-th step for the majority / best answers [default: 1]", type=int))
register_option(MethodOption("chain_answer", "the answer: each chain's last state, a vote over kept states, or "
                             "the best kept state [default: last]", type=click.Choice(["last", "majority", "best"])))
register_option(MethodOption("length_cap", "what --max-new-tokens caps: the whole response, or each resampled "
                             "suffix (the official code) [default: response]",
                             type=click.Choice(["response", "suffix"])))


# --------------------------------------------------------------------------------------- methods
def _build_sample(options: dict, ctx: BuildContext):
    from ..decoding import Sample

    return Sample()


def _build_genarm(options: dict, ctx: BuildContext):
    from ..decoding import GenARM
    from ..decoding.guides import ARM, PromptedARM

    instruction = options["arm_prompt"]
    if options["arm"]:
        arms = []
        for path in options["arm"]:
            model, tokenizer = ctx.load(path)
            if instruction:
                arms.append(PromptedARM(model, tokenizer, instruction, name=f"{path} prompted: {instruction}"))
            else:
                arms.append(ARM(model, tokenizer, name=str(path)))
    else:
        policy, instruction = ctx.policy, instruction or DEFAULT_ARM_PROMPT
        # The full instruction is in the name, so the output's hyperparameters record it.
        arms = [PromptedARM(policy.model, policy.tokenizer, instruction, name=f"policy prompted: {instruction}")]
    strategy = GenARM(
        arms,
        beta=options["beta"],
        weights=list(options["weight"]) or None,
        temperature_semantics=options["temperature_semantics"] or "paper",
    )
    # A guide with another tokenizer must fail here, before any prompt runs, not on the first batch.
    for arm in arms:
        arm.width_for(ctx.policy.model, ctx.policy.tokenizer)
    return strategy


def _extractor(options: dict):
    from functools import partial

    from ..rewards import extract_answer

    return partial(extract_answer, kind=options["answer_kind"] or "number")


def _build_best_of_n(options: dict, ctx: BuildContext):
    from ..decoding import BestOfN

    aggregate = options["aggregate"] or "best"
    if ctx.reward is None and aggregate != "majority":
        raise ValueError(f"best_of_n with --aggregate {aggregate} needs a reward: pass --reward NAME")
    beta = 1.0 if options["beta"] is None else options["beta"]
    extract = _extractor(options) if aggregate != "best" else None
    return BestOfN(reward=ctx.reward, n=ctx.n, aggregate=aggregate, beta=beta, extract=extract, backend=ctx.engine())


def _best_of_n_layout(decoded, prompts: int) -> list[PromptOutput]:
    extras = decoded.extras
    out = []
    for b in range(prompts):
        per_prompt = {key: extras[key][b] for key in ("answers", "voted") if extras.get(key) is not None}
        out.append(PromptOutput(candidates=extras["candidates"][b], chosen=extras["chosen"][b][0], extras=per_prompt))
    return out


def _build_qalign(options: dict, ctx: BuildContext):
    from ..decoding import QAlign

    answer = options["chain_answer"] or "last"
    chains = ctx.n if options["chains"] is None else options["chains"]
    if answer != "last" and ctx.n > 1:
        raise ValueError(f"--chain-answer {answer} gives one answer per prompt; --n must be 1")
    if answer == "last" and ctx.n > chains:
        raise ValueError(f"--n {ctx.n} asks for more answers than the {chains} chain(s) per prompt")
    defaults = {"beta": 1.0, "steps": 16, "burn_in": 0, "thin": 1, "length_cap": "response"}
    given = {k: default if options[k] is None else options[k] for k, default in defaults.items()}
    extract = _extractor(options) if answer == "majority" else None
    return QAlign(reward=ctx.reward, chains=chains, answer=answer, extract=extract, backend=ctx.engine(), **given)


def _qalign_layout(decoded, prompts: int) -> list[PromptOutput]:
    outputs = rows_layout(decoded, prompts)
    trace = decoded.extras["trace"]
    chains = trace["chains_per_prompt"]
    rates = trace["acceptance_rate"].tolist()
    return [
        replace(o, extras={"acceptance_rate": rates[b * chains : (b + 1) * chains]}) for b, o in enumerate(outputs)
    ]


register_method(Method("sample", "plain decoding from the policy (greedy with --temperature 0)", _build_sample))
register_method(Method(
    "genarm",
    "GenARM: autoregressive reward models (trained, or a prompted LM) mixed in token by token",
    _build_genarm,
    options=("arm", "weight", "beta", "arm_prompt", "temperature_semantics"),
))
register_method(Method(
    "best_of_n",
    "best-of-N: --n samples per prompt, the best by the first --reward (or a vote on answers)",
    _build_best_of_n,
    options=("aggregate", "beta", "answer_kind"),
    layout=_best_of_n_layout,
    n_is_candidates=True,
    backends=BACKENDS,
    engine_only=True,
))
register_method(Method(
    "qalign",
    "QAlign: Metropolis-Hastings over responses towards p(y|x) exp(r/beta), r the first --reward",
    _build_qalign,
    options=("beta", "steps", "chains", "burn_in", "thin", "chain_answer", "answer_kind", "length_cap"),
    layout=_qalign_layout,
    needs_reward=True,
    backends=BACKENDS,
    engine_only=True,
))


# ------------------------------------------------------------------- controlled decoding and ARGS
register_option(MethodOption(
    "value_model",
    "value model folder written by CD-FUDGE training (it has a value_model.json); cd_tokenwise takes several, "
    "one --value-weight each",
    multiple=True, metavar="DIR",
))
register_option(MethodOption("value_weight", "lambda: the weight of each --value-model, in order [default: 1.0 each]",
                             type=float, multiple=True, metavar="W"))
register_option(MethodOption(
    "candidate_tokens",
    "top-k tokens of the policy scored per step: ARGS's k; cd_tokenwise's for a scalar value model or the "
    "--reward [default: 10]",
    type=int,
))
register_option(MethodOption("num_candidates", "blocks drawn per step, K [default: 4]", type=int))
register_option(MethodOption("block_size", "tokens per block, M; M >= --max-new-tokens is best-of-K [default: 8]",
                             type=int))
register_option(MethodOption("reward_weight", "ARGS's w in log p(v) + w * r(prefix + v) [default: 1.5]", type=float))
register_option(MethodOption("stop_at_eos", "false: ARGS writes --max-new-tokens tokens whatever comes, as the "
                             "official code [default: true]", type=click.BOOL))


def _value_models(options: dict, ctx: BuildContext, k: int) -> list:
    import torch

    from ..models import resolve_model_path
    from ..training.value import load_value_model

    models = []
    for path in options["value_model"]:
        # The folder's own tokenizer (when saved) is checked against the policy's.
        value = load_value_model(resolve_model_path(path), k=k, device=ctx.device, dtype=getattr(torch, ctx.dtype))
        value.name = str(path)
        # Another vocabulary or a k beyond it must fail here, before any prompt runs.
        value.width_for(ctx.policy.model, ctx.policy.tokenizer)
        models.append(value)
    return models


def _build_cd_tokenwise(options: dict, ctx: BuildContext):
    from ..decoding import TokenwiseCD
    from ..decoding.guides import PrefixRewardGuide

    k = 10 if options["candidate_tokens"] is None else options["candidate_tokens"]
    models = _value_models(options, ctx, k)
    if not models:
        if ctx.reward is None:
            raise ValueError("cd_tokenwise needs --value-model DIR (a trained value model), or a --reward to score "
                             "the policy's top --candidate-tokens tokens with")
        models = [PrefixRewardGuide(ctx.reward, k=k)]
        models[0].width_for(ctx.policy.model, ctx.policy.tokenizer)
    weights = list(options["value_weight"]) or [1.0] * len(models)
    return TokenwiseCD(models, weights=weights)


def _build_cd_blockwise(options: dict, ctx: BuildContext):
    from ..decoding import BlockwiseCD

    models = _value_models(options, ctx, 10)
    if len(models) > 1:
        raise ValueError("cd_blockwise ranks blocks by one --value-model")
    scorer = models[0] if models else ctx.reward
    k = 4 if options["num_candidates"] is None else options["num_candidates"]
    if scorer is None and k > 1:
        raise ValueError("cd_blockwise needs --value-model DIR or a --reward to rank its blocks")
    size = 8 if options["block_size"] is None else options["block_size"]
    return BlockwiseCD(scorer, num_candidates=k, block_size=size)


def _build_args(options: dict, ctx: BuildContext):
    from ..decoding import ARGS

    k = 10 if options["candidate_tokens"] is None else options["candidate_tokens"]
    weight = 1.5 if options["reward_weight"] is None else options["reward_weight"]
    stop = True if options["stop_at_eos"] is None else options["stop_at_eos"]
    strategy = ARGS(ctx.reward, weight=weight, k=k, stop_at_eos=stop)
    strategy.guide.width_for(ctx.policy.model, ctx.policy.tokenizer)
    return strategy


register_method(Method(
    "cd_tokenwise",
    "controlled decoding, token by token: p(z) exp(lambda V(prefix + z)), V a trained --value-model (or the "
    "first --reward on the top-k tokens)",
    _build_cd_tokenwise,
    options=("value_model", "value_weight", "candidate_tokens"),
))
register_method(Method(
    "cd_blockwise",
    "controlled decoding, block by block: best of --num-candidates blocks of --block-size tokens by a "
    "--value-model (or the first --reward)",
    _build_cd_blockwise,
    options=("value_model", "num_candidates", "block_size"),
))
register_method(Method(
    "args",
    "ARGS: the top-k tokens by log p(v) + w r(prefix + v), r the first --reward on partial responses",
    _build_args,
    options=("candidate_tokens", "reward_weight", "stop_at_eos"),
    needs_reward=True,
))


# ---------------------------------------------------------------------------------------- Transfer Q*
def _option(option: MethodOption) -> None:
    # Another method may have declared the same flag already: share it rather than fail at import.
    if option.name not in METHOD_OPTIONS:
        register_option(option)


_option(MethodOption("baseline", "the aligned baseline model folder that rolls candidates out "
                     "[default: the policy itself]", metavar="DIR"))
_option(MethodOption("alpha", "Transfer Q*'s alpha in log pi(v) + alpha Q(prefix + v) [default: 1.0]", type=float))
_option(MethodOption("rollout_len", "tokens per rollout (0 scores prefix + candidate) [default: 20]",
                     type=int))
_option(MethodOption("num_rollouts", "rollouts per candidate (> 1 needs --rollout-sampling sample) "
                     "[default: 1]", type=int))
_option(MethodOption("rollout_sampling", "greedy rollouts (the official code) or sampled ones "
                     "[default: greedy]", type=click.Choice(["greedy", "sample"])))
_option(MethodOption("transfer", "direct (the baseline's reward is the target), or indirect with the "
                     "second --reward as the baseline's reward r_BL [default: direct]",
                     type=click.Choice(["direct", "indirect"])))
_option(MethodOption("importance_weights", "indirect transfer: normalised over the rollouts, or raw "
                     "exp((r - r_BL)/beta) as the official code [default: normalized]",
                     type=click.Choice(["normalized", "raw"])))
_option(MethodOption("prior", "the prior term and candidate source: the policy (the paper) or the "
                     "baseline (the official code) [default: policy]", type=click.Choice(["policy", "baseline"])))


def _build_transfer_q(options: dict, ctx: BuildContext):
    from ..decoding import TransferQ

    if ctx.reward is None:
        raise ValueError("transfer_q needs a target reward: pass --reward NAME")
    transfer = options["transfer"] or "direct"
    rewards = list(ctx.rewards.values())
    baseline_reward = None
    if transfer == "indirect":
        if len(rewards) < 2:
            raise ValueError("--transfer indirect needs two rewards: --reward TARGET --reward BASELINE_REWARD")
        baseline_reward = rewards[1]
    if options["baseline"]:
        model, tokenizer = ctx.load(options["baseline"])
    else:
        model, tokenizer = ctx.policy.model, ctx.policy.tokenizer
    given = {"alpha": options["alpha"], "k": options["candidate_tokens"], "rollout_len": options["rollout_len"],
             "num_rollouts": options["num_rollouts"], "rollout_sampling": options["rollout_sampling"],
             "beta": options["beta"], "prior": options["prior"]}
    if options["importance_weights"] is not None:
        given["normalize_weights"] = options["importance_weights"] == "normalized"
    strategy = TransferQ(model, ctx.reward, baseline_tokenizer=tokenizer, transfer=transfer,
                         baseline_reward=baseline_reward, backend=ctx.engine(options["baseline"]),
                         **{k: v for k, v in given.items() if v is not None})
    # A baseline with another tokenizer (or k beyond the vocabulary) fails here, before any prompt runs.
    strategy.guide.width_for(ctx.policy.model, ctx.policy.tokenizer)
    return strategy


register_method(Method(
    "transfer_q",
    "Transfer Q*: the policy's top-k tokens reweighted by exp(alpha Q), Q from the --baseline model's rollouts "
    "scored by the first --reward",
    _build_transfer_q,
    options=("baseline", "alpha", "candidate_tokens", "rollout_len", "num_rollouts", "rollout_sampling", "transfer",
             "importance_weights", "beta", "prior"),
    needs_reward=True,
    backends=BACKENDS,  # the rollouts run in the engine (on the --baseline folder); the prior in process
))
