"""Serve token-level guidance (GenARM ARMs, controlled-decoding Q-heads) from vLLM.

Installing align-decode beside vLLM registers a logits processor through the `vllm.logits_processors`
entry point; nothing else is needed to load it. It works with model runner V1 (CPU, or GPU with
VLLM_USE_V2_MODEL_RUNNER=0) and model runner V2 (the GPU default), chosen automatically.

Server configuration
--------------------
Set `ALIGN_DECODE_GUIDES` in the environment of the process that starts vLLM (the API server and the
engine both read it) to a JSON object, or to the path of a .json or .toml file holding one, mapping
guide names to local model folders:

    export ALIGN_DECODE_GUIDES='{
      "helpful":  {"path": "/models/arm-helpful",  "kind": "arm"},
      "harmless": {"path": "/models/arm-harmless", "kind": "arm", "dtype": "bfloat16", "device": "cuda:0"},
      "safety-q": {"path": "/models/cd-qhead",     "kind": "qhead"}
    }'

    # guides.toml  (ALIGN_DECODE_GUIDES=/etc/align-decode/guides.toml)
    [guides.helpful]
    path = "/models/arm-helpful"

Fields: `path` (required; a string alone is shorthand for {"path": ...}), `kind` ("arm" or "qhead";
both are causal LMs over the policy vocabulary whose raw next-token outputs are mixed the same way),
`dtype` ("float32" default, "bfloat16", "float16", "auto"), `device` (default: the device vLLM samples
on), `tokenizer` (default: path), `trust_remote_code` (default false).

Guides load once per engine process at start-up; each is checked to share the policy's tokenizer
(same tokens, same ids; padding rows of either head are cut off). A bad configuration stops start-up
with a message naming the guide. Without the variable the processor is a no-op.

Requests
--------
A request opts in through its sampling parameters' extra arguments, naming guides and weights:

    SamplingParams(temperature=0.7, extra_args={"align_decode": {"guides": {"helpful": 1.0, "harmless": 0.5}}})

On the OpenAI-compatible server, `vllm_xargs` carries only flat values, so pass the same object as a
JSON string:

    {"model": ..., "prompt": ..., "vllm_xargs": {"align_decode": "{\\"guides\\": {\\"helpful\\": 1.0}}"}}

The next-token law is  softmax( log p_policy / T + sum_i w_i * guide_i )  per token: GenARM with
w = 1/beta (several ARMs: multi-objective weights), or tokenwise controlled decoding with w = lambda.
Greedy requests (temperature 0) take its argmax. A request with unknown guide names, non-numeric or
non-finite weights, or unknown keys is refused with a validation error; other requests are served.
Requests without the key are untouched. A weight of 0 skips that guide for the request.

Notes
-----
- vLLM's own penalties (repetition, frequency, presence) run after this processor on model runner V1
  and before it on V2, so combined with guidance they compose slightly differently.
- Speculative decoding is not supported with guidance (refused at start-up when guides are
  configured); on model runner V1 neither is async scheduling (use --no-async-scheduling; vLLM turns
  it off on CPU).
- Requests given as prompt embeddings have no token ids for the guides and are decoded unguided.

Importing `align_decode` never imports vLLM; only `processor` (the entry point's target) does.
"""

from .config import ENV_VAR, REQUEST_KEY, GuideConfig, GuideSpec, RequestGuidance, guide_config, parse_request

ENTRY_POINT = "align_decode.serving.vllm_plugin.processor:GuidanceLogitsProcessor"

__all__ = [
    "ENTRY_POINT",
    "ENV_VAR",
    "GuideConfig",
    "GuideSpec",
    "REQUEST_KEY",
    "RequestGuidance",
    "guide_config",
    "parse_request",
]
