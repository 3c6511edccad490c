"""align-decode: inference-time alignment decoding for transformers causal LMs."""

from .decoding import AlignedModel, BestOfN, GenARM, QAlign, Sample
from .decoding import TransferQ
from .rewards import ARM, LMGuide, PromptedARM

__version__ = "0.1.0"

__all__ = ["AlignedModel", "BestOfN", "GenARM", "QAlign", "Sample", "ARM", "LMGuide", "PromptedARM", "__version__"]
__all__ += ["TransferQ"]

from .decoding import ARGS, BlockwiseCD, TokenwiseCD  # noqa: E402
from .rewards import QValueModel, ScalarValueModel  # noqa: E402

__all__ += ["ARGS", "BlockwiseCD", "TokenwiseCD", "QValueModel", "ScalarValueModel"]
