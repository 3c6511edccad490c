"""Final-answer extraction (GSM8K numbers, MATH boxes, option letters) and the exact-match reward."""

from __future__ import annotations

import pytest

from align_decode.rewards import ExactMatchReward, answers_match, extract_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 * $1,250 = $3,750.\n#### 3,750", "3750"),
        ("#### 18\nThat is 20 - 2 = 18 but wait 19", "18"),  # the marker wins over later numbers
        ("#### 5\nsome words #### -12 dollars", "-12"),  # the last marker
        ("####", None),
        ("The temperature fell to -7 degrees.", "-7"),
        ("It fell to \u22127 degrees.", "-7"),  # Unicode minus
        ("Pages 5-3", "3"),  # a hyphen after a digit is not a sign
        ("x = 3.50.", "3.5"),  # trailing zero and sentence period
        ("The answer is 72.0", "72"),
        ("a .5 b", "0.5"),
        ("total 1,000,000 then 2", "2"),
        ("We need 1,000,000", "1000000"),
        ("lists 1,2,3", "3"),  # commas not in groups of three separate numbers
        ("-0", "0"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_answer(text, "number") == expected


def test_extract_number_raw():
    assert extract_answer("It is $1,234.50 in total", normalize=False) == "1,234.50"
    assert extract_answer("#### -3.0", normalize=False) == "-3.0"


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"first \boxed{3} then \boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),  # nested, last one
        (r"\boxed{ x + 1 }", "x+1"),
        (r"\boxed{\dfrac{1}{ 2}}", r"\frac{1}{2}"),
        (r"the set \boxed{\{1, 2\}}", r"\{1,2\}"),  # escaped braces do not close the box
        (r"\boxed{7} and a cut-off \boxed{\frac{1", "7"),  # an unclosed box is skipped
        (r"$\boxed 5$", "5"),
        (r"\fbox{42}", "42"),
        ("no box at all: 5", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_answer(text, "boxed") == expected


def test_extract_boxed_raw_keeps_spacing():
    assert extract_answer(r"\boxed{ x + 1 }", "boxed", normalize=False) == " x + 1 "


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Comparing the choices, the answer is (C).", "C"),
        ("A cat sat on a mat. Answer: B", "B"),  # the article 'A' is not an option
        ("(A) is wrong and (B) is wrong, so the answer is D", "D"),
        ("The answer is (B). Not (A)", "A"),  # the last stated option
        ("The correct choice is [J]", "J"),
        ("**E**", "E"),
        ("C", "C"),
        ("  (G).  ", "G"),
        (r"\boxed{\text{H}}", "H"),
        ("the answer is Alpha", None),
        ("I pick (K)", None),  # K is not among A-J
        ("A good answer needs care", None),
    ],
)
def test_extract_option(text, expected):
    assert extract_answer(text, "option") == expected


def test_extract_option_custom_letters_and_bad_kind():
    assert extract_answer("answer: (E)", "option", options="ABCD") is None
    assert extract_answer("answer: (D)", "option", options="ABCD") == "D"
    with pytest.raises(ValueError, match="options must be a non-empty string of capital letters"):
        extract_answer("x", "option", options="ab")
    with pytest.raises(ValueError, match=r"kind must be one of number, option, boxed, got 'letter'"):
        extract_answer("x", "letter")
    with pytest.raises(TypeError, match="text must be a str"):
        extract_answer(3, "number")


def test_answers_match():
    assert answers_match("0.50", ".5")
    assert answers_match("1,000", "1000")
    assert not answers_match("3", "4")
    assert answers_match("3.1", "3", tolerance=0.2) and not answers_match("3.3", "3", tolerance=0.2)
    assert answers_match(r"\frac{1}{2}", r"\frac{1}{2}") and not answers_match(r"\frac{1}{2}", "0.5")
    assert not answers_match(None, "3") and not answers_match("3", None)


def test_exact_match_numbers():
    gold = {"q1": 5, "q2": "She earns 2 * 9 = 18.\n#### 18", "q3": 0.5, "q4": 1e-7, "q5": "1,000"}
    r = ExactMatchReward(gold, kind="number")
    prompts = ["q1", "q1", "q2", "q2", "q3", "q4", "q5", "q1"]
    completions = ["2 + 3 = 5\n#### 5", "The answer is 6", "So 18 dollars.", "#### 18.00", "It is .50",
                   "0.0000001", "#### 1000", "I cannot tell"]
    assert r.score(prompts, completions).tolist() == [1, 0, 1, 1, 1, 1, 1, 0]
    assert r.reference_answer("q4") == "0.0000001"


def test_exact_match_boxed_option_callable_and_tolerance():
    boxed = ExactMatchReward({"m": r"\frac{1}{2}", "n": r"... so \boxed{7}"}, kind="boxed")
    out = boxed.score(["m", "m", "n", "n"], [r"\boxed{\dfrac{1}{2}}", r"\boxed{\frac{1}{3}}", r"\boxed{7.0}", "7"])
    assert out.tolist() == [1, 0, 1, 0]  # numeric box contents compare numerically; no box -> 0
    opts = ExactMatchReward(lambda prompt: prompt[-1], kind="option")
    assert opts.score(["Q...B", "Q...C"], ["The answer is (B)", "The answer is (B)"]).tolist() == [1, 0]
    approx = ExactMatchReward({"pi": 3.14159}, tolerance=0.01)
    assert approx.score(["pi", "pi"], ["about 3.14", "about 3.2"]).tolist() == [1, 0]


def test_exact_match_errors():
    r = ExactMatchReward({"known": 1})
    with pytest.raises(KeyError, match="no reference answer for prompt 'unknown'"):
        r.score(["known", "unknown"], ["1", "1"])
    with pytest.raises(ValueError, match="no number answer could be read from the reference 'none' for prompt 'q'"):
        ExactMatchReward({"q": "none"})
    with pytest.raises(ValueError, match="kind must be one of"):
        ExactMatchReward({}, kind="words")
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        ExactMatchReward({}, tolerance=-1)
    with pytest.raises(TypeError, match="answers must be a dict"):
        ExactMatchReward(["q"])
    with pytest.raises(ValueError, match="must be a str or number"):
        ExactMatchReward({"q": True})
    lookup = ExactMatchReward(lambda p: None)
    with pytest.raises(KeyError, match="gave None for prompt 'z'"):
        lookup.score(["z"], ["1"])


@pytest.mark.parametrize("tolerance", [True, "0.1", float("nan"), float("inf"), -0.5])
def test_exact_match_tolerance_refuses_bools_strings_and_non_finite(tolerance):
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0, got"):
        ExactMatchReward({}, tolerance=tolerance)
