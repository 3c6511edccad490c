"""Steps in which no request opts in skip the guides' forwards, and guided requests stay exact.

Skipped steps leave the guide KV of their tokens unwritten; the composite package docstring ("Idle
steps") says why that is safe: guided requests are salted at admission, so under prefix caching they
never reuse blocks written while the guides were skipped. One test removes the salt and shows the
hole it closes (a guided request reusing such blocks decodes wrongly).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")

from vllm_support import guided, hf_greedy, load, plain, record_preemptions, run, save_models, shutdown  # noqa: E402

pytestmark = pytest.mark.vllm

BLOCK = 32  # the CPU attention backend's block size: a prompt of 70 tokens fills two cacheable blocks


def long_prompt(k: int) -> list[int]:
    return [2] + [6 + (5 * j + 11 * k) % 57 for j in range(69)]


def generate(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def composite_model(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vllm import LLM

    from align_decode.serving.composite.spec import build_composite

    root = tmp_path_factory.mktemp("idle-models")
    paths = save_models(root)
    build_composite(paths["policy"], {"arm": paths["arm"], "arm2": paths["arm2"]}, root / "composite")
    refs = {name: load(paths[name]) for name in ("policy", "arm", "arm2")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.delenv("ALIGN_DECODE_GUIDES", raising=False)
        llm = LLM(model=str(root / "composite"), dtype="float32", max_model_len=128, max_num_seqs=8,
                  block_size=BLOCK, enable_prefix_caching=True, enforce_eager=True, seed=0)
        model = composite_model(llm)
        calls = []

        def counted(name, forward):
            def wrapper(*args, **kwargs):
                calls.append(name)
                return forward(*args, **kwargs)
            return wrapper

        for name, guide in model.guides.items():
            # Count every forward of every guide (an instance attribute shadows the class's forward).
            guide.forward = counted(name, guide.forward)
        try:
            yield llm, paths, refs, model, calls
        finally:
            shutdown(llm)


def test_the_start_up_check_allows_skipping_with_prefix_caching(setup):
    from align_decode.serving.composite.guidance import idle_skip

    llm, *_ = setup
    assert idle_skip(llm.llm_engine.vllm_config) == (True, True, "guided requests get their own prefix-cache salt")


def test_unguided_batches_run_no_guide_forward_then_guided_requests_are_exact(setup):
    llm, paths, refs, model, calls = setup
    prompts = [long_prompt(0), [2, 10, 11, 12], long_prompt(1)]
    calls.clear()
    skipped = model.skipped_steps
    got = run(llm, prompts, [plain(temperature=0, max_tokens=12)] * 3)
    assert calls == [] and model.skipped_steps > skipped  # no guide forward in any of those steps
    assert got == [hf_greedy(paths, refs, p, {}, 12) for p in prompts]

    # Guided requests admitted later, on the same prompts (whose blocks the unguided ones cached, with
    # no guide KV in them), one with a second guide, and a plain one in the same batch.
    weights = [{"arm": 1.0}, {"arm": 0.5, "arm2": 2.0}, {}]
    outs = generate(llm, prompts, [guided(w, temperature=0, max_tokens=16) for w in weights])
    assert calls, "guided steps must run the guides"
    assert [o.num_cached_tokens for o in outs] == [0, 0, 2 * BLOCK]  # only the plain one reused blocks
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == [hf_greedy(paths, refs, p, w, 16) for p, w in zip(prompts, weights)]

    # Again: guided requests do share cached blocks with each other (salted alike).
    outs = generate(llm, prompts[:1], [guided(weights[1], temperature=0, max_tokens=16)])
    assert outs[0].num_cached_tokens == 2 * BLOCK
    assert list(outs[0].outputs[0].token_ids) == hf_greedy(paths, refs, prompts[0], weights[1], 16)
    calls.clear()
    run(llm, prompts, [plain(temperature=0, max_tokens=4)] * 3)
    assert calls == []


def test_a_guided_request_arriving_mid_decode_turns_the_guides_on(setup):
    """An unguided request decodes alone (guides skipped), a guided one joins mid-way: from then on the
    guides run for both, and the guided one is exact."""
    llm, paths, refs, model, calls = setup
    engine = llm.llm_engine
    calls.clear()
    engine.add_request("idle-1", {"prompt_token_ids": [2, 33, 34]}, plain(temperature=0, max_tokens=20))
    done = {}
    for _ in range(5):
        for o in engine.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
    assert calls == []
    engine.add_request("guided-1", {"prompt_token_ids": long_prompt(2)}, guided({"arm": 1.0}, temperature=0, max_tokens=12))
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
    assert calls
    assert done == {"idle-1": hf_greedy(paths, refs, [2, 33, 34], {}, 20),
                    "guided-1": hf_greedy(paths, refs, long_prompt(2), {"arm": 1.0}, 12)}


def test_without_the_salt_a_guided_request_would_reuse_blocks_with_no_guide_kv(setup, monkeypatch):
    """Why guided requests are salted: with the salt removed, a guided request reuses the cached blocks
    of an unguided one, whose guide KV was never written, and decodes away from the GenARM answer."""
    from align_decode.serving.composite import handoff

    llm, paths, refs, model, calls = setup
    prompt = long_prompt(3)
    calls.clear()
    run(llm, [prompt], [plain(temperature=0, max_tokens=4)])
    assert calls == []
    monkeypatch.setattr(handoff, "SALT", "")
    out = generate(llm, [prompt], [guided({"arm": 1.0}, temperature=0, max_tokens=16)])[0]
    assert out.num_cached_tokens == 2 * BLOCK
    assert list(out.outputs[0].token_ids) != hf_greedy(paths, refs, prompt, {"arm": 1.0}, 16)


def test_preemption_with_guided_and_unguided_requests_under_skipping(setup):
    """A KV cache too small for the batch: guided and unguided requests are preempted and recomputed,
    with steps of either kind in between; each ends with its own exact answer."""
    from vllm import LLM

    _, paths, refs, _, _ = setup
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.delenv("ALIGN_DECODE_GUIDES", raising=False)
        llm = LLM(model=str(paths["policy"].parent / "composite"), dtype="float32", max_model_len=128, max_num_seqs=8,
                  block_size=BLOCK, num_gpu_blocks_override=6, max_num_batched_tokens=32, enforce_eager=True, seed=0)
        try:
            model = composite_model(llm)
            prompts = [[2] + [6 + (i * 7 + j) % 50 for j in range(12 + 2 * i)] for i in range(8)]
            weights = [{"arm": 1.0}, {}, {"arm": 0.5, "arm2": 1.5}, {}, {}, {}, {}, {"arm": 1.0}]
            preempted = record_preemptions(llm)
            got = run(llm, prompts, [guided(w, temperature=0, max_tokens=24) for w in weights])
            assert preempted, "the test meant to force preemption"
            assert model.skipped_steps > 0 and model.guided_steps > 0
            assert got == [hf_greedy(paths, refs, p, w, 24) for p, w in zip(prompts, weights)]
        finally:
            shutdown(llm)
