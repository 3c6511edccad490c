"""Built-in offline rewards: sentiment, non-toxicity, length, keywords, regex."""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch

from align_decode.rewards import KeywordReward, LengthReward, NonToxicityReward, RegexReward, SentimentReward
from tiny import tiny_tokenizer


def vader_compound(valence_sum: float) -> float:
    """VADER's normalisation of a summed valence s: s / sqrt(s^2 + 15)."""
    return valence_sum / math.sqrt(valence_sum**2 + 15)


# ---------------------------------------------------------------- sentiment


def test_sentiment_hand_values():
    r = SentimentReward()
    # lexicon valences: good 1.9, bad -2.5; "not" scales by -0.74; each "!" adds 0.292 (up to 4)
    out = r.score(["Review:"] * 5, ["good", "bad", "not good", "good!", ""])
    expected = [vader_compound(1.9), vader_compound(-2.5), vader_compound(1.9 * -0.74),
                vader_compound(1.9 + 0.292), 0.0]
    assert out.tolist() == pytest.approx(expected, abs=1e-4)  # VADER rounds to 4 decimals


def test_sentiment_ignores_prompt_and_other_measures():
    r = SentimentReward()
    assert r.score(["I hate everything"], ["good"]).item() == pytest.approx(vader_compound(1.9), abs=1e-4)
    pos = SentimentReward(measure="pos")
    assert pos.score(["", ""], ["good", "bad"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="measure must be one of"):
        SentimentReward(measure="joy")


def test_sentiment_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match="pip install vaderSentiment"):
        SentimentReward()


# ---------------------------------------------------------------- toxicity


def test_non_toxicity_is_one_minus_p_offensive():
    import profanity_check

    texts = ["have a nice day", "you are a damn idiot", ""]
    out = NonToxicityReward().score(["x"] * 3, texts)
    expected = 1.0 - torch.as_tensor(profanity_check.predict_prob(texts), dtype=torch.float64)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out[0] > 0.9 and out[1] < 0.1


def test_non_toxicity_missing_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "profanity_check", None)
    with pytest.raises(ImportError, match="pip install alt-profanity-check"):
        NonToxicityReward()


# ---------------------------------------------------------------- length


def test_length_range_words_and_chars():
    r = LengthReward(min_length=2, max_length=4)
    out = r.score([""] * 4, ["one", "one two", "a b c d", "a b c d e f g"])
    assert out.tolist() == [-1.0, 0.0, 0.0, -3.0]
    assert str(out[1].item()) == "0.0"  # not -0.0
    chars = LengthReward(max_length=5, unit="chars", scale=2.0)
    assert chars.score(["", ""], ["abcde", "abcdefghi"]).tolist() == [0.0, -2.0]  # (9 - 5) / 2
    open_top = LengthReward(min_length=3)
    assert open_top.score(["", ""], ["a", "a b c d e f g h i j"]).tolist() == [-2.0, 0.0]


def test_length_target_power_and_tokens():
    r = LengthReward(target=4, power=2)
    assert r.score([""] * 3, ["a b", "a b c d", "a b c d e f g"]).tolist() == [-4.0, 0.0, -9.0]
    tok = tiny_tokenizer()
    tokens = LengthReward(target=1, unit="tokens", tokenizer=tok)
    # the word-level tokenizer gives one token per word; special tokens are not added
    assert tokens.score(["", ""], ["w1 w2 w3", "w1"]).tolist() == [-2.0, 0.0]
    assert tokens.lengths(["w1 w2 w3"]) == [3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs target, or min_length"),
        ({"target": 3, "max_length": 5}, "either target or min_length/max_length"),
        ({"min_length": 5, "max_length": 2}, r"min_length \(5\) must be <= max_length \(2\)"),
        ({"target": -1}, "target must be an integer >= 0"),
        ({"max_length": 2.5}, "max_length must be an integer >= 0"),
        ({"target": 3, "unit": "lines"}, "unit must be one of"),
        ({"target": 3, "unit": "tokens"}, "needs a tokenizer"),
        ({"target": 3, "scale": 0}, "scale must be a finite number > 0"),
        ({"target": 3, "power": float("inf")}, "power must be a finite number > 0"),
        ({"target": True}, "target must be an integer >= 0 or None, got True"),
        ({"target": "3"}, "target must be an integer >= 0 or None, got '3'"),
        ({"min_length": True}, "min_length must be an integer >= 0 or None, got True"),
        ({"target": 3, "scale": True}, "scale must be a finite number > 0, got True"),
        ({"target": 3, "power": "2"}, "power must be a finite number > 0, got '2'"),
    ],
)
def test_length_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LengthReward(**kwargs)


# ---------------------------------------------------------------- keywords


def test_keywords_fraction_satisfied():
    r = KeywordReward(include=["Paris", "France"], exclude=["London"])
    out = r.score([""] * 4, ["Paris is in France.", "Paris, not London.", "paris FRANCE", "Rome"])
    assert out.tolist() == pytest.approx([1.0, 1 / 3, 1.0, 1 / 3])


def test_keywords_case_and_whole_words():
    exact_case = KeywordReward(include=["Paris"], case_sensitive=True)
    assert exact_case.score(["", ""], ["paris", "Paris"]).tolist() == [0.0, 1.0]
    sub = KeywordReward(exclude=["cat"])
    word = KeywordReward(exclude=["cat"], whole_word=True)
    assert sub.score([""], ["concatenate"]).tolist() == [0.0]
    assert word.score(["", ""], ["concatenate", "a cat."]).tolist() == [1.0, 0.0]
    special = KeywordReward(include=["c++"], whole_word=True)  # regex metacharacters are literal
    assert special.score(["", ""], ["I like c++ a lot", "I like c"]).tolist() == [1.0, 0.0]


def test_keywords_validation():
    with pytest.raises(ValueError, match="at least one keyword"):
        KeywordReward()
    with pytest.raises(TypeError, match="not a single string"):
        KeywordReward(include="Paris")
    with pytest.raises(ValueError, match="non-empty strings"):
        KeywordReward(include=[""])
    with pytest.raises(ValueError, match=r"\['paris'\] are both included and excluded"):
        KeywordReward(include=["Paris"], exclude=["paris"])


# ---------------------------------------------------------------- regex


def test_regex_search_fullmatch_strip():
    date = r"\d{4}-\d{2}-\d{2}"
    search = RegexReward(date)
    full = RegexReward(date, mode="fullmatch")
    raw = RegexReward(date, mode="fullmatch", strip=False)
    texts = ["2024-05-01\n", "It is 2024-05-01", "soon"]
    assert search.score([""] * 3, texts).tolist() == [1.0, 1.0, 0.0]
    assert full.score([""] * 3, texts).tolist() == [1.0, 0.0, 0.0]
    assert raw.score([""] * 3, texts).tolist() == [0.0, 0.0, 0.0]
    icase = RegexReward(r"^yes\b", flags=re.IGNORECASE)
    assert icase.score(["", ""], ["YES it is", "no, yes"]).tolist() == [1.0, 0.0]
    compiled = RegexReward(re.compile(r"\?$"))
    assert compiled.score(["", ""], ["why?", "because"]).tolist() == [1.0, 0.0]


def test_regex_validation():
    with pytest.raises(ValueError, match=r"invalid regular expression '\(unclosed'"):
        RegexReward("(unclosed")
    with pytest.raises(ValueError, match="mode must be one of"):
        RegexReward("a", mode="match")
    with pytest.raises(ValueError, match="flags cannot be given"):
        RegexReward(re.compile("a"), flags=re.I)
    with pytest.raises(TypeError, match="pattern must be a str or re.Pattern"):
        RegexReward(42)
