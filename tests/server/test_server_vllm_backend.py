"""`align-decode serve --backend vllm` on vLLM's CPU build (marker `vllm`: `.venv-vllm/bin/python -m pytest
-m vllm tests/`): the sequence methods that can sample from an engine do, through the server, and agree
with the in-process backend where the two must (greedy Transfer Q* rollouts)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    pytest.importorskip("openai", reason="the openai client is not installed")
    from openai import OpenAI

    from align_decode.server.app import BackgroundServer, create_app
    from align_decode.server.model import ServedModel
    from vllm_support import save_models

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: seconds to start
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        policy = str(save_models(tmp_path_factory.mktemp("serve-vllm"))["policy"])
        common = dict(rewards=["short=length:target=3"], name="tiny", max_tokens=8)
        with_vllm = ServedModel.load(policy, backend="vllm", engine_options=dict(
            max_model_len=128, max_num_seqs=64, enforce_eager=True, block_size=32), **common)
        in_process = ServedModel.load(policy, **common)
        with BackgroundServer(create_app(with_vllm)) as a, BackgroundServer(create_app(in_process)) as b:
            yield {name: OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
                   for name, srv in (("vllm", a), ("hf", b))}
        with_vllm.context.close_engines()


def _chat(client, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w1 w2"}],
                                          max_tokens=6, **kwargs)


def test_best_of_n_samples_from_the_engine(servers):
    r = _chat(servers["vllm"], seed=3, extra_body={"align_decode": {"method": "best_of_n", "n": 4, "report": True}})
    report = r.model_extra["align_decode"]
    assert report["hyperparameters"]["engine"]  # the candidates came from the vLLM engine
    prompt = report["prompts"][0]
    assert len(prompt["candidates"]) == 4
    assert prompt["candidates"][prompt["chosen"]]["text"] == r.choices[0].message.content


def test_greedy_transfer_q_agrees_with_the_in_process_backend(servers):
    options = {"align_decode": {"method": "transfer_q", "candidate_tokens": 4, "rollout_len": 4, "alpha": 3.0}}
    texts = {name: _chat(client, temperature=0, extra_body=options).choices[0].message.content
             for name, client in servers.items()}
    assert texts["vllm"] == texts["hf"]


def test_token_level_methods_still_run_in_process(servers):
    r = _chat(servers["vllm"], seed=1, extra_body={"align_decode": {"method": "genarm", "beta": 1.0}})
    assert r.choices[0].finish_reason in ("stop", "length")
