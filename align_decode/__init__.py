"""align-decode: inference-time alignment decoding for transformers causal LMs."""

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ARGS": ".decoding",
    "ARM": ".rewards",
    "AlignedModel": ".decoding",
    "BestOfN": ".decoding",
    "BlockwiseCD": ".decoding",
    "GenARM": ".decoding",
    "LMGuide": ".rewards",
    "PromptedARM": ".rewards",
    "QAlign": ".decoding",
    "QValueModel": ".rewards",
    "Sample": ".decoding",
    "ScalarValueModel": ".rewards",
    "TokenwiseCD": ".decoding",
    "TransferQ": ".decoding",
}
__all__ = sorted([*_EXPORTS, "__version__"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
