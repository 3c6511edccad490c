"""Sampling engines: engines that carry the sequence-level methods' sampling work.

`BestOfN`, `QAlign` and `TransferQ` take `engine=`; without one they decode in process (the Hugging
Face model and this package's loop). `VLLMEngine` sends the work to vLLM, whose tensor and pipeline
parallelism then carry it across GPUs and nodes:

- best-of-N: one request per prompt with n = N (vLLM's own n-sampling);
- QAlign: each Metropolis-Hastings step resubmits every chain's prompt + kept prefix y_<i as token ids
  with max_tokens = the remaining budget; vLLM's prefix cache serves the kept prefix;
- Transfer Q*: all rollouts of a step (rows x candidates x rollouts) in one generate call. The prior's
  top-k candidates still come from the in-process policy, whose one cached forward pass per token is
  small beside k * H rollout tokens.

`engine_generate` runs best-of-N or QAlign with no local copy of the policy (`EnginePolicy`).
Importing this package never imports vLLM; building a `VLLMEngine` does.
"""

from ...decoding.engine import Completion, SamplingEngine, EngineOutput
from .engine_policy import EngineModel, EnginePolicy, engine_generate
from .vllm_engine import VLLMEngine, engine_seed

__all__ = [
    "Completion",
    "EngineModel",
    "EngineOutput",
    "EnginePolicy",
    "SamplingEngine",
    "VLLMEngine",
    "engine_generate",
    "engine_seed",
]
_RENAMED = {"VLLMBackend": "VLLMEngine", "SamplingBackend": "SamplingEngine"}


def __getattr__(name: str):
    if name in _RENAMED:  # the names before engines were told apart from the kernel's implementations
        import warnings

        warnings.warn(f"{name} is now {_RENAMED[name]}; the old name goes in the next release", DeprecationWarning,
                      stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
