"""Rewards: sequence-level rewards, token-level guides and their trainers."""

from .answers import ExactMatchReward, answers_match, extract_answer
from .base import SequenceReward
from .classifier import ClassifierReward
from .combine import Clamp, LogSigmoidTransform, WeightedSum
from .constraints import KeywordReward, LengthReward, RegexReward
from .function import CallableReward
from .guides import ARM, LMGuide, PromptedARM
from .offline import NonToxicityReward, SentimentReward
from .topk_guides import TopKGuide, TopKGuideState

__all__ = [
    "SequenceReward",
    "ARM",
    "LMGuide",
    "PromptedARM",
    "CallableReward",
    "ClassifierReward",
    "SentimentReward",
    "NonToxicityReward",
    "LengthReward",
    "KeywordReward",
    "RegexReward",
    "ExactMatchReward",
    "extract_answer",
    "answers_match",
    "WeightedSum",
    "Clamp",
    "LogSigmoidTransform",
    "TopKGuide",
    "TopKGuideState",
]

from .value_models import PrefixRewardGuide, QValueModel, ScalarValueModel  # noqa: E402

__all__ += ["PrefixRewardGuide", "QValueModel", "ScalarValueModel"]

from .value_training import load_value_model, train_cd_fudge  # noqa: E402

__all__ += ["load_value_model", "train_cd_fudge"]
