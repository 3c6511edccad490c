"""Options declared once: a dataclass whose fields carry their default, range or choices, and help.

Each decoding method's options (`decoding.options`) and the run command's own (`commandline.run.RunOptions`)
are such dataclasses. Everything else is derived from them:

- a strategy's constructor takes the fields as keyword arguments with these defaults
  (`QAlign(reward, beta=QAlignOptions.beta, ...)`) and validates them by building the dataclass;
- the command line makes one flag per field (`--burn-in`), with its help, type and default, and config
  files take the same names as keys;
- validation (through `validation`) names the option as the user wrote it: `beta must be ...` from
  Python, `--beta must be ...` from the command line (`named_as_flags()`), before any model loads.

Cross-option rules live in each class's `check()`. This module imports nothing heavy, so the command
line's `--help` and argument errors never import torch.

    >>> @dataclass
    ... class Knobs(Options):
    ...     steps: int = option(16, "steps per chain", bounds=NON_NEGATIVE_INT)
    >>> Knobs(steps=4).steps
    4
    >>> with named_as_flags():
    ...     Knobs(steps=-1)
    Traceback (most recent call last):
    ValueError: --steps must be an integer >= 0, got -1
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from .validation import NON_NEGATIVE_INT, Bounds, check_choice, check_numbers

_AS_FLAGS = contextvars.ContextVar("align_decode_options_as_flags", default=False)
# A prefix when option errors name keys of a JSON object (the server's request field); None otherwise.
_AS_KEYS = contextvars.ContextVar("align_decode_options_as_keys", default=None)


@contextlib.contextmanager
def named_as_flags() -> Iterator[None]:
    """Within this block, option errors name command-line flags (`--burn-in`) instead of arguments."""
    token = _AS_FLAGS.set(True)
    try:
        yield
    finally:
        _AS_FLAGS.reset(token)


@contextlib.contextmanager
def named_as_keys(prefix: str = "") -> Iterator[None]:
    """Within this block, option errors name keys of a JSON object (`align_decode.burn_in`: the flag's
    name as config files and the server's requests spell it, after `prefix`); this wins over an inner
    named_as_flags(), so code shared with the command line names keys too."""
    token = _AS_KEYS.set(prefix)
    try:
        yield
    finally:
        _AS_KEYS.reset(token)


def option(default: Any, help: str, *, bounds: Bounds | None = None, choices: Sequence[Any] | None = None,
           flag: str | None = None, multiple: bool = False, cli: bool = True, metavar: str | None = None,
           from_flag: Callable[[Any], Any] | None = None, flag_choices: Sequence[str] | None = None):
    """A dataclass field declaring one option.

    Args:
        default: its value when not given (the constructors' default too).
        help: one line for `--help` and `align-decode methods`.
        bounds: the allowed range of a number (each element's, with multiple).
        choices: the allowed values.
        flag: the command-line name without dashes, when it differs from the field's (`chain_answer`).
        multiple: a tuple of values; the flag is repeatable.
        cli: False keeps it out of the command line (Python only).
        from_flag / flag_choices: the flag takes one of flag_choices, converted by from_flag.
    """
    meta = {"help": help, "bounds": bounds, "choices": tuple(choices) if choices else None, "flag": flag,
            "multiple": multiple, "cli": cli, "metavar": metavar, "from_flag": from_flag,
            "flag_choices": tuple(flag_choices) if flag_choices else None}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """What one declared option says, read off its dataclass field."""

    name: str
    default: Any
    help: str
    bounds: Bounds | None
    choices: tuple | None
    flag_name: str
    multiple: bool
    cli: bool
    metavar: str | None
    from_flag: Callable[[Any], Any] | None
    flag_choices: tuple | None

    @property
    def flag(self) -> str:
        return "--" + self.flag_name.replace("_", "-")

    def label(self) -> str:
        prefix = _AS_KEYS.get()
        if prefix is not None:
            return prefix + self.flag_name
        return self.flag if _AS_FLAGS.get() else self.name

    @property
    def kind(self) -> str:
        """The value type: 'choice', 'bool', 'int', 'float' or 'str'."""
        if self.choices or self.flag_choices:
            return "choice"
        if isinstance(self.default, bool):
            return "bool"
        if self.bounds is not None:
            return "int" if self.bounds.integer else "float"
        return "str"

    def validate(self, value: Any) -> Any:
        name = self.label()
        if self.multiple:
            if value is None:
                return None
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a sequence, got {value!r}")
            if self.bounds is None:  # names: files, specs
                return tuple(value)
            return tuple(check_numbers(list(value), name, self.bounds))
        if self.choices:
            return check_choice(value, name, self.choices)
        if self.bounds is not None:
            return self.bounds.check(value, name, mention_none=not _AS_FLAGS.get())
        if isinstance(self.default, bool) and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return value

    def default_text(self) -> str:
        default = self.default
        if self.from_flag is not None and self.flag_choices:
            default = next((c for c in self.flag_choices if self.from_flag(c) == default), default)
        if isinstance(default, str):
            return default.encode("unicode_escape").decode("ascii")  # a delimiter "\n\n" shows as typed
        return "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


@functools.cache
def _specs(cls: type) -> tuple[OptionSpec, ...]:
    """A declaration's specs, read once per class (every construction validates against them)."""
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        out.append(OptionSpec(f.name, f.default, m["help"], m["bounds"], m["choices"], m["flag"] or f.name,
                              m["multiple"], m["cli"], m["metavar"], m["from_flag"], m["flag_choices"]))
    return tuple(out)


class Options:
    """Base of the option dataclasses: each field is checked against its declaration on construction."""

    def __post_init__(self) -> None:
        for spec in self.specs():
            object.__setattr__(self, spec.name, spec.validate(getattr(self, spec.name)))
        self.check()

    def check(self) -> None:
        """Rules between options (override)."""

    @classmethod
    def specs(cls) -> tuple[OptionSpec, ...]:
        return _specs(cls)

    @classmethod
    def spec(cls, name: str) -> OptionSpec:
        return next(s for s in cls.specs() if s.name == name)

    @classmethod
    def label(cls, name: str) -> str:
        return cls.spec(name).label()

    def values(self) -> dict[str, Any]:
        """{field: value}, shallow (unlike dataclasses.asdict)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
