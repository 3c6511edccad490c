"""Process rewards: scores of a partial response at its step boundaries.

A process reward model (PRM) reads a response cut into steps and scores each step given the steps
before it: s_j = PRM(x, step_1..step_j), usually the probability that the reasoning so far is right.
Step-level search (beam search, DVTS, particle filtering) scores every path after each new step; the
path's score is then an aggregate of its step scores (`aggregate_scores`: the last one, the minimum, or
the product).

Three kinds:

- `TransformersPRM`: a PRM folder, read the way the common open PRMs are. The input is the prompt, a
  separator, then each step followed by a step marker; the score of step j is read at the last token of
  its marker, either from a token-classification head (probability of the positive label, as
  Qwen2.5-Math-PRM's), from a causal LM's next-token logits restricted to a "good" and a "bad" label
  token (p(good) / (p(good) + p(bad)), as Math-Shepherd's "+" / "-"), or from a sequence-classification
  head applied at every marker (its value, or the positive label's probability).
- `PrefixReward`: any sequence reward applied to the response so far (its text, or its token ids when
  the reward reads ids).
- `ValuePRM`: a value model from `align-decode train-value` (V(x, y_<=t), CD-FUDGE) on the prefix.

Step scores of a causal model depend only on the tokens up to their marker, so the score of step j is
the same whether the PRM sees the response up to step j or the whole of it.

    >>> prm = TransformersPRM.from_folder("/models/math-prm", step_marker="\\n\\n")
    >>> prm.score(["What is 2 + 3?"], [["2 + 3 = 5.", "The answer is 5."]])   # the last step's score
    >>> prm.step_scores(["What is 2 + 3?"], [["2 + 3 = 5.", "The answer is 5."]])   # every step's
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..validation import AT_LEAST_ONE, check_choice

AGGREGATES = ("last", "min", "product")
READS = ("token_classification", "label_tokens", "sequence_head")


@dataclass(frozen=True)
class PartialResponse:
    """A response cut into its steps so far, as text and (when known) as token ids. Without a tokenizer
    the texts are unknown (prompt None, steps None each): only scorers that read ids can score it."""

    prompt: str | None
    steps: tuple[str | None, ...]
    prompt_ids: tuple[int, ...] | None = None
    step_ids: tuple[tuple[int, ...], ...] | None = None
    text: str | None = None  # the response so far decoded as one piece; "".join(steps) when None

    @property
    def response(self) -> str:
        self.check_text()
        return "".join(self.steps) if self.text is None else self.text

    def check_text(self, name: str = "a text process reward") -> None:
        if self.prompt is None:
            raise ValueError(f"{name} reads text: the policy's tokenizer is needed to decode the partial responses")

    def response_ids(self) -> list[int]:
        if self.step_ids is None:
            raise ValueError("this partial response carries no token ids")
        return [t for step in self.step_ids for t in step]


def partials(prompts: Sequence[str], steps: Sequence[Sequence[str]]) -> list[PartialResponse]:
    if len(prompts) != len(steps):
        raise ValueError(f"{len(prompts)} prompts but {len(steps)} step lists")
    return [PartialResponse(p, tuple(s)) for p, s in zip(prompts, steps)]


def _checked(values, count: int, name: str) -> torch.Tensor:
    out = torch.as_tensor(values, dtype=torch.float32).detach().cpu().flatten()
    if out.shape != (count,):
        raise ValueError(f"process reward {name!r} returned {tuple(out.shape)} scores for {count} responses")
    if bool(torch.isnan(out).any()):
        raise ValueError(f"process reward {name!r} returned NaN for response(s) "
                         f"{torch.isnan(out).nonzero().flatten().tolist()}")
    return out


class ProcessReward(ABC):
    """Scores the last step of each partial response given the steps before it. Subclasses implement
    `_score(responses) -> [B]`; `step_scores` (every step's score) defaults to scoring every prefix.

    Example:
        >>> class Length(ProcessReward):
        ...     def _score(self, responses):
        ...         return [float(len(r.steps[-1])) for r in responses]
        >>> Length().score(["q"], [["ab", "abc"]])
        tensor([3.])
    """

    name: str = "process_reward"
    probabilities: bool = False  # its scores are probabilities in [0, 1] (a PRM's): particle filtering's logit applies

    @abstractmethod
    def _score(self, responses: Sequence[PartialResponse]) -> torch.Tensor | Sequence[float]:
        """The score of each response's last step, B floats."""

    def score_partial(self, responses: Sequence[PartialResponse]) -> torch.Tensor:
        """Scores [B] (float32, CPU) of each response's last step; every response needs a step."""
        if any(len(r.steps) == 0 for r in responses):
            raise ValueError(f"process reward {self.name!r}: a response has no step to score")
        if not responses:
            return torch.zeros(0)
        return _checked(self._score(list(responses)), len(responses), self.name)

    def score(self, prompts: Sequence[str], steps: Sequence[Sequence[str]]) -> torch.Tensor:
        """Scores [B] of the last step of each prompt's steps (text)."""
        return self.score_partial(partials(prompts, steps))

    def step_scores_partial(self, responses: Sequence[PartialResponse]) -> list[list[float]]:
        prefixes, owners = [], []
        for i, r in enumerate(responses):
            for j in range(1, len(r.steps) + 1):
                ids = None if r.step_ids is None else r.step_ids[:j]
                prefixes.append(PartialResponse(r.prompt, r.steps[:j], r.prompt_ids, ids))
                owners.append(i)
        flat = self.score_partial(prefixes).tolist() if prefixes else []
        out: list[list[float]] = [[] for _ in responses]
        for i, s in zip(owners, flat):
            out[i].append(s)
        return out

    def step_scores(self, prompts: Sequence[str], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        """Every step's score, per response."""
        return self.step_scores_partial(partials(prompts, steps))

    def __call__(self, prompts, steps):
        return self.score(prompts, steps)


def aggregate_scores(scores: Sequence[float], how: str) -> float:
    """One score for a path from its step scores: the last, the smallest, or their product (products
    need scores >= 0, as PRM probabilities are)."""
    check_choice(how, "aggregate", AGGREGATES)
    if not scores:
        raise ValueError("a path with no scored step has no score")
    if how == "last":
        return float(scores[-1])
    if how == "min":
        return float(min(scores))
    if any(s < 0 for s in scores):
        raise ValueError(f"aggregate='product' multiplies probabilities; got a negative step score {min(scores)}")
    return float(math.prod(scores))


# ------------------------------------------------------------------------------- sequence rewards
class PrefixReward(ProcessReward):
    """A sequence reward applied to the response so far: s_j = r(x, step_1 + ... + step_j).

    Rewards that read token ids (`score_ids`, e.g. value models) get the prompt's and the prefix's ids;
    the others get text. Example: `PrefixReward(SentimentReward())`."""

    def __init__(self, reward, name: str | None = None):
        if not (callable(getattr(reward, "score_ids", None)) or callable(getattr(reward, "score", None))):
            raise TypeError(f"PrefixReward needs a sequence reward, got {type(reward).__name__}")
        self.reward = reward
        self.name = name or f"prefix:{getattr(reward, 'name', type(reward).__name__)}"

    def _score(self, responses):
        if callable(getattr(self.reward, "score_ids", None)) and all(r.step_ids is not None for r in responses):
            if any(r.prompt_ids is None for r in responses):
                raise ValueError(f"{self.name}: the reward reads token ids and a response has no prompt ids")
            return self.reward.score_ids([list(r.prompt_ids) for r in responses],
                                         [r.response_ids() for r in responses])
        for r in responses:
            r.check_text(self.name)
        return self.reward.score([r.prompt for r in responses], [r.response for r in responses])


class ValuePRM(PrefixReward):
    """A value model trained by `align-decode train-value` (QValueModel or ScalarValueModel) as a process
    reward: s_j = V(x, y up to the end of step j). It reads token ids."""

    def __init__(self, value_model, name: str | None = None):
        if not callable(getattr(value_model, "score_ids", None)):
            raise TypeError(f"ValuePRM needs a value model with score_ids, got {type(value_model).__name__}")
        super().__init__(value_model, name or f"value:{getattr(value_model, 'name', type(value_model).__name__)}")

    def _score(self, responses):
        if any(r.step_ids is None or r.prompt_ids is None for r in responses):
            raise ValueError(f"{self.name} reads token ids: score partial responses that carry them")
        return super()._score(responses)


# ----------------------------------------------------------------------------- transformers PRMs
class TransformersPRM(ProcessReward):
    """A process reward model folder read at step markers (see the module docstring).

    Input: tokens(prompt + prompt_separator), then for each step tokens(step) + tokens(step_marker);
    the pieces are tokenized apart, so every marker's position is exact. The score of step j is read at
    the last token of its marker.

    Args:
        model: the PRM (token-classification, causal LM or sequence-classification model).
        tokenizer: its tokenizer (it may differ from the policy's: the PRM reads text).
        read: "token_classification" (softmax over the labels, the positive label's probability),
            "label_tokens" (a causal LM: p(good) / (p(good) + p(bad)) of the next-token logits), or
            "sequence_head" (the model's classification head applied at each marker: the value itself
            for one label, else the positive label's probability). Default: from the model's class.
        step_marker: text appended after each step (Math-Shepherd's " ки", Qwen2.5-Math-PRM's
            "<extra_0>", a newline, ...).
        prompt_separator: text between the prompt and the first step.
        positive_label: index of the "correct" label (token_classification, sequence_head).
        label_tokens: (good, bad) token texts, each a single token of the PRM's tokenizer (label_tokens).
        max_length: the most tokens per input; longer inputs lose their oldest prompt tokens.
        batch_size: responses per forward pass.
    """

    def __init__(self, model, tokenizer, *, read: str | None = None, step_marker: str = "\n\n",
                 prompt_separator: str = "\n", positive_label: int = 1, label_tokens: tuple[str, str] = ("+", "-"),
                 max_length: int | None = None, batch_size: int = 16, name: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.read = check_choice(read or _default_read(model), "read", READS)
        if not step_marker:
            raise ValueError("step_marker must be a non-empty text: scores are read at its last token")
        self.marker_ids = tokenizer.encode(step_marker, add_special_tokens=False)
        if not self.marker_ids:
            raise ValueError(f"step_marker {step_marker!r} encodes to no token")
        self.step_marker, self.prompt_separator = step_marker, prompt_separator
        self.batch_size = AT_LEAST_ONE.check(batch_size, "batch_size")
        self.max_length = max_length
        labels = int(getattr(model.config, "num_labels", 2) or 2)
        if self.read != "label_tokens" and not (labels == 1 and self.read == "sequence_head"):
            if not 0 <= positive_label < labels:
                raise ValueError(f"positive_label {positive_label} is outside the model's {labels} labels")
        self.positive_label = positive_label
        if self.read == "label_tokens":
            ids = [tokenizer.encode(t, add_special_tokens=False) for t in label_tokens]
            if any(len(i) != 1 for i in ids):
                raise ValueError(f"label_tokens {label_tokens} must each be one token of the PRM's tokenizer, got {ids}")
            self.label_ids = [ids[0][0], ids[1][0]]
        self.name = name or f"prm:{getattr(model.config, '_name_or_path', '') or type(model).__name__}"
        self.probabilities = not (self.read == "sequence_head" and labels == 1)

    @classmethod
    def from_folder(cls, path, *, read: str | None = None, device=None, dtype=None, **kwargs) -> "TransformersPRM":
        """Load a local PRM folder (never the Hub); `read` picks the model class (default: from the
        folder's config: a *ForTokenClassification, *ForSequenceClassification or causal LM)."""
        from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                                  AutoModelForTokenClassification, AutoTokenizer)

        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"a PRM loads only from a local folder; {str(path)!r} is not a directory")
        if read is None:
            archs = " ".join(getattr(AutoConfig.from_pretrained(path), "architectures", None) or [])
            read = ("token_classification" if "TokenClassification" in archs else
                    "sequence_head" if "SequenceClassification" in archs else "label_tokens")
        loader = {"token_classification": AutoModelForTokenClassification,
                  "sequence_head": AutoModelForSequenceClassification,
                  "label_tokens": AutoModelForCausalLM}[check_choice(read, "read", READS)]
        model = loader.from_pretrained(path, **({} if dtype is None else {"dtype": dtype})).eval()
        if device is not None:
            model = model.to(device)
        return cls(model, AutoTokenizer.from_pretrained(path), read=read, name=kwargs.pop("name", str(path)), **kwargs)

    def _encode(self, r: PartialResponse) -> tuple[list[int], list[int]]:
        """(input ids, the position of each step's marker)."""
        r.check_text(self.name)
        tok = self.tokenizer
        ids = tok.encode(r.prompt + self.prompt_separator, add_special_tokens=True)
        positions = []
        for step in r.steps:
            ids = ids + tok.encode(step, add_special_tokens=False) + self.marker_ids
            positions.append(len(ids) - 1)
        if self.max_length is not None and len(ids) > self.max_length:
            cut = len(ids) - self.max_length
            if cut > positions[0]:
                raise ValueError(f"{self.name}: a response's steps alone exceed max_length={self.max_length} tokens")
            ids, positions = ids[cut:], [p - cut for p in positions]
        return ids, positions

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = getattr(self.model, "score", None) or getattr(self.model, "classifier", None)
        if head is None:
            raise TypeError(f"{type(self.model).__name__} has no classification head (score / classifier) to "
                            "read at the step markers")
        return head(hidden)

    @torch.no_grad()
    def _all_step_scores(self, responses: Sequence[PartialResponse]) -> list[list[float]]:
        out: list[list[float]] = []
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        for start in range(0, len(responses), self.batch_size):
            encoded = [self._encode(r) for r in responses[start:start + self.batch_size]]
            width = max(len(ids) for ids, _ in encoded)
            # Right padding: a causal model's scores at the markers never see the padding.
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded], device=device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in encoded], device=device)
            if self.read == "sequence_head":
                hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = self._head(hidden)
            else:
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            for b, (_, positions) in enumerate(encoded):
                at = logits[b, positions].float()
                if self.read == "label_tokens":
                    scores = torch.softmax(at[:, self.label_ids], -1)[:, 0]
                elif at.shape[-1] == 1:
                    scores = at[:, 0]
                else:
                    scores = torch.softmax(at, -1)[:, self.positive_label]
                out.append(scores.cpu().tolist())
        return out

    def _score(self, responses):
        return [s[-1] for s in self._all_step_scores(responses)]

    def step_scores_partial(self, responses):
        if any(len(r.steps) == 0 for r in responses):
            raise ValueError(f"process reward {self.name!r}: a response has no step to score")
        return self._all_step_scores(list(responses))


def _default_read(model) -> str:
    name = type(model).__name__
    if "TokenClassification" in name:
        return "token_classification"
    if "SequenceClassification" in name:
        return "sequence_head"
    return "label_tokens"
