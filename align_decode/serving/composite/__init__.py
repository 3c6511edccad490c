"""GenARM at engine speed: the guide models run inside vLLM, as part of the served model.

Why a composite model
---------------------
The logits-processor plugin (`align_decode.serving.vllm_plugin`) runs each guide as a Hugging Face
model beside vLLM: its own KV cache, eager torch, outside vLLM's scheduler, paged memory and (on GPU)
CUDA graphs. vLLM has no extension point for "a second model inside decoding", but it does load
out-of-tree model architectures (entry-point group `vllm.general_plugins` ->
`ModelRegistry.register_model`). So the policy and its guides are packed into one vLLM model:

    AlignDecodeGuidedForCausalLM
      policy            <- the policy folder's own vLLM architecture (Llama, Qwen2, ...), prefix "policy"
      guides.guide_0    <- each guide's own vLLM architecture, prefix "guides.guide_<i>"
      ...

Every submodule is built by vLLM itself (`init_vllm_registered_model` with the folder's config), so
each guide's attention layers are ordinary vLLM attention layers with their own names: vLLM allocates
them paged KV cache like any layer, in the same block tables as the policy (a request's guide cache
grows, is preempted, freed and prefix-cached with its policy cache), and runs them with its attention
backend. The prefixes carry one integer (the layer index) as vLLM's layer-name parsing requires.

One step:
  * `forward(input_ids, positions)` runs the policy and every guide on the same tokens and positions
    and returns their final hidden states concatenated along the feature dimension. vLLM then picks the
    rows it samples from (`hidden_states[logits_indices]`), which selects the same positions for all
    of them: chunked prefill, mixed prefill/decode batches and preemption need nothing special.
  * `compute_logits(h)` splits the rows back, returns the policy's logits to vLLM, and leaves each
    guide's next-token logits (one [rows, vocab] tensor per guide) in a process-local hand-off slot
    (`handoff`).
  * the align-decode logits processor (same entry point as before; model runner V1, which runs
    in-process with the model on CPU) takes them from the slot and adds, for each request that opts
    in, c * sum_i w_i * guide_i to the request's row (c = temperature, or 1 when greedy; see
    `vllm_plugin.batch`). Requests that do not opt in keep the policy's logits.

Raw guide logits are mixed, not log-softmaxes: a per-row constant does not change the law. Columns a
guide cannot score (past the width it shares with the policy tokenizer) are -inf for guided rows.

The model folder
----------------
`align-decode build-composite --policy DIR --guide NAME=DIR ... --out DIR` (see `build`) writes a
folder vLLM can serve: the policy's config with `architectures: ["AlignDecodeGuidedForCausalLM"]` and
an `align_decode` entry naming the policy and guide folders (absolute paths), the tokenizer files
(copied, a few MB), and the policy's safetensors symlinked (no weight copies). vLLM reads the policy
weights through the symlinks; each guide's weights are read from its own folder.

Limits of this path (use the processor path, $ALIGN_DECODE_GUIDES, for these):
  * a prompted ARM (the policy under another system prompt) needs its own prefix, which cannot share
    the policy's token sequence: refused by the build command.
  * guides must share the policy's tokenizer (checked at build time).
  * guides of another size (weak-to-strong) are packed as they are; whether the engine accepts several
    layer shapes depends on vLLM's KV-cache grouping (see the tests and RESULTS.md).
  * requests given as prompt embeddings have no ids for the guides and are refused at the forward.
  * the hand-off assumes the model and the sampler share a process and a step: model runner V1
    (vLLM's CPU backend; on GPU set VLLM_USE_V2_MODEL_RUNNER=0), no speculative decoding, and a
    process with one engine (pipeline parallelism is not supported).

Importing this package never imports vLLM or torch; `model` does.
"""

from __future__ import annotations

ARCHITECTURE = "AlignDecodeGuidedForCausalLM"
CONFIG_KEY = "align_decode"
MODEL_CLASS = "align_decode.serving.composite.model:AlignDecodeGuidedForCausalLM"


def register() -> None:
    """The `vllm.general_plugins` entry point: make vLLM know the composite architecture (lazily: the
    model module is imported only when a composite folder is served)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    _hook_admission()


def _hook_admission() -> None:
    """Let request admission know the packed guide names in the API-server process too.

    vLLM checks a request's arguments (the processor's `validate_params`) in the front-end process, which
    never builds the model; its `InputProcessor` does hold the model config, so wrapping its constructor
    announces the composite's guides there. Best effort: on a vLLM without that class, requests naming
    packed guides are still checked in the engine (and served unguided, with an error logged, if wrong).
    """
    try:
        from vllm.v1.engine import input_processor as ip
    except Exception:  # pragma: no cover - another vLLM layout
        return
    original = ip.InputProcessor.__init__
    if getattr(original, "_align_decode", False):
        return

    def __init__(self, vllm_config, *args, **kwargs):
        try:
            from . import handoff
            from .spec import CompositeSpec

            spec = CompositeSpec.from_hf_config(vllm_config.model_config.hf_config)
            if spec is not None:
                handoff.announce(spec.names())
        except Exception:  # never stop vLLM over this
            pass
        original(self, vllm_config, *args, **kwargs)

    __init__._align_decode = True
    ip.InputProcessor.__init__ = __init__


__all__ = ["ARCHITECTURE", "CONFIG_KEY", "MODEL_CLASS", "register"]
