"""Token-level guides: what the decoding loop mixes into the policy's log-probs each step.

`base`: the interface every guide implements (`Guide`, `GuideState`, `GuideContext`);
`lm`: guides that are language models over the policy's vocabulary (GenARM's ARMs, prompted ARMs);
`topk`: guides that score only the policy's top-k tokens (ARGS, scalar value models, Transfer Q*);
`value`: controlled decoding's value models (a Q-head, a scalar prefix scorer, a reward on prefixes).
"""

from ..._lazy import lazy_exports

_EXPORTS = {
    "ARM": ".lm",
    "Guide": ".base",
    "GuideContext": ".base",
    "GuideState": ".base",
    "StaticScores": ".base",
    "LMGuide": ".lm",
    "PrefixRewardGuide": ".value",
    "PromptedARM": ".lm",
    "QValueModel": ".value",
    "ScalarValueModel": ".value",
    "TopKGuide": ".topk",
    "TopKGuideState": ".topk",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
