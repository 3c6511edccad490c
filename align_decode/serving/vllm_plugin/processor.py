"""The vLLM logits processor: one class for both model runners, registered as an entry point.

vLLM loads every class in the `vllm.logits_processors` entry-point group, for every engine, and checks
it against the interface of the model runner in use: V1 (`vllm.v1.sample.logits_processor`) or V2
(`vllm.v1.worker.gpu.sample.logits_processor`), which reject each other's classes. This class derives
from both interfaces and picks its behaviour from the constructor's arguments, so one entry point
serves either runner:

    V1: GuidanceLogitsProcessor(vllm_config, device, is_pin_memory)   -> update_state / apply(logits)
    V2: GuidanceLogitsProcessor(vllm_config, req_states)              -> add_request / apply(logits, ctx)

With no guides configured the processor does nothing at all (and says it is argmax-invariant, so V1
skips it for greedy batches); with guides configured, requests that do not opt in cost a dictionary
lookup when they join the batch and nothing per step.
"""

from __future__ import annotations

import logging

import torch

# The composite model's request rule, shared with the engine core's admission hook.
from ..composite.guidance import OptInRule
from ..composite.guidance import only as _only
from ..composite.guidance import with_packed as _with_packed
from .bank import PolicyVocab, shared_bank
from .batch import GuidedBatch
from .config import REQUEST_KEY, GuidanceConfigError, RequestGuidance, guide_config, parse_request

logger = logging.getLogger(__name__)

try:
    from vllm.v1.sample.logits_processor.interface import LogitsProcessor as _V1Base
except ImportError:  # a vLLM without the V1 sampler interface
    _V1Base = None
try:
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2Base
except ImportError:  # a vLLM before model runner V2's processor interface
    _V2Base = None

_BASES = tuple(b for b in (_V1Base, _V2Base) if b is not None)
if not _BASES:
    raise ImportError("this vLLM has neither the V1 nor the V2 logits-processor interface")


def request_scale(params) -> float:
    """c in the mixing rule: the temperature vLLM will divide by, or 1 for a greedy request (vLLM
    decodes greedily below a temperature of 1e-5 and divides by nothing then)."""
    greedy = getattr(params, "sampling_type", None)
    if greedy is not None and int(greedy) == 0:  # SamplingType.GREEDY
        return 1.0
    t = float(params.temperature)
    return t if t >= 1e-5 else 1.0


class GuidanceLogitsProcessor(*_BASES):
    """Token-level guidance (GenARM ARMs, controlled-decoding Q-heads) inside vLLM.

    A request opts in with
        SamplingParams(extra_args={"align_decode": {"guides": {"helpful": 1.0, "harmless": 0.5}}})
    naming guides configured in $ALIGN_DECODE_GUIDES (see the package docstring).
    """

    # ------------------------------------------------------------------------------- admission
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse a malformed request (ValueError: the server answers that request with a 400 and
        keeps serving the others)."""
        extra = getattr(sampling_params, "extra_args", None)
        if not extra or REQUEST_KEY not in extra:
            return
        try:
            config = guide_config()
        except GuidanceConfigError as e:
            raise ValueError(f"align_decode guidance is unavailable on this server: {e}") from None
        from ..composite import handoff

        parse_request(extra, _with_packed(config, handoff.known_guides()))

    # ------------------------------------------------------------------------------- set-up
    def __init__(self, vllm_config, *args, **kwargs):
        req_states = kwargs.pop("req_states", None)
        if req_states is None and len(args) == 1 and not isinstance(args[0], (torch.device, str)):
            req_states = args[0]
        self.runner = "v2" if req_states is not None else "v1"
        if self.runner == "v1":
            device = kwargs.pop("device", args[0] if args else "cpu")
            device = torch.device(device)
        else:
            device = torch.device(req_states.device)
        self.device = device
        self.config = guide_config()
        self._impl = None
        self._composite = None
        self._packed: tuple[str, ...] = ()
        self._setup_composite(vllm_config)
        if not self.config:
            return
        self._check_engine(vllm_config)
        bank = shared_bank(self.config, PolicyVocab.from_vllm_config(vllm_config), device)
        self.batch = GuidedBatch(bank)
        if self.runner == "v1":
            from .v1 import V1Guidance

            self._impl = V1Guidance(self.batch, self._parse, request_scale)
        else:
            from .v2 import V2Guidance

            self._impl = V2Guidance(self.batch, req_states, self._parse, request_scale)
        logger.info("align-decode guidance ready (model runner %s): guides %s", self.runner.upper(),
                    ", ".join(self.config.names()))

    def _setup_composite(self, vllm_config) -> None:
        """Composite model (guides packed into the served model, run by vLLM): mix the scores it hands
        over. Guides named in $ALIGN_DECODE_GUIDES keep the processor path beside it."""
        from ..composite.spec import CompositeSpec

        spec = CompositeSpec.from_hf_config(getattr(getattr(vllm_config, "model_config", None), "hf_config", None))
        if spec is None:
            return
        clash = sorted(set(spec.names()) & set(self.config.guides))
        if clash:
            raise ValueError(f"guide name(s) {clash} are both packed in the composite model and configured in "
                             f"{self.config.source}; rename one")
        if self.runner != "v1":
            raise ValueError("the align-decode composite model hands guide scores to model runner V1 only; "
                             "set VLLM_USE_V2_MODEL_RUNNER=0")
        from ..composite import handoff
        from ..composite.guidance import CompositeV1Guidance, idle_skip

        handoff.announce(spec.names())
        self._packed = tuple(spec.names())
        allowed, stamps, why = idle_skip(vllm_config)
        rule = OptInRule(self._packed, self.config,
                         on_error=lambda e: logger.error("align-decode: request guidance ignored: %s", e))
        self._composite = CompositeV1Guidance(spec, rule.guidance, request_scale, skip=(allowed, stamps),
                                              fingerprint=rule.fingerprint)
        logger.info("align-decode guidance ready (composite model, in-engine guides): %s; guide forwards %s (%s)",
                    ", ".join(self._packed), "skipped in steps where no request opts in" if allowed
                    else "run in every step", why)

    def _parse_all(self, params) -> RequestGuidance | None:
        try:
            return parse_request(getattr(params, "extra_args", None), _with_packed(self.config, self._packed))
        except ValueError as e:
            logger.error("align-decode: request guidance ignored: %s", e)
            return None

    def _check_engine(self, vllm_config) -> None:
        if getattr(vllm_config, "speculative_config", None):
            raise ValueError("align-decode guidance does not support speculative decoding; "
                             f"unset {self.config.source} or turn speculative decoding off")
        sched = getattr(vllm_config, "scheduler_config", None)
        if self.runner == "v1" and sched is not None and getattr(sched, "async_scheduling", False):
            # V1 passes the sampled ids to entry-point processors only after the next step's sampling:
            # the guides would read placeholders.
            raise ValueError("align-decode guidance on model runner V1 needs the sampled token ids: start "
                             "vLLM with --no-async-scheduling, or use model runner V2")

    def _parse(self, params) -> RequestGuidance | None:
        if self._packed:  # the processor-path part of a request to a composite model
            return _only(self._parse_all(params), set(self.config.guides))
        try:
            return parse_request(getattr(params, "extra_args", None), self.config)
        except ValueError as e:
            # validate_params refused such requests at admission; reaching here means the front end
            # saw another configuration. Serve the request unguided rather than stop the engine.
            logger.error("align-decode: request guidance ignored: %s", e)
            return None

    # ------------------------------------------------------------------------------- both runners
    def is_argmax_invariant(self) -> bool:
        # With no guides nothing is ever changed: V1 then skips this processor for greedy batches.
        return self._impl is None and self._composite is None

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if self._composite is not None:
            logits = self._composite.apply(logits)
        if self._impl is None:
            return logits
        if self.runner == "v1":
            return self._impl.apply(logits)
        return self._impl.apply(logits, ctx)

    # ------------------------------------------------------------------------------- V1 only
    def update_state(self, batch_update) -> None:
        if self._composite is not None:
            self._composite.update_state(batch_update)
        if self._impl is not None and self.runner == "v1":
            self._impl.update_state(batch_update)

    # ------------------------------------------------------------------------------- V2 only
    def add_request(self, req_idx: int, sampling_params) -> bool:
        if self._impl is None:
            return False
        return self._impl.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        """Nothing staged: guided requests are kept on the host."""
