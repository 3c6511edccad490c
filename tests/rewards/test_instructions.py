"""The IFEval-style checkers against hand-written responses, the soft score's contract, and the reward."""

from __future__ import annotations

import pytest
import torch

from align_decode.rewards.instructions import (
    INSTRUCTION_TYPES,
    InstructionReward,
    check_instruction,
    count_words,
    describe_instruction,
    evaluate,
    soft_instruction,
)

# (instruction, responses that pass, responses that fail), written by hand from IFEval's rules.
CASES = [
    ({"id": "change_case:english_lowercase"},
     ["a rainy day is grey and calm.", "it rains, 3 times."],
     ["A rainy day.", "a rainy day in Paris", "123 !!", ""]),
    ({"id": "change_case:english_capital"},
     ["A RAINY DAY.", "IT RAINS 3 TIMES!"],
     ["A rainy day.", "A RAINY dAY", "42"]),
    ({"id": "keywords:existence", "keywords": ["umbrella", "wet"]},
     ["Take an UMBRELLA, it is wet.", "umbrellas get wet"],
     ["Take an umbrella.", "It is wet.", ""]),
    ({"id": "keywords:existence", "keywords": ["c++"]},  # matched literally, not as a pattern
     ["I like C++ a lot."], ["I like c a lot.", "cc"]),
    ({"id": "keywords:forbidden_words", "forbidden_words": ["rain", "wet"]},
     ["Grey clouds and puddles.", "Training is fun.", "The rainy season."],
     ["The rain falls.", "It is WET.", "rain"]),
    ({"id": "startend:end_checker", "end_phrase": "Have a nice day."},
     ["Sure thing. Have a nice day.", "ok have a nice day.  ", '"Bye, have a nice day."'],
     ["Have a nice day. Bye.", "Have a nice day", "Have a nice day!"]),
    ({"id": "startend:start_checker", "start_phrase": "Yes"},
     ["Yes, it is.", "  yes it is", '"Yes." he said', "Yes"],
     ["Yesterday it rained.", "Well, yes.", "", "No"]),
    ({"id": "length_constraints:number_words", "relation": "less than", "num_words": 5},
     ["One two three four.", "", "don't stop"],  # "don't" is two words for IFEval's \w+ tokenizer
     ["One two three four five.", "a b c d e f", "it's not a big deal"]),
    ({"id": "length_constraints:number_words", "relation": "at least", "num_words": 3},
     ["one two three", "a-b-c"], ["one two", ""]),
    ({"id": "punctuation:no_comma"},
     ["No commas here.", "Semicolons; fine."], ["One, two.", ","]),
    ({"id": "startend:quotation"},
     ['"A rainy day."', '  "x y"  \n', '""'],
     ['"A rainy day.', 'A rainy day."', '"', "A rainy day."]),
]


@pytest.mark.parametrize("instruction, good, bad", CASES, ids=[c[0]["id"] + str(i) for i, c in enumerate(CASES)])
def test_strict_checkers_on_hand_written_responses(instruction, good, bad):
    for text in good:
        assert check_instruction(instruction, text), (instruction, text)
        assert soft_instruction(instruction, text) == 1.0
    for text in bad:
        assert not check_instruction(instruction, text), (instruction, text)
        assert 0.0 <= soft_instruction(instruction, text) <= 1.0


def test_every_type_has_a_case_and_a_description():
    assert {c[0]["id"] for c in CASES} == set(INSTRUCTION_TYPES)
    assert describe_instruction({"id": "keywords:existence", "keywords": ["a", "b"]}) == \
        'Include the keywords "a" and "b" in the response.'
    assert describe_instruction({"id": "length_constraints:number_words", "relation": "less than",
                                 "num_words": 20}) == "Answer with less than 20 words."


def test_soft_scores_are_partial_credit():
    low = {"id": "change_case:english_lowercase"}
    assert soft_instruction(low, "abcD") == pytest.approx(0.75)  # 3 of 4 letters lowercase
    assert soft_instruction(low, "ABCD") == 0.0
    assert soft_instruction({"id": "change_case:english_capital"}, "ABc") == pytest.approx(2 / 3)
    assert soft_instruction({"id": "keywords:existence", "keywords": ["a", "zz"]}, "a b") == 0.5
    assert soft_instruction({"id": "keywords:forbidden_words", "forbidden_words": ["x", "y"]}, "x z") == 0.5
    assert soft_instruction({"id": "punctuation:no_comma"}, "a, b, c") == pytest.approx(1 / 3)
    assert soft_instruction({"id": "startend:quotation"}, '"abc') == 0.5
    words = {"id": "length_constraints:number_words", "relation": "less than", "num_words": 5}
    assert soft_instruction(words, "a b c d e f g h") == pytest.approx(4 / 8)
    more = {"id": "length_constraints:number_words", "relation": "at least", "num_words": 4}
    assert soft_instruction(more, "a b") == 0.5
    # The cheap checker does not look at the position: full soft credit, strict failure.
    end = {"id": "startend:end_checker", "end_phrase": "Thank you."}
    assert soft_instruction(end, "Thank you. And more words") == 1.0 and not check_instruction(end, "Thank you. And more")
    start = {"id": "startend:start_checker", "start_phrase": "Sure"}
    assert soft_instruction(start, "Okay, sure") == 1.0 and not check_instruction(start, "Okay, sure")
    assert soft_instruction(start, "Okay") == 0.0


def test_count_words_matches_ifeval_tokenizer():
    assert count_words("Hello, world! It's 2024.") == 5  # Hello, world, It, s, 2024
    assert count_words("") == 0 and count_words("--- ...") == 0


def test_evaluate_and_the_reward_modes():
    items = [{"id": "punctuation:no_comma"}, {"id": "startend:quotation"}]
    ev = evaluate(items, '"a, b"')
    assert ev["verdicts"] == [False, True] and ev["strict"] == 0.0 and ev["partial"] == 0.5
    assert ev["soft"] == pytest.approx((0.5 + 1.0) / 2)
    table = {"p": items, "q": [{"id": "change_case:english_lowercase"}]}
    texts = ['"a b"', '"a, b"', "Ab"]
    prompts = ["p", "p", "q"]
    assert InstructionReward(table, "strict").score(prompts, texts).tolist() == [1.0, 0.0, 0.0]
    assert InstructionReward(table, "partial").score(prompts, texts).tolist() == [1.0, 0.5, 0.0]
    soft = InstructionReward(table, "soft").score(prompts, texts)
    assert torch.allclose(soft, torch.tensor([1.0, 0.75, 0.5]))
    with pytest.raises(KeyError, match="no instructions"):
        InstructionReward(table).score(["unknown"], ["x"])


def test_bad_instructions_are_refused():
    with pytest.raises(ValueError, match="unknown instruction id"):
        check_instruction({"id": "detectable_format:title"}, "x")
    with pytest.raises(ValueError, match="takes"):
        check_instruction({"id": "punctuation:no_comma", "extra": 1}, "x")
    with pytest.raises(ValueError, match="non-empty list"):
        check_instruction({"id": "keywords:existence", "keywords": "umbrella"}, "x")
    with pytest.raises(ValueError, match="relation"):
        check_instruction({"id": "length_constraints:number_words", "relation": "exactly", "num_words": 3}, "x")
    with pytest.raises(ValueError, match="num_words"):
        check_instruction({"id": "length_constraints:number_words", "relation": "at least", "num_words": 0}, "x")
    with pytest.raises(ValueError, match="mode"):
        InstructionReward({"p": [{"id": "punctuation:no_comma"}]}, mode="loose")
    with pytest.raises(ValueError, match="no instructions"):
        InstructionReward({"p": []})


def test_registry_reads_the_instructions_field():
    from align_decode.commandline.prompts_file import PromptRecord
    from align_decode.rewards import registry

    items = [{"id": "startend:quotation"}]
    records = [PromptRecord(id=1, line=1, index=0, prompt="Say hi.", meta={"instructions": items})]
    reward = registry.build_reward("instructions:partial", registry.RewardContext(records=records))
    assert reward.score(["Say hi."], ['"hi"']).tolist() == [1.0]
    assert registry.build_reward("instructions", registry.RewardContext(records=records)).mode == "strict"
    with pytest.raises(ValueError, match="needs an \"instructions\" field"):
        registry.build_reward("instructions", registry.RewardContext(records=[
            PromptRecord(id=2, line=2, index=1, prompt="x", meta={})]))
