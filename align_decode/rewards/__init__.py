"""Sequence rewards: r(prompt, completion) for best-of-N, QAlign, blockwise controlled decoding,
Transfer Q* and the training data of the guides; `registry` names them for the command line. Process
rewards (`process`: PRMs, sequence rewards and value models on partial responses) score the steps of
step-level search."""

from .._lazy import lazy_exports

_EXPORTS = {
    "CallableReward": ".function",
    "Clamp": ".combine",
    "ClassifierReward": ".classifier",
    "ExactMatchReward": ".answers",
    "KeywordReward": ".constraints",
    "LengthReward": ".constraints",
    "LogSigmoidTransform": ".combine",
    "NonToxicityReward": ".offline",
    "PrefixReward": ".process",
    "ProcessReward": ".process",
    "RegexReward": ".constraints",
    "SentimentReward": ".offline",
    "SequenceReward": ".base",
    "TransformersPRM": ".process",
    "ValuePRM": ".process",
    "WeightedSum": ".combine",
    "answers_match": ".answers",
    "extract_answer": ".answers",
}
# Token-level guides and trainers lived here before the guides moved next to the loop.
_MOVED = {
    **dict.fromkeys(["ARM", "LMGuide", "PrefixRewardGuide", "PromptedARM", "QValueModel", "ScalarValueModel",
                     "TopKGuide", "TopKGuideState"], "align_decode.decoding.guides"),
    **dict.fromkeys(["load_value_model", "train_cd_fudge"], "align_decode.training"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, moved=_MOVED)
