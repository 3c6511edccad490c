"""align-decode: inference-time alignment decoding for transformers causal LMs."""

from .decoding import AlignedModel, BestOfN, GenARM, QAlign, Sample
from .rewards import ARM, LMGuide, PromptedARM

__version__ = "0.1.0"

__all__ = ["AlignedModel", "BestOfN", "GenARM", "QAlign", "Sample", "ARM", "LMGuide", "PromptedARM", "__version__"]
