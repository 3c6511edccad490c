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

Idle steps
----------
A step in which no request opts in skips the guides' forwards: the processor's `update_state` (which
model runner V1 calls before the forward of the same step) sets a process-local switch in `handoff`,
the model then returns the policy's hidden states alone and `compute_logits` hands over nothing. The
idle cost of a composite engine is then the policy's forward plus a Python check per step. Guided
requests are unaffected: a step runs the guides for every token in it as soon as one row opts in, so a
guided request's guide KV is always complete. The tokens of a skipped step have no guide KV; the
request that owns them never needs it (its opt-in is fixed by its sampling parameters), but under
prefix caching a later guided request could reuse those blocks. So guided requests get their own cache
salt: as the engine core admits a request (before its block hashes are computed) a hook applies the
processor's rule (`guidance.OptInRule`, rebuilt from the engine's config: the engine core may be another
process), salts the request if it opts in, and stamps the answer with the rule's fingerprint into its
extra_args; the processor checks every stamp, and an unstamped or mis-stamped request turns skipping off
for the engine's life. Guided and unguided requests therefore never share cached blocks (guided ones
still share among themselves); with prefix caching off no salt is needed. Skipping is off under full
CUDA graphs, with a KV-transfer connector, and with ALIGN_DECODE_COMPOSITE_IDLE_SKIP=0; the start-up
line says which, and the first skipped step is logged once. The model counts its forwards in
`guided_steps` and `skipped_steps`.

Raw guide logits are mixed, not log-softmaxes: a per-row constant does not change the law. Columns a
guide cannot score (past the width it shares with the policy tokenizer) are -inf for guided rows.

The model folder
----------------
`align-decode build-composite --policy DIR --guide NAME=DIR ... --out DIR` (see `build`) writes a
folder vLLM can serve: the policy's config with `architectures: ["AlignDecodeGuidedForCausalLM"]` and
an `align_decode` entry naming the policy and guide folders (absolute paths), the tokenizer files
(copied, a few MB), and the policy's safetensors symlinked (no weight copies). vLLM reads the policy
weights through the symlinks; each guide's weights are read from its own folder.

Limits of this path (use the processor path, $ALIGN_DECODE_GUIDES, for model runner V2 and for guides
it cannot pack):
  * a prompted ARM (the policy under another system prompt) needs its own prefix, which cannot share
    the policy's token sequence: refused by the build command. The processor path loads trained guide
    folders only, so neither vLLM path serves one; `align-decode serve` (genarm with arm_prompt, on the
    Hugging Face backend) does.
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
    _hook_requests()
    _share_vllm_logging()


def _share_vllm_logging() -> None:
    """Send align-decode's serving log lines (the start-up lines saying which guides are served and
    how) through vLLM's own handler, at its level: vLLM configures only its `vllm` logger, so an INFO
    line from another package would not reach the server log. Left alone if already configured."""
    import logging

    ours, theirs = logging.getLogger("align_decode.serving"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False  # as vLLM's own logger: no second copy through the root logger


def _hook_requests() -> None:
    """Stamp and salt each request as the engine core admits it, before its prefix-cache block hashes
    are computed (`guidance.stamp_request`; package docstring, "Idle steps"). The engine core may live in
    another process than the model and its processor (vLLM's multiprocess executor), so it applies the
    same rule itself, built from its own config. Engines serving other models are left untouched.
    Best effort: without the hook requests are unstamped, and the processor then never skips the guides."""

    def preprocess_add_request(original, self, request, *args, **kwargs):
        rule = self.__dict__.get("_align_decode_rule", False)
        if rule is False:  # built once per engine core
            from .guidance import OptInRule

            try:
                rule = OptInRule.for_engine(self.vllm_config)
            except Exception:  # never refuse requests over this: unstamped, they only turn skipping off
                rule = None
            self._align_decode_rule = rule
        if rule is not None:
            from .guidance import stamp_request

            stamp_request(rule, request)
        return original(self, request, *args, **kwargs)

    _wrap_once("vllm.v1.engine.core", "EngineCore", "preprocess_add_request", preprocess_add_request)


def _hook_admission() -> None:
    """Let request admission know the packed guide names in the API-server process too.

    vLLM checks a request's arguments (the processor's `validate_params`) in the front-end process, which
    never builds the model; its `InputProcessor` does hold the model config, so wrapping its constructor
    announces the composite's guides there. Best effort: on a vLLM without that class, requests naming
    packed guides are still checked in the engine (and served unguided, with an error logged, if wrong).
    """

    def __init__(original, self, vllm_config, *args, **kwargs):
        try:
            from . import handoff
            from .spec import CompositeSpec

            spec = CompositeSpec.from_hf_config(vllm_config.model_config.hf_config)
            if spec is not None:
                handoff.announce(spec.names())
        except Exception:  # never stop vLLM over this
            pass
        original(self, vllm_config, *args, **kwargs)

    _wrap_once("vllm.v1.engine.input_processor", "InputProcessor", "__init__", __init__)


def _wrap_once(module: str, cls: str, method: str, wrapper) -> None:
    """Replace `module.cls.method` by `wrapper(original, self, ...)`, once per process (registration may
    run several times). A vLLM without that class is left alone: the hooks are best effort."""
    import functools
    import importlib

    try:
        owner = getattr(importlib.import_module(module), cls)
    except Exception:  # pragma: no cover - another vLLM layout
        return
    original = getattr(owner, method)
    if getattr(original, "_align_decode", False):
        return
    @functools.wraps(original)
    def hooked(self, *args, **kwargs):
        return wrapper(original, self, *args, **kwargs)

    hooked._align_decode = True
    setattr(owner, method, hooked)


__all__ = ["ARCHITECTURE", "CONFIG_KEY", "MODEL_CLASS", "register"]
