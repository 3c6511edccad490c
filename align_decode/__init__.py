"""align-decode: inference-time alignment decoding for transformers causal LMs."""

from .decoding import AlignedModel, GenARM, Sample
from .rewards import ARM, LMGuide, PromptedARM

__version__ = "0.1.0"

__all__ = ["AlignedModel", "GenARM", "Sample", "ARM", "LMGuide", "PromptedARM", "__version__"]
