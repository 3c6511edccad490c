"""Rule-based rewards on the completion's surface: length, keywords, regular expressions."""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch

from ..validation import POSITIVE, Bounds, check_choice
from .base import SequenceReward


_LENGTH = Bounds(ge=0, integer=True, allow_none=True)


class LengthReward(SequenceReward):
    """A penalty on the completion's length: 0 inside the allowed range, negative outside.

        n = length of y (in `unit`s)
        d = |n - target|                                       with `target`
        d = max(0, min_length - n) + max(0, n - max_length)    with `min_length` and/or `max_length`
        r(x, y) = -(d / scale) ** power

    So r <= 0, r = 0 exactly when the constraint holds, and the penalty grows linearly (power=1, the
    default) or quadratically (power=2) with the distance, in units of `scale` (one unit = -1 reward at
    power 1; set scale=target for a relative penalty).

    Args:
        target: the wanted length (cannot be combined with min_length / max_length).
        min_length, max_length: an allowed range; either may be left open.
        unit: "words" (whitespace-separated, the default), "chars", or "tokens" (needs `tokenizer`).
        scale: the distance that costs one unit of reward (> 0, default 1).
        power: the shape of the penalty (> 0, default 1: linear).
        tokenizer: a transformers tokenizer, for unit="tokens" (special tokens not counted).

    Example:
        >>> LengthReward(max_length=3).score(["", ""], ["one two", "one two three four five"])
        tensor([ 0., -2.])
        >>> LengthReward(target=4, power=2).score([""], ["a b"])
        tensor([-4.])
    """

    name = "length"
    UNITS = ("words", "chars", "tokens")

    def __init__(self, target: int | None = None, min_length: int | None = None, max_length: int | None = None,
                 unit: str = "words", scale: float = 1.0, power: float = 1.0, tokenizer=None):
        self.target = _LENGTH.check(target, "target")
        self.min_length = _LENGTH.check(min_length, "min_length")
        self.max_length = _LENGTH.check(max_length, "max_length")
        if self.target is None and self.min_length is None and self.max_length is None:
            raise ValueError("LengthReward needs target, or min_length and/or max_length")
        if self.target is not None and (self.min_length is not None or self.max_length is not None):
            raise ValueError("give either target or min_length/max_length, not both")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) must be <= max_length ({self.max_length})")
        check_choice(unit, "unit", self.UNITS)
        if unit == "tokens" and tokenizer is None:
            raise ValueError("unit='tokens' needs a tokenizer")
        self.unit = unit
        self.scale = POSITIVE.check(scale, "scale")
        self.power = POSITIVE.check(power, "power")
        self.tokenizer = tokenizer

    def lengths(self, completions: Sequence[str]) -> list[int]:
        """The length of each completion in this reward's unit."""
        if self.unit == "words":
            return [len(c.split()) for c in completions]
        if self.unit == "chars":
            return [len(c) for c in completions]
        ids = self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        return [len(row) for row in ids]

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        n = torch.tensor(self.lengths(completions), dtype=torch.float64)
        if self.target is not None:
            d = (n - self.target).abs()
        else:
            lo = 0.0 if self.min_length is None else self.min_length
            hi = math.inf if self.max_length is None else self.max_length
            d = (lo - n).clamp(min=0) + (n - hi).clamp(min=0)
        # 0 - x rather than -x, so a satisfied constraint reads 0.0 and not -0.0
        return 0.0 - (d / self.scale) ** self.power


class KeywordReward(SequenceReward):
    """The fraction of keyword constraints the completion satisfies.

        r(x, y) = ( #{k in include : k occurs in y} + #{k in exclude : k does not occur in y} )
                  / ( |include| + |exclude| )              in [0, 1]

    "Occurs" is a substring test, case-insensitive by default (as in IFEval's keyword checks);
    `whole_word=True` requires word boundaries, so "cat" no longer occurs in "concatenate".

    Args:
        include: keywords the completion must contain.
        exclude: keywords the completion must avoid.
        case_sensitive: match case exactly (default False).
        whole_word: match whole words only (default False).

    Example:
        >>> r = KeywordReward(include=["Paris", "France"], exclude=["London"])
        >>> r.score(["", ""], ["Paris is in France.", "Paris, not London."])
        tensor([1.0000, 0.3333])
    """

    name = "keywords"

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = (), case_sensitive: bool = False,
                 whole_word: bool = False):
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError("include and exclude must be lists of keywords, not a single string")
        self.include = list(include)
        self.exclude = list(exclude)
        if not self.include and not self.exclude:
            raise ValueError("KeywordReward needs at least one keyword in include or exclude")
        for k in self.include + self.exclude:
            if not isinstance(k, str) or not k:
                raise ValueError(f"keywords must be non-empty strings, got {k!r}")
        fold = (lambda s: s) if case_sensitive else str.casefold
        both = {fold(k) for k in self.include} & {fold(k) for k in self.exclude}
        if both:
            raise ValueError(f"keywords {sorted(both)} are both included and excluded")
        flags = 0 if case_sensitive else re.IGNORECASE
        def compile_(k: str) -> re.Pattern:
            body = re.escape(k)
            return re.compile(rf"(?<!\w){body}(?!\w)" if whole_word else body, flags)
        self._include = [compile_(k) for k in self.include]
        self._exclude = [compile_(k) for k in self.exclude]

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        total = len(self._include) + len(self._exclude)
        out = []
        for c in completions:
            met = sum(p.search(c) is not None for p in self._include)
            met += sum(p.search(c) is None for p in self._exclude)
            out.append(met / total)
        return torch.tensor(out, dtype=torch.float32)


class RegexReward(SequenceReward):
    r"""1.0 when the completion matches a regular expression, else 0.0.

        r(x, y) = 1[ pattern matches y ]

    Args:
        pattern: a regular expression (string or compiled `re.Pattern`).
        mode: "search" (anywhere in y, the default) or "fullmatch" (all of y).
        flags: `re` flags for a string pattern (e.g. re.IGNORECASE).
        strip: strip surrounding whitespace from y first (default True), so a trailing newline does not
            break a full match.

    Example:
        >>> r = RegexReward(r"\d{4}-\d{2}-\d{2}", mode="fullmatch")
        >>> r.score(["Date?", "Date?"], ["2024-05-01\n", "It is 2024-05-01"])
        tensor([1., 0.])
    """

    name = "regex"
    MODES = ("search", "fullmatch")

    def __init__(self, pattern: str | re.Pattern, mode: str = "search", flags: int = 0, strip: bool = True):
        check_choice(mode, "mode", self.MODES)
        if isinstance(pattern, re.Pattern):
            if flags:
                raise ValueError("flags cannot be given with an already compiled pattern")
            self.pattern = pattern
        elif isinstance(pattern, str):
            try:
                self.pattern = re.compile(pattern, flags)
            except re.error as err:
                raise ValueError(f"invalid regular expression {pattern!r}: {err}") from err
        else:
            raise TypeError(f"pattern must be a str or re.Pattern, got {type(pattern).__name__}")
        self.mode = mode
        self.strip = strip

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        match = self.pattern.search if self.mode == "search" else self.pattern.fullmatch
        return torch.tensor(
            [float(match(c.strip() if self.strip else c) is not None) for c in completions], dtype=torch.float32
        )
