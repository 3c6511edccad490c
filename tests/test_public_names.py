"""Every public name the README gives still imports: the current ones silently, the ones moved by the
layout of issue 15 for one more release with a DeprecationWarning that says where they went."""

from __future__ import annotations

import importlib

import pytest

CURRENT = {
    "align_decode": ["AlignedModel", "GenARM", "PromptedARM", "ARM", "BestOfN", "QAlign", "TransferQ", "ARGS",
                     "BlockwiseCD", "TokenwiseCD", "QValueModel", "ScalarValueModel", "Sample", "LMGuide"],
    "align_decode.models": ["load_model"],
    "align_decode.rewards": ["SentimentReward", "NonToxicityReward", "ClassifierReward", "CallableReward",
                             "LengthReward", "KeywordReward", "RegexReward", "ExactMatchReward", "extract_answer",
                             "Clamp", "LogSigmoidTransform"],
    "align_decode.decoding.guides": ["ARM", "PromptedARM", "QValueModel", "ScalarValueModel", "PrefixRewardGuide",
                                     "Guide", "GuideContext", "StaticScores"],
    "align_decode.training": ["train_arm", "train_cd_fudge", "load_value_model", "ARMTrainingConfig"],
    "align_decode.serving.engines": ["VLLMEngine", "SamplingEngine", "engine_generate"],
}
MOVED = [
    ("align_decode.rewards", "PrefixRewardGuide", "align_decode.decoding.guides"),
    ("align_decode.rewards", "QValueModel", "align_decode.decoding.guides"),
    ("align_decode.rewards", "train_cd_fudge", "align_decode.training"),
    ("align_decode.rewards.arm_training", "train_arm", "align_decode.training.arm"),
    ("align_decode.rewards.value_training", "train_cd_fudge", "align_decode.training.value"),
    ("align_decode.decoding.backends", "VLLMEngine", "align_decode.serving.engines"),
    ("align_decode.serving.engines", "VLLMBackend", "VLLMEngine"),
]


@pytest.mark.parametrize("module", sorted(CURRENT))
def test_current_names_import_without_warnings(module, recwarn):
    loaded = importlib.import_module(module)
    for name in CURRENT[module]:
        assert getattr(loaded, name) is not None
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "align_decode" in str(w.message)]


@pytest.mark.parametrize("module, name, where", MOVED)
def test_moved_names_still_work_and_say_where_they_went(module, name, where):
    with pytest.warns(DeprecationWarning, match=where.replace(".", r"\.")):
        value = getattr(importlib.import_module(module), name)
    assert value is not None
