"""Rewards by name, for the command line: `--reward NAME[:ARGS]`, `--reward module:function`, `--reward none`.

Each reward is one entry: a name, a one-line summary, a usage hint, and a builder that turns the text
after the colon (None when there is none) into a SequenceReward. Builders import their reward's module
inside, so a reward whose optional package is missing costs nothing until it is asked for, and then
fails with a clear message (and the default reward is simply left out).

Adding a reward:

    @register_reward("keyword", "count of the given words in the completion", usage="keyword:WORD[,WORD...]")
    def _keyword(arg, ctx):
        from .lexical import KeywordReward          # the module that implements it
        words, _ = split_args(arg)
        return KeywordReward(words)

`--reward mymodule:score` (or `path/to/file.py:score`) loads a SequenceReward instance or subclass, or a
plain function `score(prompts, completions) -> floats`, without registering anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .base import SequenceReward

# Rewards scored when --reward is not given, in order; any that is not registered or cannot be built
# here (a missing optional package) is left out, so the defaults never stop a run.
DEFAULT_REWARDS: tuple[str, ...] = ("sentiment",)
NONE = "none"


@dataclass(frozen=True)
class RewardContext:
    """What a reward builder may need to load a model of its own."""

    device: str = "cpu"
    dtype: str = "float32"


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


class RewardUnavailable(ValueError):
    """A registered reward that cannot be built here (its optional package or module is missing)."""


class FunctionReward(SequenceReward):
    """A plain function `score(prompts, completions) -> floats` used as a sequence reward."""

    def __init__(self, fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]], name: str):
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name

    def _score(self, prompts, completions):
        return self.fn(prompts, completions)


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
    """`module:attr` or `file.py:attr` -> a SequenceReward (instance, subclass, or scoring function)."""
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
        return FunctionReward(obj, name=spec)
    raise TypeError(f"--reward {spec!r} is a {type(obj).__name__}, not a reward or a scoring function")


def build_reward(spec: str, ctx: RewardContext | None = None) -> SequenceReward:
    """One reward from its command-line spec."""
    ctx = ctx or RewardContext()
    name, colon, arg = spec.partition(":")
    entry = REWARDS.get(name)
    if entry is not None:
        try:
            return entry.build(arg if colon else None, ctx)
        except ImportError as e:
            raise RewardUnavailable(f"reward {name!r} is unavailable here: {e}") from None
    if colon:
        return load_callable_reward(spec)
    known = ", ".join(sorted(REWARDS)) or "none registered yet"
    raise ValueError(f"unknown reward {spec!r} (known: {known}; or module:function, or {NONE!r})")


def build_rewards(
    specs: Sequence[str] | None,
    ctx: RewardContext | None = None,
    note: Callable[[str], None] | None = None,
) -> dict[str, SequenceReward]:
    """{spec: reward} for the given specs; the defaults that can be built when specs is empty; nothing
    for ['none']."""
    specs = list(specs or [])
    if NONE in specs:
        if len(specs) > 1:
            raise ValueError(f"--reward {NONE} cannot be combined with other rewards")
        return {}
    if len(set(specs)) != len(specs):
        raise ValueError(f"--reward given twice: {', '.join(sorted({s for s in specs if specs.count(s) > 1}))}")
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
