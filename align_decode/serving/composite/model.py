"""The composite vLLM model: a policy and its guides, each a vLLM model with its own attention layers.

See the package docstring for the design. Registered with vLLM as `AlignDecodeGuidedForCausalLM`
through the `vllm.general_plugins` entry point (`align_decode.serving.composite:register`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.sequence import IntermediateTensors

from . import handoff
from .spec import CompositeError, CompositeSpec

logger = logging.getLogger(__name__)


def _load_hf_config(folder: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CompositeError(f"cannot read the model config in {folder!r}: {e}") from e


def _guide_key(i: int) -> str:
    # One integer per layer name: vLLM parses the layer index out of attention-layer names.
    return f"guide_{i}"


class AlignDecodeGuidedForCausalLM(nn.Module):
    """Policy + guides in one forward; logits are the policy's, guide scores go to the processor."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        mc = vllm_config.model_config
        spec = CompositeSpec.from_hf_config(mc.hf_config)
        if spec is None:
            raise CompositeError("AlignDecodeGuidedForCausalLM needs a config built by `align-decode build-composite`")
        pp = vllm_config.parallel_config.pipeline_parallel_size
        if pp > 1:
            raise CompositeError("the composite guided model does not support pipeline parallelism")
        if getattr(vllm_config, "speculative_config", None):
            raise CompositeError("the composite guided model does not support speculative decoding")
        self.spec = spec
        trust = bool(mc.trust_remote_code)
        policy_cfg = _load_hf_config(spec.policy, trust)
        self.policy = init_vllm_registered_model(vllm_config, hf_config=policy_cfg,
                                                 prefix=maybe_prefix(prefix, "policy"))
        self.guides = nn.ModuleDict()
        self._guide_folders = []
        sizes = [int(policy_cfg.get_text_config().hidden_size)]
        for i, g in enumerate(spec.guides):
            cfg = _load_hf_config(g.path, trust)
            self.guides[_guide_key(i)] = init_vllm_registered_model(
                vllm_config, hf_config=cfg, prefix=maybe_prefix(prefix, f"guides.{_guide_key(i)}"))
            self._guide_folders.append(g.path)
            sizes.append(int(cfg.get_text_config().hidden_size))
        self.sizes = sizes
        self.make_empty_intermediate_tensors = getattr(self.policy, "make_empty_intermediate_tensors", None)
        handoff.announce(spec.names())
        handoff.set_guides_needed(True)  # profiling and warm-up forwards run the guides
        self.guided_steps = 0  # forwards that ran the guides / that skipped them (idle steps)
        self.skipped_steps = 0
        logger.info("align-decode composite model: policy %s, guides %s (run inside vLLM)",
                    spec.policy, ", ".join(f"{g.name}={g.path}" for g in spec.guides))

    # ------------------------------------------------------------------------------------ forward
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.policy.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if input_ids is None:
            raise CompositeError("the composite guided model needs token ids (prompt embeddings are not "
                                 "supported: the guides could not read them)")
        hidden = self.policy(input_ids, positions, intermediate_tensors, inputs_embeds)
        if not handoff.guides_needed():
            # No request of this step opts in (the processor's switch; see the package docstring,
            # "Idle steps"): the guides' KV for these tokens is left unwritten, which only requests
            # that never read guide scores, and never share cached blocks with guided ones, can afford.
            self.skipped_steps += 1
            return hidden
        self.guided_steps += 1
        parts = [hidden] + [guide(input_ids, positions, None, None) for guide in self.guides.values()]
        # One tensor: vLLM indexes the rows it samples from, the same rows for every model.
        return torch.cat(parts, dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if hidden_states.shape[-1] == self.sizes[0]:  # the guides were skipped this step
            handoff.publish_skipped()
            return self.policy.compute_logits(hidden_states)
        parts = torch.split(hidden_states, self.sizes, dim=-1)
        logits = self.policy.compute_logits(parts[0])
        handoff.publish([g.compute_logits(h) for g, h in zip(self.guides.values(), parts[1:])])
        return logits

    # ------------------------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The iterator vLLM gives holds the policy's weights (linked into the composite folder); each
        guide's are read from its own folder."""
        from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

        loaded = {f"policy.{n}" for n in self.policy.load_weights(weights)}
        for i, folder in enumerate(self._guide_folders):
            files = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
            if not files:
                raise CompositeError(f"guide folder {folder} has no .safetensors weights")
            names = self.guides[_guide_key(i)].load_weights(safetensors_weights_iterator(files, False))
            loaded |= {f"guides.{_guide_key(i)}.{n}" for n in names}
        return loaded
