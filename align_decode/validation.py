"""The one place that checks a user's numbers and choices, with one wording for every message.

Every constructor, option declaration and command-line check goes through `Bounds.check` or
`check_choice`, so `beta=True`, `steps="2"` or `top_p=nan` are refused the same way everywhere, and the
message names the argument as the user wrote it (`beta` in Python, `--beta` on the command line).

    >>> Bounds(gt=0).check(0.5, "beta")
    0.5
    >>> Bounds(ge=1, integer=True).check(0, "--steps")
    Traceback (most recent call last):
    ValueError: --steps must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Bounds:
    """A range for a number: any of gt / ge / lt / le, an integer or any finite real, None allowed or not."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    integer: bool = False
    allow_none: bool = False

    def describe(self, mention_none: bool = True) -> str:
        """'an integer >= 1', 'a finite number > 0', 'a number in (0, 1]', ... (and 'or None' when allowed,
        unless mention_none is False: on the command line None only means "not given")."""
        kind = "an integer" if self.integer else "a finite number"
        low = (f"({_fmt(self.gt)}" if self.gt is not None else f"[{_fmt(self.ge)}" if self.ge is not None else None)
        high = (f"{_fmt(self.lt)})" if self.lt is not None else f"{_fmt(self.le)}]" if self.le is not None else None)
        if low and high:
            text = f"{'an integer' if self.integer else 'a number'} in {low}, {high}"
        elif low:
            text = f"{kind} {'>' if self.gt is not None else '>='} {low[1:]}"
        elif high:
            text = f"{kind} {'<' if self.lt is not None else '<='} {high[:-1]}"
        else:
            text = kind
        return text + (" or None" if self.allow_none and mention_none else "")

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.allow_none
        # bool is an int subclass and a string is not a number: both are refused, never converted.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        return not (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        )

    def check(self, value: Any, name: str, mention_none: bool = True):
        """The value (an int stays an int, a real becomes a float), or a ValueError naming `name`."""
        if not self.contains(value):
            raise ValueError(f"{name} must be {self.describe(mention_none)}, got {value!r}")
        if value is None or self.integer:
            return None if value is None else int(value)
        return float(value)


FINITE = Bounds()
POSITIVE = Bounds(gt=0)
AT_LEAST_ONE = Bounds(ge=1, integer=True)
NON_NEGATIVE_INT = Bounds(ge=0, integer=True)
PROBABILITY = Bounds(ge=0, le=1)


def check_choice(value: Any, name: str, choices: Sequence[Any]):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_numbers(values: Sequence[Any], name: str, bounds: Bounds = FINITE) -> list:
    """Each value of a sequence checked, the message naming `name` and the position."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}")
    return [bounds.check(v, f"{name}[{i}]") for i, v in enumerate(values)]
