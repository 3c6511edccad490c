"""align-decode: inference-time alignment decoding for transformers causal LMs."""

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ARGS": ".decoding",
    "ARM": ".decoding.guides",
    "AlignedModel": ".decoding",
    "BestOfN": ".decoding",
    "BlockwiseCD": ".decoding",
    "DVTS": ".decoding",
    "GenARM": ".decoding",
    "LMGuide": ".decoding.guides",
    "ParticleFilter": ".decoding",
    "PromptedARM": ".decoding.guides",
    "PrunedBestOfN": ".decoding",
    "QAlign": ".decoding",
    "QValueModel": ".decoding.guides",
    "Sample": ".decoding",
    "StepBeamSearch": ".decoding",
    "ScalarValueModel": ".decoding.guides",
    "TokenwiseCD": ".decoding",
    "TransferQ": ".decoding",
}
__all__ = sorted([*_EXPORTS, "__version__"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
