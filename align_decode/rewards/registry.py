"""Rewards by name, for the command line: `--reward NAME[:ARGS]`, `--reward module:function`, `--reward none`.

Each reward is one entry: a name, a one-line summary, a usage hint, and a builder that turns the text
after the colon (None when there is none) into a SequenceReward. Builders import their reward's module
inside, so a reward whose optional package is missing costs nothing until it is asked for, and then
fails with a clear message (and a default reward is simply left out).

Adding a reward:

    @register_reward("politeness", "share of polite markers in the completion", usage="politeness[:WORD,...]")
    def _politeness(arg, ctx):
        from .politeness import PolitenessReward      # the module that implements it
        words, named = split_args(arg)
        return PolitenessReward(words or None)

`--reward mymodule:score` (or `path/to/file.py:score`) loads a SequenceReward instance or subclass, or a
plain batched function `score(prompts, completions) -> floats`, without registering anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from .base import SequenceReward

# Rewards scored when --reward is not given, in order; any that is not registered or cannot be built
# here (a missing optional package) is left out, so the defaults never stop a run.
DEFAULT_REWARDS: tuple[str, ...] = ("sentiment",)
NONE = "none"


@dataclass(frozen=True)
class RewardContext:
    """What a reward builder may need: where to put a model of its own, the policy's tokenizer (for
    token counts), and the prompt records (for per-prompt references such as an "answer" field)."""

    device: str = "cpu"
    dtype: str = "float32"
    tokenizer: Any = None
    records: Sequence[Any] = field(default_factory=tuple)  # io.PromptRecord: .text, .meta, .line


@dataclass(frozen=True)
class RewardEntry:
    name: str
    build: Callable[[str | None, RewardContext], SequenceReward]
    summary: str
    usage: str


REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, summary: str, usage: str | None = None):
    """Decorator: register `build(arg, ctx) -> SequenceReward` under `name`."""
    if not name or ":" in name or name == NONE:
        raise ValueError(f"reward name must be non-empty, without ':', and not {NONE!r}; got {name!r}")

    def decorate(build):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = RewardEntry(name, build, summary, usage or name)
        return build

    return decorate


def split_args(arg: str | None) -> tuple[list[str], dict[str, str]]:
    """'a,b,key=value' -> (['a', 'b'], {'key': 'value'}): the usual shape of a reward's arguments."""
    positional, named = [], {}
    for part in (arg or "").split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if eq:
            named[key.strip()] = value.strip()
        else:
            positional.append(part.strip())
    return positional, named


def typed_args(reward: str, named: dict[str, str], types: dict[str, type]) -> dict[str, Any]:
    """Convert key=value arguments with the given types; an unknown key or a bad value is an error."""
    out = {}
    for key, text in named.items():
        if key not in types:
            raise ValueError(f"reward {reward!r} has no argument {key!r} (it takes: {', '.join(types)})")
        try:
            out[key] = types[key](text)
        except ValueError:
            raise ValueError(f"reward {reward!r}: {key}={text!r} is not a valid {types[key].__name__}") from None
    return out


class RewardUnavailable(ValueError):
    """A registered reward that cannot be built here (its optional package or module is missing)."""


def _import_module(target: str):
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reward file not found: {path}")
        module_name = f"_align_decode_reward_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(target)


def load_callable_reward(spec: str) -> SequenceReward:
    """`module:attr` or `file.py:attr` -> a SequenceReward (instance, subclass, or batched function)."""
    from .base import SequenceReward
    from .function import CallableReward

    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"--reward {spec!r}: expected module:function")
    try:
        module = _import_module(target)
    except ImportError as e:
        raise ValueError(f"--reward {spec!r}: cannot import {target}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--reward {spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, SequenceReward):
        return obj
    if isinstance(obj, type) and issubclass(obj, SequenceReward):
        return obj()
    if callable(obj):
        return CallableReward(obj, batched=True, name=spec)
    raise TypeError(f"--reward {spec!r} is a {type(obj).__name__}, not a reward or a scoring function")


def check_spec(spec: str) -> None:
    """Cheap check of a spec before anything loads: a registered name, `none`, or module:function."""
    name, colon, _ = spec.partition(":")
    if spec != NONE and name not in REWARDS and not colon:
        known = ", ".join(sorted(REWARDS)) or "none registered"
        raise ValueError(f"unknown reward {spec!r} (known: {known}; or module:function, or {NONE!r})")


def build_reward(spec: str, ctx: RewardContext | None = None) -> SequenceReward:
    """One reward from its command-line spec."""
    check_spec(spec)
    ctx = ctx or RewardContext()
    name, colon, arg = spec.partition(":")
    entry = REWARDS.get(name)
    if entry is None:
        return load_callable_reward(spec)
    try:
        return entry.build(arg if colon else None, ctx)
    except ImportError as e:
        raise RewardUnavailable(f"reward {name!r} is unavailable here: {e}") from None


def check_specs(specs: Sequence[str]) -> None:
    """The checks of build_rewards that need nothing loaded."""
    specs = list(specs)
    if NONE in specs and len(specs) > 1:
        raise ValueError(f"--reward {NONE} cannot be combined with other rewards")
    repeated = sorted({s for s in specs if specs.count(s) > 1})
    if repeated:
        raise ValueError(f"--reward given twice: {', '.join(repeated)}")
    for spec in specs:
        check_spec(spec)


def build_rewards(
    specs: Sequence[str] | None,
    ctx: RewardContext | None = None,
    note: Callable[[str], None] | None = None,
) -> dict[str, SequenceReward]:
    """{spec: reward} for the given specs; the defaults that can be built when specs is empty; nothing
    for ['none']."""
    specs = list(specs or [])
    check_specs(specs)
    if specs == [NONE]:
        return {}
    if specs:
        return {spec: build_reward(spec, ctx) for spec in specs}
    rewards = {}
    for name in DEFAULT_REWARDS:
        if name not in REWARDS:
            continue
        try:
            rewards[name] = build_reward(name, ctx)
        except RewardUnavailable as e:
            if note is not None:
                note(f"default {e}; the output has no {name} scores")
    return rewards


# ------------------------------------------------------------------------------------- built-in rewards
def _no_args(name: str, arg: str | None) -> None:
    if arg:
        raise ValueError(f"reward {name!r} takes no arguments, got {arg!r}")


@register_reward("sentiment", "positive sentiment of the completion (VADER compound, in [-1, 1])",
                 usage="sentiment[:compound|pos|neg|neu]")
def _sentiment(arg, ctx):
    from .offline import SentimentReward

    return SentimentReward(measure=arg or "compound")


@register_reward("non_toxicity", "1 - P(offensive) of the completion (alt-profanity-check), in [0, 1]")
def _non_toxicity(arg, ctx):
    from .offline import NonToxicityReward

    _no_args("non_toxicity", arg)
    return NonToxicityReward()


@register_reward("length", "0 inside a length range, negative outside it",
                 usage="length:target=N|min_length=N,max_length=N[,unit=words|chars|tokens,scale=S,power=P]")
def _length(arg, ctx):
    from .constraints import LengthReward

    positional, named = split_args(arg)
    if positional:
        raise ValueError(f"reward 'length' takes key=value arguments, got {positional}")
    kwargs = typed_args("length", named, {"target": int, "min_length": int, "max_length": int, "unit": str,
                                          "scale": float, "power": float})
    return LengthReward(**kwargs, tokenizer=ctx.tokenizer)


@register_reward("keywords", "share of keyword constraints met (a !word must be absent)",
                 usage="keywords:WORD[,WORD...][,!WORD...]")
def _keywords(arg, ctx):
    from .constraints import KeywordReward

    words, named = split_args(arg)
    if named:
        raise ValueError(f"reward 'keywords' takes words, not key=value arguments: {named}")
    return KeywordReward(include=[w for w in words if not w.startswith("!")],
                         exclude=[w[1:] for w in words if w.startswith("!")])


@register_reward("regex", "1 when the completion matches the regular expression (anywhere), else 0",
                 usage="regex:PATTERN")
def _regex(arg, ctx):
    from .constraints import RegexReward

    if not arg:
        raise ValueError("reward 'regex' needs a pattern: regex:PATTERN")
    return RegexReward(arg)  # the whole argument: a pattern may hold commas and colons


@register_reward("exact_match", "1 when the completion's final answer equals the prompt's \"answer\" field",
                 usage="exact_match[:number|boxed|option]")
def _exact_match(arg, ctx):
    from .answers import ExactMatchReward

    answers: dict[str, Any] = {}
    for record in ctx.records:
        if "answer" not in record.meta:
            raise ValueError(
                f"reward 'exact_match' needs an \"answer\" field on every prompt; line {record.line} has none"
            )
        if answers.setdefault(record.text, record.meta["answer"]) != record.meta["answer"]:
            raise ValueError(f"reward 'exact_match': line {record.line} repeats a prompt with another answer")
    return ExactMatchReward(answers, kind=arg or "number")


@register_reward("instructions", "IFEval-style verifiable instructions in the prompt's \"instructions\" field: "
                 "strict (all pass), partial (share passing) or soft (a partial score)",
                 usage="instructions[:strict|partial|soft]")
def _instructions(arg, ctx):
    from .instructions import InstructionReward

    table: dict[str, Any] = {}
    for record in ctx.records:
        if "instructions" not in record.meta:
            raise ValueError(f"reward 'instructions' needs an \"instructions\" field on every prompt; "
                             f"line {record.line} has none")
        if table.setdefault(record.text, record.meta["instructions"]) != record.meta["instructions"]:
            raise ValueError(f"reward 'instructions': line {record.line} repeats a prompt with other instructions")
    return InstructionReward(table, mode=arg or "strict")


@register_reward("classifier", "a local sequence-classification reward model",
                 usage="classifier:DIR[,reduction=logit|prob|log_prob,label=L,max_length=N,batch_size=N]")
def _classifier(arg, ctx):
    from .classifier import ClassifierReward

    positional, named = split_args(arg)
    if len(positional) != 1:
        raise ValueError("reward 'classifier' needs one model folder: classifier:DIR[,key=value...]")
    kwargs = typed_args("classifier", named, {"reduction": str, "label": str, "max_length": int, "batch_size": int})
    if "label" in kwargs and kwargs["label"].isdigit():
        kwargs["label"] = int(kwargs["label"])
    return ClassifierReward(positional[0], device=ctx.device, dtype=ctx.dtype, **kwargs)
