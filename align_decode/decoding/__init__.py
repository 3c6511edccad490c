"""The decoding core: the loop, model sessions, settings, the strategies, the token-level guides
(`decoding.guides`) and the Hugging Face drop-in wrapper."""

from .._lazy import lazy_exports

_EXPORTS = {
    "ARGS": ".reward_guided_search",
    "AlignedGenerateOutput": ".aligned_model",
    "AlignedModel": ".aligned_model",
    "BestOfN": ".best_of_n",
    "BlockwiseCD": ".blockwise",
    "DVTS": ".beam_search",
    "Decoded": ".loop",
    "GenARM": ".genarm",
    "GenerationSettings": ".settings",
    "ModelSession": ".session",
    "ParticleFilter": ".particle_filter",
    "Policy": ".strategy",
    "PrunedBestOfN": ".pruned_best_of_n",
    "PromptBatch": ".prompts",
    "QAlign": ".qalign",
    "Sample": ".strategy",
    "StepBeamSearch": ".beam_search",
    "Strategy": ".strategy",
    "TokenStrategy": ".strategy",
    "TokenwiseCD": ".controlled",
    "TransferQ": ".transfer_q",
    "decode": ".loop",
    "left_pad": ".prompts",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
