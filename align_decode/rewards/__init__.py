"""Rewards: sequence-level rewards, token-level guides and their trainers."""

from .._lazy import lazy_exports

_EXPORTS = {
    "ARM": ".guides",
    "CallableReward": ".function",
    "Clamp": ".combine",
    "ClassifierReward": ".classifier",
    "ExactMatchReward": ".answers",
    "KeywordReward": ".constraints",
    "LMGuide": ".guides",
    "LengthReward": ".constraints",
    "LogSigmoidTransform": ".combine",
    "NonToxicityReward": ".offline",
    "PrefixRewardGuide": ".value_models",
    "PromptedARM": ".guides",
    "QValueModel": ".value_models",
    "RegexReward": ".constraints",
    "ScalarValueModel": ".value_models",
    "SentimentReward": ".offline",
    "SequenceReward": ".base",
    "TopKGuide": ".topk_guides",
    "TopKGuideState": ".topk_guides",
    "WeightedSum": ".combine",
    "answers_match": ".answers",
    "extract_answer": ".answers",
    "load_value_model": ".value_training",
    "train_cd_fudge": ".value_training",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
