"""Guided requests that vLLM preempts and resumes, and prompts prefilled in chunks, in a real engine.

The KV cache is made so small that eight requests cannot run together: vLLM preempts some, later
re-adds them with their outputs so far, and the processor rebuilds their guide rows from the tokens.
Greedy outputs must still equal the Hugging Face backend's.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")

from test_processor import engine_env, guided, hf_greedy, shutdown  # noqa: E402
from vllm_support import load, save_models  # noqa: E402

pytestmark = pytest.mark.vllm


def test_preempted_and_chunked_requests_keep_exact_guidance(tmp_path_factory, monkeypatch):
    from vllm import LLM

    from align_decode.serving.vllm_plugin.batch import GuidedBatch

    paths = save_models(tmp_path_factory.mktemp("vllm-models"))
    engine_env(monkeypatch, paths)
    built = []
    original = GuidedBatch._build

    def counting(self, build, source):
        built.extend((len(r.handle[0]), n) for r, n in build)  # (prompt length, tokens built on)
        return original(self, build, source)

    monkeypatch.setattr(GuidedBatch, "_build", counting)
    # 6 blocks of 32 tokens for 8 requests of 20-40 tokens each: they cannot all stay resident.
    llm = LLM(model=str(paths["policy"]), dtype="float32", max_model_len=128, max_num_seqs=8, block_size=32,
              num_gpu_blocks_override=6, max_num_batched_tokens=32, enforce_eager=True, seed=0)
    try:
        prompts = [[2] + [6 + (i * 7 + j) % 50 for j in range(12 + 2 * i)] for i in range(8)]
        weights = [{"arm": 1.0}, {"arm": 0.5, "arm2": 1.5}]
        params = [guided(weights[i % 2], temperature=0, max_tokens=30) for i in range(8)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
    finally:
        shutdown(llm)
    # Requests re-added after preemption were rebuilt on their prompt plus the outputs they had.
    resumed = [(p, n) for p, n in built if n > p]
    assert len(built) > len(prompts) and resumed, "no request was preempted: resumption was not exercised"
    refs = {name: load(paths[name]) for name in ("policy", "arm", "arm2")}
    assert got == [hf_greedy(paths, refs, p, weights[i % 2], 30) for i, p in enumerate(prompts)]
