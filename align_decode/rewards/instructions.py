"""Verifiable instructions (IFEval-style): strict checkers, a soft partial score, and rewards built on them.

A prompt carries a list of instructions, each a dict with an IFEval instruction id and its arguments:

    {"id": "punctuation:no_comma"}
    {"id": "keywords:existence", "keywords": ["umbrella"]}
    {"id": "length_constraints:number_words", "relation": "less than", "num_words": 20}

Each instruction type has two checkers:

- strict (`check`): IFEval's verifier for that id (Zhou et al., 2023, google-research/instruction_following_eval,
  `instructions.py`), reimplemented here without its dependencies: the same string tests, except that the
  case instructions do not also run langdetect's English test, and keywords are matched literally
  (IFEval passes them to re.search as patterns). `startend:start_checker` is not in IFEval: the response,
  stripped of spaces and a leading double quote, starts with the phrase as whole words.
- soft (`soft`): a cheap partial score in [0, 1] that a sloppy checker would compute: the share of
  letters in the right case, the share of keywords present (or absent), a penalty that shrinks with each
  comma or extra word, half a point per quotation mark at each end, and a start or end phrase found
  *anywhere* in the response (the position is not checked).

Rewards (`InstructionReward(instructions, mode)`, `--reward instructions[:MODE]`), per response:

- "strict": 1 when every instruction passes its strict checker, else 0 (IFEval's prompt-level strict
  accuracy): the judge in the quality benchmark.
- "partial": the share of instructions that pass strictly (IFEval's instruction-level strict accuracy).
- "soft": the mean soft score over the instructions: a proxy that is correlated with the judge but
  not the judge (it can be maximised by responses the judge fails).

Example:
    >>> r = InstructionReward({"Say hi.": [{"id": "punctuation:no_comma"},
    ...                                    {"id": "startend:quotation"}]}, mode="strict")
    >>> r.score(["Say hi.", "Say hi."], ['"hi there"', '"hi, there'])
    tensor([1., 0.])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..validation import check_choice
from .base import SequenceReward

MODES = ("strict", "partial", "soft")
RELATIONS = ("less than", "at least")


def count_words(text: str) -> int:
    """Words as IFEval counts them (nltk's RegexpTokenizer(r"\\w+")): runs of word characters."""
    return len(re.findall(r"\w+", text))


def _letters(text: str) -> list[str]:
    return [c for c in text if c.isalpha() and c.lower() != c.upper()]  # cased letters only


def _contains(text: str, phrase: str) -> bool:
    return phrase.strip().lower() in text.lower()


# ------------------------------------------------------------------------------------------- checkers
def _lowercase(text: str) -> bool:
    return text.islower()


def _lowercase_soft(text: str) -> float:
    letters = _letters(text)
    return sum(c.islower() for c in letters) / len(letters) if letters else 0.0


def _capital(text: str) -> bool:
    return text.isupper()


def _capital_soft(text: str) -> float:
    letters = _letters(text)
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def _keywords(text: str, keywords: Sequence[str]) -> bool:
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


def _keywords_soft(text: str, keywords: Sequence[str]) -> float:
    return sum(bool(re.search(re.escape(k), text, flags=re.IGNORECASE)) for k in keywords) / len(keywords)


def _forbidden_hit(text: str, word: str) -> bool:
    return bool(re.search(r"\b" + re.escape(word) + r"\b", text, flags=re.IGNORECASE))


def _forbidden(text: str, forbidden_words: Sequence[str]) -> bool:
    return not any(_forbidden_hit(text, w) for w in forbidden_words)


def _forbidden_soft(text: str, forbidden_words: Sequence[str]) -> float:
    return sum(not _forbidden_hit(text, w) for w in forbidden_words) / len(forbidden_words)


def _end(text: str, end_phrase: str) -> bool:
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _start(text: str, start_phrase: str) -> bool:
    value = text.strip().lstrip('"').lower()
    return re.match(re.escape(start_phrase.strip().lower()) + r"\b", value) is not None


def _end_anywhere(text: str, end_phrase: str) -> float:
    return float(_contains(text, end_phrase))


def _start_anywhere(text: str, start_phrase: str) -> float:
    return float(re.search(r"\b" + re.escape(start_phrase.strip().lower()) + r"\b", text.lower()) is not None)


def _words(text: str, relation: str, num_words: int) -> bool:
    n = count_words(text)
    return n < num_words if relation == "less than" else n >= num_words


def _words_soft(text: str, relation: str, num_words: int) -> float:
    n = count_words(text)
    if _words(text, relation, num_words):
        return 1.0
    if relation == "less than":  # n >= num_words: shrinks with every extra word
        return (num_words - 1) / max(n, 1)
    return n / num_words


def _no_comma(text: str) -> bool:
    return "," not in text


def _no_comma_soft(text: str) -> float:
    return 1.0 / (1.0 + text.count(","))


def _quotation(text: str) -> bool:
    value = text.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def _quotation_soft(text: str) -> float:
    value = text.strip()
    return 0.5 * value.startswith('"') + 0.5 * (len(value) > 1 and value.endswith('"'))


@dataclass(frozen=True)
class InstructionType:
    id: str
    check: Callable[..., bool]  # strict: IFEval's verifier
    soft: Callable[..., float]  # partial: in [0, 1], 1 when check passes
    args: tuple[str, ...]  # the keyword arguments both take
    describe: Callable[..., str]  # the instruction as the prompt states it


def _join(words: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


INSTRUCTION_TYPES: dict[str, InstructionType] = {t.id: t for t in [
    InstructionType("change_case:english_lowercase", _lowercase, _lowercase_soft, (),
                    lambda: "Your entire response should be in English, and in all lowercase letters. "
                            "No capital letters are allowed."),
    InstructionType("change_case:english_capital", _capital, _capital_soft, (),
                    lambda: "Your entire response should be in English, and in all capital letters."),
    InstructionType("keywords:existence", _keywords, _keywords_soft, ("keywords",),
                    lambda keywords: f"Include the keyword{'s' * (len(keywords) > 1)} {_join(keywords)} "
                                     "in the response."),
    InstructionType("keywords:forbidden_words", _forbidden, _forbidden_soft, ("forbidden_words",),
                    lambda forbidden_words: f"Do not include the word{'s' * (len(forbidden_words) > 1)} "
                                            f"{_join(forbidden_words).replace(' and ', ' or ')} in the response."),
    InstructionType("startend:end_checker", _end, _end_anywhere, ("end_phrase",),
                    lambda end_phrase: f'Finish your response with this exact phrase "{end_phrase}". '
                                       "No other words should follow this phrase."),
    InstructionType("startend:start_checker", _start, _start_anywhere, ("start_phrase",),
                    lambda start_phrase: f'Start your response with the word "{start_phrase}".'),
    InstructionType("length_constraints:number_words", _words, _words_soft, ("relation", "num_words"),
                    lambda relation, num_words: f"Answer with {relation} {num_words} words."),
    InstructionType("punctuation:no_comma", _no_comma, _no_comma_soft, (),
                    lambda: "In your entire response, refrain from the use of any commas."),
    InstructionType("startend:quotation", _quotation, _quotation_soft, (),
                    lambda: "Wrap your entire response with double quotation marks."),
]}
# The soft score of the start and end phrases is "found anywhere"; the keyword-style arguments above
# are read by name from the instruction dict.


def _validate(instruction: Mapping) -> tuple[InstructionType, dict]:
    if not isinstance(instruction, Mapping) or "id" not in instruction:
        raise ValueError(f"an instruction must be a dict with an 'id', got {instruction!r}")
    kind = INSTRUCTION_TYPES.get(instruction["id"])
    if kind is None:
        raise ValueError(f"unknown instruction id {instruction['id']!r} (known: {', '.join(INSTRUCTION_TYPES)})")
    kwargs = {k: v for k, v in instruction.items() if k != "id"}
    if set(kwargs) != set(kind.args):
        raise ValueError(f"instruction {kind.id!r} takes {list(kind.args) or 'no arguments'}, got {sorted(kwargs)}")
    for key in ("keywords", "forbidden_words"):
        if key in kwargs and (isinstance(kwargs[key], str) or not kwargs[key]
                              or not all(isinstance(w, str) and w.strip() for w in kwargs[key])):
            raise ValueError(f"instruction {kind.id!r}: {key} must be a non-empty list of words")
    if "relation" in kwargs:
        check_choice(kwargs["relation"], "relation", RELATIONS)
        if isinstance(kwargs["num_words"], bool) or not isinstance(kwargs["num_words"], int) or kwargs["num_words"] < 1:
            raise ValueError(f"instruction {kind.id!r}: num_words must be an integer >= 1")
    for key in ("end_phrase", "start_phrase"):
        if key in kwargs and not (isinstance(kwargs[key], str) and kwargs[key].strip()):
            raise ValueError(f"instruction {kind.id!r}: {key} must be a non-empty string")
    return kind, kwargs


def check_instruction(instruction: Mapping, response: str) -> bool:
    """The strict (IFEval) verdict of one instruction on a response."""
    kind, kwargs = _validate(instruction)
    return bool(kind.check(response, **kwargs))


def soft_instruction(instruction: Mapping, response: str) -> float:
    """The soft partial score in [0, 1] of one instruction on a response (1 whenever the strict check passes)."""
    kind, kwargs = _validate(instruction)
    if kind.check(response, **kwargs):
        return 1.0
    return float(min(1.0, max(0.0, kind.soft(response, **kwargs))))


def describe_instruction(instruction: Mapping) -> str:
    """The instruction as a prompt states it."""
    kind, kwargs = _validate(instruction)
    return kind.describe(**kwargs)


def evaluate(instructions: Sequence[Mapping], response: str) -> dict:
    """Every score of one response: strict (all pass), partial (share passing), soft (mean soft score),
    and the per-instruction strict verdicts."""
    if not instructions:
        raise ValueError("a prompt needs at least one instruction")
    verdicts = [check_instruction(i, response) for i in instructions]
    soft = [soft_instruction(i, response) for i in instructions]
    return {"strict": float(all(verdicts)), "partial": sum(verdicts) / len(verdicts),
            "soft": sum(soft) / len(soft), "verdicts": verdicts}


class InstructionReward(SequenceReward):
    """r(x, y) from the instructions attached to prompt x (a mapping prompt text -> instruction list).

    mode: "strict" (1 when all pass, else 0), "partial" (share passing strictly), "soft" (mean soft score);
    see the module docstring. A prompt that is not in the mapping is an error."""

    def __init__(self, instructions: Mapping[str, Sequence[Mapping]], mode: str = "strict"):
        check_choice(mode, "mode", MODES)
        self.mode = mode
        self.name = f"instructions:{mode}"
        self.instructions = {}
        for prompt, items in instructions.items():
            if not items:
                raise ValueError(f"prompt {prompt[:60]!r} has no instructions")
            for item in items:
                _validate(item)
            self.instructions[prompt] = [dict(i) for i in items]

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        out = []
        for prompt, completion in zip(prompts, completions):
            items = self.instructions.get(prompt)
            if items is None:
                raise KeyError(f"no instructions for prompt {prompt[:80]!r}")
            out.append(evaluate(items, completion)[self.mode])
        return torch.tensor(out, dtype=torch.float64)
