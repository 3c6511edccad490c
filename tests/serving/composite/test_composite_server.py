"""The OpenAI-compatible vLLM server serves a composite folder: end to end, in a subprocess.

`python -m vllm.entrypoints.openai.api_server --model DIR` (the CPU wheel's `vllm serve` entry is the
same server) with nothing but the folder: the architecture and the processor come from the entry
points. Requests opt in through `vllm_xargs` (a JSON string, since it carries only flat values). A
guided, a plain and two bad requests are sent at once: the bad ones are answered 400 with the reason,
the others are served, and the greedy answers equal the in-process engine's (and the Hugging Face
GenARM path's) for the same request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup-vllm.sh)")

from vllm_support import guided, hf_greedy, load, plain, run, save_models, shutdown  # noqa: E402

pytestmark = pytest.mark.vllm  # about 45 s: a server start-up and an in-process engine

PROMPTS = [[2, 10, 11, 12], [2, 40, 41, 42, 43, 44]]
WEIGHTS = {"arm": 1.0, "arm2": 0.5}
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from align_decode.serving.composite.spec import build_composite

    root = tmp_path_factory.mktemp("server-models")
    paths = save_models(root)
    build_composite(paths["policy"], {"arm": paths["arm"], "arm2": paths["arm2"]}, root / "composite",
                    kinds={"arm2": "qhead"})
    paths["composite"] = root / "composite"
    return paths, {name: load(paths[name]) for name in ("policy", "arm", "arm2")}, root


@pytest.fixture(scope="module")
def server(models):
    paths, _, root = models
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("ALIGN_DECODE_GUIDES", None)  # the guides come from the composite folder only
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's own layout: engine core in a subprocess
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(paths["composite"]),
             "--served-model-name", "composite", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--max-model-len", "128", "--max-num-seqs", "8", "--enforce-eager", "--seed", "0"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start in 240 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}", log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine core it started (its own group)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def completion(prompt, guides=None, **extra) -> dict:
    body = {"model": "composite", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True, **extra}
    if guides is not None:
        body["vllm_xargs"] = {"align_decode": json.dumps({"guides": guides})}
    return body


def test_the_server_serves_guided_and_plain_requests_and_refuses_bad_ones(server, models):
    url, log = server
    paths, refs, _ = models
    bodies = {
        "guided": completion(PROMPTS[0], WEIGHTS),
        "plain": completion(PROMPTS[1]),
        "unknown": completion(PROMPTS[0], {"arm": 1.0, "nope": 1.0}),
        "infinite": completion(PROMPTS[1], {"arm": float("inf")}),  # json.dumps writes Infinity
        "guided2": completion(PROMPTS[1], {"arm2": -1.0}),
    }
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = dict(zip(bodies, pool.map(lambda b: post(f"{url}/v1/completions", b), bodies.values())))

    for bad, reason in (("unknown", "no guide named 'nope'"), ("infinite", "must be finite")):
        status, body = answers[bad]
        assert 400 <= status < 500, (bad, status, body)
        assert reason in json.dumps(body), (bad, body)
    served = {}
    for name in ("guided", "plain", "guided2"):
        status, body = answers[name]
        assert status == 200, (name, status, body)
        served[name] = body["choices"][0]["token_ids"]

    expected = {"guided": hf_greedy(paths, refs, PROMPTS[0], WEIGHTS, MAX_TOKENS),
                "plain": hf_greedy(paths, refs, PROMPTS[1], {}, MAX_TOKENS),
                "guided2": hf_greedy(paths, refs, PROMPTS[1], {"arm2": -1.0}, MAX_TOKENS)}
    assert served == expected
    assert served["plain"] != served["guided2"]

    # The same requests through the in-process engine on the same folder.
    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.delenv("ALIGN_DECODE_GUIDES", raising=False)
        llm = LLM(model=str(paths["composite"]), dtype="float32", max_model_len=128, max_num_seqs=8,
                  enforce_eager=True, seed=0)
        try:
            local = run(llm, [PROMPTS[0], PROMPTS[1], PROMPTS[1]],
                        [guided(WEIGHTS, temperature=0, max_tokens=MAX_TOKENS), plain(temperature=0, max_tokens=MAX_TOKENS),
                         guided({"arm2": -1.0}, temperature=0, max_tokens=MAX_TOKENS)])
        finally:
            shutdown(llm)
    assert [served["guided"], served["plain"], served["guided2"]] == local

    # A plain request alone: the engine core (another process than the model here) stamped every
    # request by the processor's rule, so the guides are skipped.
    status, body = post(f"{url}/v1/completions", completion(PROMPTS[0]))
    assert status == 200 and body["choices"][0]["token_ids"] == hf_greedy(paths, refs, PROMPTS[0], {}, MAX_TOKENS)
    text = log.read_text()
    assert "align-decode composite model: policy" in text
    assert "align-decode guidance ready (composite model, in-engine guides): arm, arm2" in text
    assert "skipped in steps where no request opts in" in text
    assert "a step without guided requests: guide forwards skipped" in text
    assert "not stamped" not in text
