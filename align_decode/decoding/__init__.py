"""The decoding loop, the strategies and the Hugging Face drop-in wrapper."""

from .aligned_model import AlignedGenerateOutput, AlignedModel
from .best_of_n import BestOfN
from .genarm import GenARM
from .loop import Decoded, decode
from .prompts import PromptBatch, left_pad
from .qalign import QAlign
from .session import ModelSession
from .settings import GenerationSettings
from .strategy import Policy, Sample, Strategy, TokenStrategy
from .transfer_q import TransferQ

__all__ = [
    "AlignedModel",
    "AlignedGenerateOutput",
    "BestOfN",
    "GenARM",
    "QAlign",
    "Decoded",
    "decode",
    "PromptBatch",
    "left_pad",
    "ModelSession",
    "GenerationSettings",
    "Policy",
    "Sample",
    "Strategy",
    "TokenStrategy",
    "TransferQ",
]

from .args import ARGS  # noqa: E402
from .blockwise import BlockwiseCD  # noqa: E402
from .controlled import TokenwiseCD  # noqa: E402

__all__ += ["ARGS", "BlockwiseCD", "TokenwiseCD"]
