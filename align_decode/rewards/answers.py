"""Final-answer extraction for math and multiple-choice prompts, and an exact-match reward built on it.

`extract_answer` is a standalone function because majority-vote aggregation (QAlign, MV, WMV) groups
samples by the same extracted answer that `ExactMatchReward` compares against a reference.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Mapping, Sequence, Union

import torch

from ..validation import Bounds, check_choice
from .base import SequenceReward

ANSWER_KINDS = ("number", "option", "boxed")
DEFAULT_OPTIONS = "ABCDEFGHIJ"

# A number that does not start inside another number (after a digit or a decimal point): optional
# minus (ASCII or U+2212), digits with optional comma thousands groups, optional decimals; or a bare
# ".5". Commas that do not form groups of three ("1,2,3") separate numbers, so a list ends with its last
# element; a minus right after a digit ("5-3") is a hyphen, not a sign.
_NUMBER = re.compile(
    r"(?<!\d)(?<!\d\.)([-\u2212]?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)"
)
_GSM_MARKER = "####"
_BOXED = re.compile(r"\\(?:boxed|fbox)")


def _canonical_number(sign: str, digits: str) -> str:
    """'1,234.50' -> '1234.5', '-0' -> '0', '72.0' -> '72': equal numbers get equal strings."""
    value = Decimal(digits.replace(",", ""))
    return _canonical_decimal(-value if sign else value)


def _canonical_decimal(value: Decimal) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    # normalize() would switch to exponent notation for some values; format fixed-point instead.
    return format(value.normalize(), "f")


def _extract_number(text: str, normalize: bool) -> str | None:
    marker = text.rfind(_GSM_MARKER)
    if marker >= 0:
        # GSM8K references (and models trained on them) put the answer right after the last '####'.
        match = _NUMBER.search(text, marker + len(_GSM_MARKER))
    else:
        match = None
        for match in _NUMBER.finditer(text):
            pass
    if match is None:
        return None
    if not normalize:
        return match.group(0)
    return _canonical_number(match.group(1), match.group(2))


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The contents of the brace group opening at text[start] ('{'), honouring nesting; None if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            continue  # '\{' and '\}' are literal braces inside LaTeX, not grouping
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def _normalize_latex(ans: str) -> str:
    ans = ans.strip().strip("$").strip()
    for spacing in ("\\!", "\\,", "\\;", "\\:", "\\ "):
        ans = ans.replace(spacing, "")
    ans = ans.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    ans = re.sub(r"\s+", "", ans)
    return ans.rstrip(".")


def _extract_boxed(text: str, normalize: bool) -> str | None:
    # The last well-formed box wins; a trailing unclosed '\boxed{' (cut-off generation) is skipped.
    for match in reversed(list(_BOXED.finditer(text))):
        pos = match.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            got = _braced(text, pos)
            if got is None:
                continue
            content = got[0]
        elif pos > match.end():
            # '\boxed 5' (no braces) boxes one token, up to whitespace or the end of inline math.
            content = re.match(r"[^\s$]*", text[pos:]).group(0)
            if not content:
                continue
        else:
            continue
        return _normalize_latex(content) if normalize else content
    return None


def _option_patterns(options: str) -> list[re.Pattern]:
    letters = "[" + re.escape(options) + "]"
    end = r"(?![A-Za-z0-9])"
    return [
        # "answer is (C)", "Answer: C", "the correct option is C", "choice: [B]"
        re.compile(
            r"(?i:answer|option|choice)\s*(?:is\s*)?(?::\s*)?[(\[]?\s*(" + letters + r")\s*[)\]]?" + end
        ),
        re.compile(r"\((" + letters + r")\)"),  # "(C)"
        re.compile(r"\[(" + letters + r")\]"),  # "[C]"
        re.compile(r"\*\*(" + letters + r")\*\*"),  # "**C**"
        re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*(" + letters + r")\s*\}?\s*\}"),  # "\boxed{C}"
        re.compile(r"^\s*[(\[]?(" + letters + r")[)\]]?[.:]?\s*$"),  # the whole text is just "C" or "C."
    ]


_OPTION_CACHE: dict[str, list[re.Pattern]] = {}


def _extract_option(text: str, options: str) -> str | None:
    patterns = _OPTION_CACHE.get(options)
    if patterns is None:
        patterns = _OPTION_CACHE.setdefault(options, _option_patterns(options))
    best: tuple[int, str] | None = None
    for pattern in patterns:
        for match in pattern.finditer(text):
            if best is None or match.start(1) > best[0]:
                best = (match.start(1), match.group(1))
    return None if best is None else best[1]


def extract_answer(
    text: str, kind: str = "number", *, normalize: bool = True, options: str = DEFAULT_OPTIONS
) -> str | None:
    r"""The final answer stated in `text`, or None when there is none.

    Kinds:
        - ``"number"`` (GSM8K style): the first number after the last ``####`` marker if there is one,
          else the last number in the text. Thousands commas, minus signs (``-`` or ``−``) and decimals
          are understood; ``$`` and ``%`` are ignored. Fractions ("3/4") and exponents are not parsed:
          "3/4" reads as 4. A ``####`` with no number after it gives None.
        - ``"boxed"`` (MATH style): the contents of the last well-formed ``\boxed{...}`` (or ``\fbox``),
          nested braces included; ``\boxed 5`` without braces is read up to whitespace or ``$``.
        - ``"option"`` (multiple choice): the last option letter stated as "answer is (C)",
          "Answer: C", "option C", "(C)", "[C]", "**C**", ``\boxed{C}``, or a text that is just "C".
          Bare capital letters inside prose are ignored, so the article "A" is not read as an option.

    With ``normalize=True`` (the default) equal answers come back as equal strings, which is what
    majority vote needs: numbers in canonical decimal form ("1,234.50" -> "1234.5", "72.0" -> "72",
    "-0" -> "0"); boxed contents without whitespace, surrounding ``$``, LaTeX thin spaces or a trailing
    period, with ``\dfrac``/``\tfrac`` written ``\frac``. Option letters are returned as found.

    Args:
        text: a completion (or a reference solution).
        kind: one of "number", "option", "boxed".
        normalize: canonicalise the answer (see above); False returns the matched text.
        options: the option letters accepted for kind="option" (default "ABCDEFGHIJ").

    Example:
        >>> extract_answer("She pays 3 * $1,250 = $3,750.\n#### 3,750")
        '3750'
        >>> extract_answer(r"so $x = \boxed{\frac{1}{2}}$.", kind="boxed")
        '\\frac{1}{2}'
        >>> extract_answer("Comparing the choices, the answer is (C).", kind="option")
        'C'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    check_choice(kind, "kind", ANSWER_KINDS)
    if kind == "number":
        return _extract_number(text, normalize)
    if kind == "boxed":
        return _extract_boxed(text, normalize)
    if not options or not all(c.isalpha() and c.isupper() and len(c) == 1 for c in options):
        raise ValueError(f"options must be a non-empty string of capital letters, got {options!r}")
    return _extract_option(text, options)


def _as_decimal(ans: str) -> Decimal | None:
    try:
        value = Decimal(ans.replace(",", "").replace("\u2212", "-"))
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def answers_match(predicted: str | None, reference: str | None, tolerance: float = 0.0) -> bool:
    """Whether two extracted answers agree: numerically when both read as numbers (|a - b| <= tolerance),
    else as strings. A missing answer (None) matches nothing.

    Example:
        >>> answers_match("0.50", ".5"), answers_match("C", "C"), answers_match(None, "3")
        (True, True, False)
    """
    if predicted is None or reference is None:
        return False
    a, b = _as_decimal(predicted), _as_decimal(reference)
    if a is not None and b is not None:
        return abs(a - b) <= Decimal(str(tolerance))
    return predicted == reference


AnswerKey = Union[Mapping[str, Union[str, int, float]], Callable[[str], Union[str, int, float, None]]]


class ExactMatchReward(SequenceReward):
    r"""1.0 when the completion's final answer equals the prompt's reference answer, else 0.0.

        r(x, y) = 1[ extract(y) == answer(x) ]

    The completion's answer is read with `extract_answer(y, kind)`. References may be plain answers
    ("72", 72, "C", r"\frac{1}{2}") or whole reference solutions ("... #### 72", "... \boxed{5}"): a
    reference is read with the same extractor when it holds a marker the extractor recognises, and is
    otherwise taken as the answer itself. Numbers compare numerically (within `tolerance`), so "72",
    "72.0" and "72.00" agree. A completion with no recognisable answer scores 0.

    Args:
        answers: a dict prompt -> reference answer, or a callable prompt -> reference answer.
        kind: "number" (GSM8K), "boxed" (MATH) or "option" (multiple choice); see `extract_answer`.
        tolerance: absolute tolerance for numeric comparison (>= 0, default 0: exact).
        options: accepted option letters for kind="option".

    Example:
        >>> reward = ExactMatchReward({"2+3?": 5}, kind="number")
        >>> reward.score(["2+3?", "2+3?"], ["2 + 3 = 5.\n#### 5", "The answer is 6"])
        tensor([1., 0.])
    """

    name = "exact_match"

    def __init__(
        self, answers: AnswerKey, kind: str = "number", tolerance: float = 0.0, options: str = DEFAULT_OPTIONS
    ):
        check_choice(kind, "kind", ANSWER_KINDS)
        Bounds(ge=0).check(tolerance, "tolerance")
        if not (isinstance(answers, Mapping) or callable(answers)):
            raise TypeError(f"answers must be a dict prompt -> answer or a callable, got {type(answers).__name__}")
        extract_answer("", kind, options=options)  # validates options up front
        self.kind = kind
        self.tolerance = float(tolerance)
        self.options = options
        self._lookup = answers if callable(answers) and not isinstance(answers, Mapping) else None
        self._gold: dict[str, str] = {}
        if self._lookup is None:
            for prompt, ref in answers.items():
                self._gold[prompt] = self._reference(ref, prompt)

    def _reference(self, ref, prompt: str) -> str:
        if isinstance(ref, bool) or ref is None:
            raise ValueError(f"reference answer for prompt {prompt[:60]!r} must be a str or number, got {ref!r}")
        if isinstance(ref, (int, float)):
            if ref != ref or ref in (float("inf"), float("-inf")):
                raise ValueError(f"reference answer for prompt {prompt[:60]!r} must be finite, got {ref!r}")
            if self.kind == "number":
                # repr() of a float may use an exponent (1e-07), which the text extractor does not read
                return _canonical_decimal(Decimal(repr(ref)) if isinstance(ref, float) else Decimal(ref))
            text = str(ref)
        elif isinstance(ref, str):
            text = ref
        else:
            raise ValueError(
                f"reference answer for prompt {prompt[:60]!r} must be a str or number, got {type(ref).__name__}"
            )
        got = extract_answer(text, self.kind, options=self.options)
        if got is None and self.kind == "boxed":
            # a plain LaTeX answer with no \boxed around it
            got = _normalize_latex(text) or None
        if got is None and self.kind == "option" and text.strip().upper() in self.options:
            got = text.strip().upper()
        if got is None:
            raise ValueError(
                f"no {self.kind} answer could be read from the reference {text[:60]!r} for prompt {prompt[:60]!r}"
            )
        return got

    def reference_answer(self, prompt: str) -> str:
        """The normalised reference answer for `prompt` (raises KeyError naming the prompt if unknown)."""
        if self._lookup is None:
            if prompt not in self._gold:
                raise KeyError(f"ExactMatchReward has no reference answer for prompt {prompt[:80]!r}")
            return self._gold[prompt]
        if prompt not in self._gold:
            ref = self._lookup(prompt)
            if ref is None:
                raise KeyError(f"ExactMatchReward's answer function gave None for prompt {prompt[:80]!r}")
            self._gold[prompt] = self._reference(ref, prompt)
        return self._gold[prompt]

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        out = []
        for prompt, completion in zip(prompts, completions):
            gold = self.reference_answer(prompt)
            pred = extract_answer(completion, self.kind, options=self.options)
            out.append(1.0 if answers_match(pred, gold, self.tolerance) else 0.0)
        return torch.tensor(out, dtype=torch.float32)
