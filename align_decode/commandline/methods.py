"""Decoding methods by name, for the command line: one entry per method.

A method's own options are declared once, as the dataclass its strategy validates with
(`decoding.options`); the command line makes its flags from that declaration. An entry adds what only the
command line has: the models its flags name (`--arm DIR`, `--value-model DIR`, `--baseline DIR`,
declared here as `ModelFlag`s), how the strategy is built from the options and the loaded models, and how
its output rows map to each prompt's completion and candidates.

Every method flag is checked before any model loads: a flag the method does not take is an error (a
silently ignored --beta would be a wrong experiment), and a value out of range is refused naming the
flag as typed (`--beta must be a finite number > 0, got -1.0`).

Adding a method, e.g. the README's worked example `KeywordSteer` (examples/token_bonus.py) once it is a
module of `decoding/` with its options declared as `KeywordSteerOptions` in `decoding.options`:

    def _build_keyword_steer(args: MethodArgs, ctx: BuildContext):
        from ..decoding.keyword_steer import KeywordSteer
        return KeywordSteer(**args.options.values())

    register_method(Method("keyword_steer", "a fixed bonus on chosen tokens", _build_keyword_steer,
                           options=KeywordSteerOptions))

`--engine vllm` sends a method's sampling to a vLLM engine (built once per run, on the folder the
method names through `ctx.engine()`); a method lists the engines it runs on in `engines`, and sets
`engine_only` when, under an engine, it needs no local copy of the policy (only its tokenizer).

`--n` asks for n rows per prompt (num_return_sequences), all written as candidates, the first as the
completion. A method whose n means something else sets `n_is_candidates` (best-of-N: n candidates, one
answer) and reads ctx.n; a method whose run() returns its candidates and choice another way (in its typed
report, Decoded.extras) passes its own `layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import click

from ..decoding.options import (
    ARGSOptions,
    BeamSearchOptions,
    BestOfNOptions,
    BlockwiseCDOptions,
    DVTSOptions,
    GenARMOptions,
    MethodOptions,
    ParticleFilterOptions,
    PrunedBestOfNOptions,
    QAlignOptions,
    TokenwiseCDOptions,
    TransferQOptions,
    named_as_flags,
)
from ..options import OptionSpec
from ..validation import AT_LEAST_ONE, Bounds

# A steering instruction that makes sense for any chat model out of the box (the default method).
DEFAULT_ARM_PROMPT = "Reply in a warm, kind and positive tone."
DEFAULT_METHOD = "genarm"
# Where sampling runs: in process (transformers + this package's loop), or in a vLLM engine.
ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class ModelFlag:
    """A method flag that exists only on the command line: the models a method loads, or how it builds
    its guides. Like every method flag it is None (or () when repeatable) unless given."""

    name: str  # python name; the flag is --name with dashes
    help: str
    multiple: bool = False
    metavar: str | None = None
    bounds: Bounds | None = None  # for a number

    choices = flag_choices = None  # read like an OptionSpec by click_type

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def kind(self) -> str:
        return "str" if self.bounds is None else "int" if self.bounds.integer else "float"

    def validate(self, value):
        if value is None or value == () or self.bounds is None:
            return value
        if self.multiple:
            return tuple(self.bounds.check(v, self.flag) for v in value)
        return self.bounds.check(value, self.flag)


MODEL_FLAGS: dict[str, ModelFlag] = {
    flag.name: flag
    for flag in (
        ModelFlag("arm", "ARM model folder (repeatable: several ARMs, one --weight each)", multiple=True,
                  metavar="DIR"),
        ModelFlag("arm_prompt", "steering instruction: makes a prompted ARM of each --arm, or of the policy itself "
                  f"when no --arm is given [without --arm: {DEFAULT_ARM_PROMPT!r}]", metavar="TEXT"),
        ModelFlag("value_model", "value model folder written by `align-decode train-value` (it has a "
                  "value_model.json); repeatable for cd_tokenwise, one --value-weight each", multiple=True,
                  metavar="DIR"),
        ModelFlag("baseline", "the aligned baseline model folder that rolls candidates out [the policy itself]",
                  metavar="DIR"),
        # cd_tokenwise's guides (a scalar value model, or the reward on prefixes) score the policy's top-k
        # tokens: the flag that is ARGS's and Transfer Q*'s k.
        ModelFlag("candidate_tokens", "top-k tokens of the policy that a scalar --value-model or the --reward "
                  "scores per step [default: 10]", bounds=AT_LEAST_ONE),
        ModelFlag("prm", "process reward model folder: a PRM read at a marker after each step (token-classification, "
                  "causal LM with '+'/'-' label tokens, or sequence-classification head) [without it: --value-model, "
                  "else the first --reward on the partial responses]", metavar="DIR"),
        ModelFlag("prm_marker", "the text the --prm expects after each step, backslash escapes read [default: \\n\\n]",
                  metavar="TEXT"),
    )
}
_CANDIDATES_FOR_GUIDES = 10


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
    engine_kind: str = "hf"  # --engine
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
        """The sampling engine serving a model folder (the policy's by default), built once per run and
        folder; None with --engine hf."""
        if self.engine_kind == "hf":
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
class MethodArgs:
    """A method's validated command-line arguments: its options (declared defaults for what was not
    given), its model flags, and which flags were given (some defaults depend on other flags)."""

    options: MethodOptions | None
    models: dict[str, Any]
    given: frozenset[str]


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
    build: Callable[[MethodArgs, BuildContext], Any]  # (its arguments, context) -> Strategy
    options: type[MethodOptions] | None = None  # its declared options (decoding.options)
    model_flags: tuple[str, ...] = ()  # MODEL_FLAGS it takes
    layout: Callable[[Any, int], list[PromptOutput]] = rows_layout  # (Decoded, prompts) -> one per prompt
    needs_reward: bool = False  # the method selects or steers with the first --reward (ctx.reward)
    n_is_candidates: bool = False  # --n is the method's own candidate count; one row per prompt comes back
    engines: tuple[str, ...] = ("hf",)  # where its sampling can run (--engine)
    engine_only: bool = False  # under an engine, no policy forward pass runs in process
    # Why greedy decoding (--temperature 0) defeats the method, given its arguments and --n; None when it
    # does not.
    needs_sampling: Callable[[MethodArgs, int], str | None] = lambda args, n: None

    def specs(self) -> dict[str, OptionSpec]:
        """{flag name: option spec} of its declared options that have a flag."""
        if self.options is None:
            return {}
        return {s.flag_name: s for s in self.options.specs() if s.cli}

    @property
    def flag_names(self) -> tuple[str, ...]:
        """Every method flag it takes (python names, as click and config files know them)."""
        return (*self.specs(), *self.model_flags)

    def arguments(self, values: dict[str, Any], given, n: int | None = None) -> MethodArgs:
        """Its arguments from the command line's values, checked and converted before anything loads;
        errors name the flags as typed. `n` (--n) is checked with them where it is the method's own count."""
        given = frozenset(name for name in given if name in self.flag_names)
        kwargs = {}
        if n is not None and self.n_is_candidates and self.options is not None and any(s.name == "n" for s in self.options.specs()):
            kwargs["n"] = n
        for flag_name, spec in self.specs().items():
            value = values.get(flag_name)
            if value is None or value == ():
                continue
            kwargs[spec.name] = spec.from_flag(value) if spec.from_flag else value
        with named_as_flags():
            options = None if self.options is None else self.options(**kwargs)
        models = {name: MODEL_FLAGS[name].validate(values.get(name)) for name in self.model_flags}
        return MethodArgs(options, models, given)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.options is not None and method.options.method != method.name:
        raise ValueError(f"method {method.name!r} declares the options of {method.options.method!r}")
    unknown = [o for o in method.model_flags if o not in MODEL_FLAGS]
    if unknown:
        raise ValueError(f"method {method.name!r} names unknown model flags {unknown}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_flags() -> dict[str, list[tuple[Method, Any]]]:
    """{flag name: [(method, its spec or ModelFlag), ...]} over every registered method, in flag order."""
    out: dict[str, list] = {}
    for method in METHODS.values():
        for name, spec in method.specs().items():
            out.setdefault(name, []).append((method, spec))
        for name in method.model_flags:
            out.setdefault(name, []).append((method, MODEL_FLAGS[name]))
    return out


def click_type(spec: OptionSpec | ModelFlag):
    """The click type of a declared option's values."""
    if spec.kind == "choice":
        return click.Choice(list(spec.flag_choices or spec.choices))
    return {"bool": click.BOOL, "int": int, "float": float, "str": str}[spec.kind]


def click_options():
    """The method flags as click options, one per flag name; the help says which methods take it, and
    for each its meaning and default."""
    options = []
    for name, users in method_flags().items():
        first = users[0][1]
        multiple, type_ = first.multiple, click_type(first)
        for method, spec in users[1:]:
            # One flag, one kind of value: methods sharing a flag may differ in meaning and default only.
            if spec.multiple != multiple or repr(click_type(spec)) != repr(type_):
                raise ValueError(f"flag --{name.replace('_', '-')} is declared differently by {method.name} and "
                                 f"{users[0][0].name}")
        meanings: dict[str, list[str]] = {}  # one meaning, the methods that share it
        for method, spec in users:
            shown = isinstance(spec, ModelFlag) or spec.default is None
            meanings.setdefault(spec.help + ("" if shown else f" [default: {spec.default_text()}]"), []).append(
                method.name)
        parts = [f"{', '.join(names)}: {meaning}" for meaning, names in meanings.items()]
        metavar = first.metavar
        options.append(click.option("--" + name.replace("_", "-"), name, type=type_, multiple=multiple,
                                    default=() if multiple else None, metavar=metavar, help="; ".join(parts)))
    return options


def check_engine(method: Method, engine: str) -> None:
    """Refuse an engine the method cannot run on, naming the methods that can."""
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine not in method.engines:
        able = ", ".join(sorted(m.name for m in METHODS.values() if engine in m.engines))
        raise ValueError(
            f"--engine {engine} does not apply to method {method.name!r} (methods that run on it: {able})"
        )


def check_applicable(method: Method, given: dict[str, str]) -> None:
    """Refuse a method flag that was given (on the command line or in the config) but that this method
    does not take: a silently ignored --beta would be a wrong experiment."""
    known = method_flags()
    for name, origin in given.items():
        if name in known and name not in method.flag_names:
            accepted = ", ".join("--" + o.replace("_", "-") for o in method.flag_names) or "none"
            where = "" if origin == "the command line" else f" (set in {origin})"
            raise ValueError(
                f"--{name.replace('_', '-')}{where} does not apply to method {method.name!r} "
                f"(its options: {accepted})"
            )


def describe_methods() -> list[str]:
    """`align-decode methods`: each method, its summary, and its flags with help and default."""
    lines = []
    for name in sorted(METHODS):
        method = METHODS[name]
        default = " (default)" if name == DEFAULT_METHOD else ""
        lines.append(f"{name}{default}: {method.summary}")
        for flag_name, spec in method.specs().items():
            default = "" if spec.default is None else f" [default: {spec.default_text()}]"
            lines.append(f"    {spec.flag}{' (repeatable)' if spec.multiple else ''}: {spec.help}{default}")
        for flag_name in method.model_flags:
            flag = MODEL_FLAGS[flag_name]
            lines.append(f"    {flag.flag}{' (repeatable)' if flag.multiple else ''}: {flag.help}")
    return lines


# --------------------------------------------------------------------------------------- methods
def _build_sample(args: MethodArgs, ctx: BuildContext):
    from ..decoding import Sample

    return Sample()


def _build_genarm(args: MethodArgs, ctx: BuildContext):
    from ..decoding import GenARM
    from ..decoding.guides import ARM, PromptedARM

    instruction = args.models["arm_prompt"]
    if args.models["arm"]:
        arms = []
        for path in args.models["arm"]:
            model, tokenizer = ctx.load(path)
            if instruction:
                arms.append(PromptedARM(model, tokenizer, instruction, name=f"{path} prompted: {instruction}"))
            else:
                arms.append(ARM(model, tokenizer, name=str(path)))
    else:
        policy, instruction = ctx.policy, instruction or DEFAULT_ARM_PROMPT
        # The full instruction is in the name, so the output's hyperparameters record it.
        arms = [PromptedARM(policy.model, policy.tokenizer, instruction, name=f"policy prompted: {instruction}")]
    with named_as_flags():
        strategy = GenARM(arms, **args.options.values())
    # A guide with another tokenizer must fail here, before any prompt runs, not on the first batch.
    for arm in arms:
        arm.width_for(ctx.policy.model, ctx.policy.tokenizer)
    return strategy


def _build_best_of_n(args: MethodArgs, ctx: BuildContext):
    from ..decoding import BestOfN

    o = args.options
    if ctx.reward is None and o.aggregate != "majority":
        raise ValueError(f"best_of_n with --aggregate {o.aggregate} needs a reward: pass --reward NAME")
    return BestOfN(reward=ctx.reward, **{**o.values(), "n": ctx.n}, engine=ctx.engine())


def _best_of_n_layout(decoded, prompts: int) -> list[PromptOutput]:
    report = decoded.extras  # BestOfNReport
    out = []
    for b in range(prompts):
        votes = {} if report.answers is None else {"answers": report.answers[b], "voted": report.voted[b]}
        out.append(PromptOutput(candidates=report.candidates[b], chosen=report.chosen[b][0], extras=votes))
    return out


def _qalign_chains(args: MethodArgs, n: int) -> int:
    return args.options.chains if "chains" in args.given else n


def _build_qalign(args: MethodArgs, ctx: BuildContext):
    from ..decoding import QAlign

    o = args.options
    chains = _qalign_chains(args, ctx.n)
    if o.answer != "last" and ctx.n > 1:
        raise ValueError(f"--chain-answer {o.answer} gives one answer per prompt; --n must be 1")
    if o.answer == "last" and ctx.n > chains:
        raise ValueError(f"--n {ctx.n} asks for more answers than the {chains} chain(s) per prompt (--chains)")
    return QAlign(reward=ctx.reward, **{**o.values(), "chains": chains}, engine=ctx.engine())


def _qalign_layout(decoded, prompts: int) -> list[PromptOutput]:
    outputs = rows_layout(decoded, prompts)
    trace = decoded.extras.trace  # QAlignReport's
    chains = trace.chains_per_prompt
    rates = trace.acceptance_rate.tolist()
    return [
        replace(o, extras={"acceptance_rate": rates[b * chains : (b + 1) * chains]}) for b, o in enumerate(outputs)
    ]


register_method(Method("sample", "plain decoding from the policy (greedy with --temperature 0)", _build_sample))
register_method(Method(
    "genarm",
    "GenARM: autoregressive reward models (trained, or a prompted LM) mixed in token by token",
    _build_genarm,
    options=GenARMOptions,
    model_flags=("arm", "arm_prompt"),
))
register_method(Method(
    "best_of_n",
    "best-of-N: --n samples per prompt, the best by the first --reward (or a vote on answers)",
    _build_best_of_n,
    options=BestOfNOptions,
    layout=_best_of_n_layout,
    n_is_candidates=True,
    engines=ENGINES,
    engine_only=True,
    needs_sampling=lambda args, n: None if n == 1 else (
        f"best-of-N needs sampled candidates: at --temperature 0 the --n {n} candidates are one greedy answer "
        "repeated; give a temperature > 0"),
))
register_method(Method(
    "qalign",
    "QAlign: Metropolis-Hastings over responses towards p(y|x) exp(r/beta), r the first --reward",
    _build_qalign,
    options=QAlignOptions,
    layout=_qalign_layout,
    needs_reward=True,
    engines=ENGINES,
    engine_only=True,
    needs_sampling=lambda args, n: None if args.options.steps == 0 else (
        "QAlign's proposals must be sampled: at --temperature 0 every proposal repeats the current answer and "
        "the chain never moves; give a temperature > 0"),
))


# ------------------------------------------------------------------- controlled decoding and ARGS
def _value_models(args: MethodArgs, ctx: BuildContext, k: int) -> list:
    import torch

    from ..models import resolve_model_path
    from ..training.value import load_value_model

    models = []
    for path in args.models["value_model"]:
        # The folder's own tokenizer (when saved) is checked against the policy's.
        value = load_value_model(resolve_model_path(path), k=k, device=ctx.device, dtype=getattr(torch, ctx.dtype))
        value.name = str(path)
        # Another vocabulary must fail here, before any prompt runs.
        value.width_for(ctx.policy.model, ctx.policy.tokenizer)
        models.append(value)
    return models


def _build_cd_tokenwise(args: MethodArgs, ctx: BuildContext):
    from ..decoding import TokenwiseCD
    from ..decoding.guides import PrefixRewardGuide

    k = args.models["candidate_tokens"] or _CANDIDATES_FOR_GUIDES
    models = _value_models(args, ctx, k)
    if not models:
        if ctx.reward is None:
            raise ValueError("cd_tokenwise needs --value-model DIR (a trained value model), or a --reward to score "
                             "the policy's top --candidate-tokens tokens with")
        models = [PrefixRewardGuide(ctx.reward, k=k)]
        models[0].width_for(ctx.policy.model, ctx.policy.tokenizer)
    with named_as_flags():
        return TokenwiseCD(models, **args.options.values())


def _build_cd_blockwise(args: MethodArgs, ctx: BuildContext):
    from ..decoding import BlockwiseCD

    models = _value_models(args, ctx, _CANDIDATES_FOR_GUIDES)
    if len(models) > 1:
        raise ValueError("cd_blockwise ranks blocks by one --value-model")
    scorer = models[0] if models else ctx.reward
    o = args.options
    if scorer is None and o.num_candidates > 1:
        raise ValueError("cd_blockwise needs --value-model DIR or a --reward to rank its blocks")
    return BlockwiseCD(scorer, **o.values())


def _build_args(args: MethodArgs, ctx: BuildContext):
    from ..decoding import ARGS

    strategy = ARGS(ctx.reward, **args.options.values())
    strategy.guide.width_for(ctx.policy.model, ctx.policy.tokenizer)
    return strategy


register_method(Method(
    "cd_tokenwise",
    "controlled decoding, token by token: p(z) exp(lambda V(prefix + z)), V a trained --value-model (or the "
    "first --reward on the top-k tokens)",
    _build_cd_tokenwise,
    options=TokenwiseCDOptions,
    model_flags=("value_model", "candidate_tokens"),
))
register_method(Method(
    "cd_blockwise",
    "controlled decoding, block by block: best of --num-candidates blocks of --block-size tokens by a "
    "--value-model (or the first --reward)",
    _build_cd_blockwise,
    options=BlockwiseCDOptions,
    model_flags=("value_model",),
    needs_sampling=lambda args, n: None if args.options.num_candidates == 1 else (
        f"blockwise controlled decoding needs sampled blocks: at --temperature 0 the {args.options.num_candidates} "
        "candidate blocks of a step are the same greedy block; give a temperature > 0 (or --num-candidates 1)"),
))
register_method(Method(
    "args",
    "ARGS: the top-k tokens by log p(v) + w r(prefix + v), r the first --reward on partial responses",
    _build_args,
    options=ARGSOptions,
    needs_reward=True,
))


# ---------------------------------------------------------------------------------------- Transfer Q*
def _build_transfer_q(args: MethodArgs, ctx: BuildContext):
    from ..decoding import TransferQ

    if ctx.reward is None:
        raise ValueError("transfer_q needs a target reward: pass --reward NAME")
    o = args.options
    rewards = list(ctx.rewards.values())
    baseline_reward = None
    if o.transfer == "indirect":
        if len(rewards) < 2:
            raise ValueError("--transfer indirect needs two rewards: --reward TARGET --reward BASELINE_REWARD")
        baseline_reward = rewards[1]
    baseline = args.models["baseline"]
    if baseline:
        model, tokenizer = ctx.load(baseline)
    else:
        model, tokenizer = ctx.policy.model, ctx.policy.tokenizer
    strategy = TransferQ(model, ctx.reward, baseline_tokenizer=tokenizer, baseline_reward=baseline_reward,
                         engine=ctx.engine(baseline), **o.values())
    # A baseline with another tokenizer fails here, before any prompt runs.
    strategy.guide.width_for(ctx.policy.model, ctx.policy.tokenizer)
    return strategy


register_method(Method(
    "transfer_q",
    "Transfer Q*: the policy's top-k tokens reweighted by exp(alpha Q), Q from the --baseline model's rollouts "
    "scored by the first --reward",
    _build_transfer_q,
    options=TransferQOptions,
    model_flags=("baseline",),
    needs_reward=True,
    engines=ENGINES,  # the rollouts run in the engine (on the --baseline folder); the prior in process
))



# ----------------------------------------------------------------------------------- step-level search
def _process_reward(args: MethodArgs, ctx: BuildContext, method: str):
    """The scorer of partial responses: --prm, else one --value-model, else the first --reward on prefixes."""
    from ..decoding.options import _delimiter_from_flag
    from ..rewards.process import PrefixReward, TransformersPRM, ValuePRM

    if args.models["prm"]:
        from ..models import resolve_model_path

        marker = args.models["prm_marker"]
        return TransformersPRM.from_folder(resolve_model_path(args.models["prm"]), device=ctx.device,
                                           step_marker="\n\n" if marker is None else _delimiter_from_flag(marker))
    if args.models["prm_marker"] is not None:
        raise ValueError("--prm-marker goes with --prm (the PRM folder it describes)")
    models = _value_models(args, ctx, _CANDIDATES_FOR_GUIDES)
    if len(models) > 1:
        raise ValueError(f"{method} scores steps with one --value-model")
    if models:
        return ValuePRM(models[0])
    if ctx.reward is None:
        raise ValueError(f"{method} needs a scorer of partial responses: --prm DIR, --value-model DIR, or a --reward "
                         "(applied to the response so far)")
    return PrefixReward(ctx.reward)


def _step_search_builder(class_name: str):
    def build(args: MethodArgs, ctx: BuildContext):
        from .. import decoding

        strategy_class = getattr(decoding, class_name)
        scorer = _process_reward(args, ctx, strategy_class.name)
        with named_as_flags():
            return strategy_class(scorer, **{**args.options.values(), "n": ctx.n}, engine=ctx.engine())

    return build


def _candidates_layout(decoded, prompts: int) -> list[PromptOutput]:
    """A search's report: its candidates (completed paths, final particles) and the chosen one."""
    report = decoded.extras
    return [PromptOutput(candidates=report.candidates[b], chosen=report.chosen[b][0]) for b in range(prompts)]


def _sampled_search(what: str):
    return lambda args, n: None if n == 1 else (
        f"{what} needs sampled steps: at --temperature 0 the --n {n} paths are one greedy answer repeated; give a "
        "temperature > 0")


for _name, _class, _options, _summary in (
    ("beam_search", "StepBeamSearch", BeamSearchOptions,
     "step-level beam search: --n beams, the best n / --beam-width kept each step by a process reward (--prm, "
     "--value-model or the first --reward on partial responses)"),
    ("dvts", "DVTS", DVTSOptions,
     "diverse verifier tree search: --n / --beam-width independent subtrees, each greedy on the process reward"),
    ("particle_filter", "ParticleFilter", ParticleFilterOptions,
     "particle filtering over steps: --n particles resampled each step by their process reward weights "
     "(--gibbs-iterations > 1: particle Gibbs)"),
):
    register_method(Method(
        _name, _summary, _step_search_builder(_class), options=_options,
        model_flags=("prm", "prm_marker", "value_model"), layout=_candidates_layout, n_is_candidates=True,
        engines=ENGINES, engine_only=True, needs_sampling=_sampled_search(_name),
    ))


def _build_pruned_best_of_n(args: MethodArgs, ctx: BuildContext):
    from ..decoding import PrunedBestOfN

    if ctx.reward is None:
        raise ValueError("pruned_best_of_n needs a reward: pass --reward NAME")
    return PrunedBestOfN(ctx.reward, **{**args.options.values(), "n": ctx.n}, engine=ctx.engine())


register_method(Method(
    "pruned_best_of_n",
    "best-of-N with early pruning (speculative rejection): --n candidates scored by the first --reward on their "
    "partial responses at each --prune-at token count, the best --keep-fraction going on",
    _build_pruned_best_of_n,
    options=PrunedBestOfNOptions,
    layout=_candidates_layout,
    needs_reward=True,
    n_is_candidates=True,
    engines=ENGINES,
    engine_only=True,
    needs_sampling=_sampled_search("pruned_best_of_n"),
))
