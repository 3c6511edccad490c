"""Built-in rewards from small offline text classifiers: positive sentiment (VADER) and non-toxicity
(alt-profanity-check). Both score the completion alone and need no model download.

Their packages are optional (`pip install align-decode[rewards]`) and imported when a reward is built,
so the error names the missing pip package instead of failing at `import align_decode`.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch

from .base import SequenceReward


def _require(module: str, package: str, reward: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{reward} needs the {package!r} package: pip install {package}  "
            f"(or pip install 'align-decode[rewards]')"
        ) from err


class SentimentReward(SequenceReward):
    """Positive sentiment of the completion, from the VADER lexicon (vaderSentiment).

        r(x, y) = compound(y)  in [-1, 1]

    VADER sums the valences of the words in y (with rules for negation, intensifiers, capitals and
    "!") into s and normalises it as compound = s / sqrt(s^2 + 15). The prompt is ignored: the
    reward is the tone of the response, whatever was asked. The other VADER measures ("pos", "neg",
    "neu": proportions of the text in [0, 1]) can be chosen with `measure`.

    Args:
        measure: "compound" (default), "pos", "neg" or "neu".

    Example:
        >>> SentimentReward().score(["Review:", "Review:"], ["good", "bad"])
        tensor([ 0.4404, -0.5423])
    """

    name = "sentiment"
    MEASURES = ("compound", "pos", "neg", "neu")

    def __init__(self, measure: str = "compound"):
        if measure not in self.MEASURES:
            raise ValueError(f"measure must be one of {self.MEASURES}, got {measure!r}")
        vader = _require("vaderSentiment.vaderSentiment", "vaderSentiment", "SentimentReward")
        self.measure = measure
        self._analyzer = vader.SentimentIntensityAnalyzer()

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return torch.tensor(
            [self._analyzer.polarity_scores(c)[self.measure] for c in completions], dtype=torch.float32
        )


class NonToxicityReward(SequenceReward):
    """How clean the completion is, from alt-profanity-check's linear classifier.

        r(x, y) = 1 - P(offensive | y)  in [0, 1]

    We use 1 - P rather than -P so that the reward is a probability-like "good" score: 1 is clean,
    0 is certainly offensive, and a threshold or a reference level (see `LogSigmoidTransform`) reads
    naturally. The two differ by a constant 1, so best-of-N picks and MCMC acceptance ratios are the same
    with either. The prompt is ignored.

    Example:
        >>> r = NonToxicityReward().score(["", ""], ["have a nice day", "you are an idiot"])
        >>> bool(r[0] > 0.9 > 0.1 > r[1])
        True
    """

    name = "non_toxicity"

    def __init__(self):
        self._module = _require("profanity_check", "alt-profanity-check", "NonToxicityReward")

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        p_offensive = torch.as_tensor(self._module.predict_prob(list(completions)), dtype=torch.float64)
        return (1.0 - p_offensive).float()
