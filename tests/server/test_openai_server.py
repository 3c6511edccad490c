"""`align-decode serve` end to end: the official openai client against a server on 127.0.0.1 (uvicorn on a
thread of this process, a random free port) with tiny random models.

What is checked: /v1/models; plain chat and completions equal the Python API's output for the same seed
(and greedy decoding); each method family (best_of_n, qalign, genarm with a start-up ARM, cd_blockwise,
transfer_q) answers and reports what it did; the report only when asked; weighted rewards; streaming
(token by token for token-level methods, the decided answer for sequence methods, both equal to the
non-streamed answer); bad requests answered 400 with the reason while concurrent good ones succeed;
requests from several clients batched together with the same answers as alone; a client that disconnects
stops its running work and drops its queued work; a full queue answered 429; a timeout answered 504; the
`align-decode serve` command itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from align_decode import ARM, AlignedModel, GenARM
from align_decode.commandline.methods import METHODS
from align_decode.commandline.run import prompt_seed
from align_decode.models import load_model
from align_decode.server.app import BackgroundServer, create_app
from align_decode.server.model import ServedModel, folder_flags
from cli_support import save_model

MODEL = "tiny-policy"
# A long-running request: a QAlign chain of many steps (each step decodes a suffix; ~0.02 s a step here).
SLOW = {"method": "qalign", "steps": 5000, "rewards": ["short"]}

REWARD_FILE = '''
def score(prompts, completions):
    return [float(c.count("w1")) for c in completions]
'''


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    policy = save_model(root / "policy", seed=0)
    arm = save_model(root / "arm", seed=3)
    (root / "my_reward.py").write_text(REWARD_FILE)
    return {"policy": policy, "arm": arm, "reward_file": str(root / "my_reward.py")}


@pytest.fixture(scope="module")
def served(folders):
    return ServedModel.load(
        folders["policy"], arms=[f"kind={folders['arm']}"],
        rewards=["short=length:target=3", "long=length:target=12", f"count_w1={folders['reward_file']}:score"],
        name=MODEL, max_tokens=16, timeout=60.0,
    )


@pytest.fixture(scope="module")
def server(served):
    with BackgroundServer(create_app(served, max_queue=32, max_batch=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def python_api(folders):
    model, tok = load_model(folders["policy"])
    return model, tok


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def chat(client, content="w1 w2 w3", **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def ext(response) -> dict | None:
    return (response.model_extra or {}).get("align_decode")


def chat_ids(tok, content):
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def wait_until(predicate, timeout=10.0, what="condition"):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------ plain requests
def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_plain_requests_equal_the_python_api(client, python_api):
    model, tok = python_api
    aligned = AlignedModel(model, tokenizer=tok)
    ids = chat_ids(tok, "w1 w2 w3")
    # Sampled, seeded: the server seeds prompt 0 of a request with prompt_seed(seed, "0").
    out = aligned.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=0,
                           seed=prompt_seed(7, "0"))
    expected = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    got = chat(client, temperature=0.8, top_p=0.9, seed=7)
    assert got.choices[0].message.content == expected
    assert got.usage.prompt_tokens == ids.shape[1] and got.usage.completion_tokens >= 1
    assert ext(got) is None  # the report is off by default
    # Greedy: temperature 0.
    greedy = aligned.generate(ids, max_new_tokens=8, do_sample=False)
    assert chat(client, temperature=0).choices[0].message.content == \
        tok.decode(greedy[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    # n choices, each its own row; completions take raw text (no chat template), a list of prompts.
    many = chat(client, n=3, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.choices[0].message.content == \
        chat(client, seed=7).choices[0].message.content
    batch = client.completions.create(model=MODEL, prompt=["w1 w2", "w5"], n=2, max_tokens=5, seed=3)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    raw = tok("w5", return_tensors="pt")["input_ids"]
    out = aligned.generate(raw, max_new_tokens=5, do_sample=True, top_k=0, seed=prompt_seed(3, "1"))
    assert batch.choices[2].text == tok.decode(out[0, raw.shape[1]:].tolist(), skip_special_tokens=True)


def test_stop_strings(client):
    full = chat(client, temperature=0, max_tokens=10).choices[0]
    words = full.message.content.split()
    assert len(words) >= 3, full
    cut = chat(client, temperature=0, max_tokens=10, stop=[words[2]]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full.message.content[: full.message.content.index(words[2])]


# ------------------------------------------------------------------------------------ the methods
def test_best_of_n_reports_candidates_and_picks_the_best(client):
    r = chat(client, seed=1, extra_body={"align_decode": {"method": "best_of_n", "n": 4, "rewards": ["short", "long"],
                                                          "report": True}})
    report = ext(r)
    assert report["method"] == "best_of_n" and report["n"] == 4 and report["rewards"] == ["short", "long"]
    prompt = report["prompts"][0]
    cands = prompt["candidates"]
    assert len(cands) == 4 and all(set(c["rewards"]) == {"short", "long"} for c in cands)
    best = max(c["rewards"]["short"] for c in cands)  # the first reward selects
    assert cands[prompt["chosen"]]["rewards"]["short"] == best
    assert cands[prompt["chosen"]]["text"] == r.choices[0].message.content
    assert report["accounting"]["generated_tokens"] == sum(c["tokens"] for c in cands)
    assert report["accounting"]["batch"]["sampled_tokens"] >= report["accounting"]["generated_tokens"]


def test_weighted_rewards(client):
    weighted = {"short": 1.0, "long": 0.5}
    r = chat(client, seed=2, extra_body={"align_decode": {
        "method": "best_of_n", "n": 4, "rewards": [weighted, "short", "long", "count_w1"], "report": True}})
    prompt = ext(r)["prompts"][0]
    name = "1*short + 0.5*long"
    assert ext(r)["rewards"] == [name, "short", "long", "count_w1"]
    for c in prompt["candidates"]:
        assert c["rewards"][name] == pytest.approx(c["rewards"]["short"] + 0.5 * c["rewards"]["long"])
        assert c["rewards"]["count_w1"] == c["text"].count("w1")  # the module:function reward
    assert prompt["candidates"][prompt["chosen"]]["rewards"][name] == max(c["rewards"][name] for c in prompt["candidates"])


def test_qalign_reports_its_chains(client):
    r = chat(client, seed=3, extra_body={"align_decode": {"method": "qalign", "steps": 4, "beta": 0.5,
                                                          "rewards": "short", "report": True}})
    report = ext(r)
    assert report["options"] == {"steps": 4, "beta": 0.5}
    rates = report["prompts"][0]["acceptance_rate"]
    assert len(rates) == 1 and 0.0 <= rates[0] <= 1.0
    assert report["accounting"]["batch"]["trace.forward_tokens"] > 0  # the chain's own accounting
    assert r.choices[0].message.content == report["prompts"][0]["candidates"][0]["text"]


def test_genarm_with_a_start_up_arm_equals_the_python_api(client, python_api, folders):
    model, tok = python_api
    arm_model, arm_tok = load_model(folders["arm"])
    ids = chat_ids(tok, "w4 w5")
    aligned = AlignedModel(model, tokenizer=tok, strategy=GenARM(ARM(arm_model, arm_tok), beta=0.5))
    out = aligned.generate(ids, max_new_tokens=8, do_sample=True, top_k=0, seed=prompt_seed(11, "0"))
    expected = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    r = chat(client, "w4 w5", seed=11, extra_body={"align_decode": {"method": "genarm", "arm": ["kind"], "beta": 0.5}})
    assert r.choices[0].message.content == expected
    # Left out, the start-up ARMs are used.
    r = chat(client, "w4 w5", seed=11, extra_body={"align_decode": {"method": "genarm", "beta": 0.5, "report": True}})
    assert r.choices[0].message.content == expected
    assert ext(r)["hyperparameters"]["arms"] == [folders["arm"]]


@pytest.mark.parametrize("options", [
    {"method": "cd_blockwise", "num_candidates": 3, "block_size": 3, "rewards": "short"},
    {"method": "transfer_q", "candidate_tokens": 3, "rollout_len": 2, "rewards": "short"},
    {"method": "args", "candidate_tokens": 3, "reward_weight": 2.0, "rewards": "short"},
    {"method": "cd_tokenwise", "candidate_tokens": 3, "rewards": "long"},
], ids=lambda o: o["method"])
def test_other_methods_answer(client, options):
    r = chat(client, seed=4, max_tokens=6, extra_body={"align_decode": {**options, "report": True}})
    report = ext(r)
    assert report["method"] == options["method"]
    assert r.choices[0].finish_reason in ("stop", "length") and report["prompts"][0]["candidates"]
    assert r.usage.completion_tokens == report["prompts"][0]["candidates"][report["prompts"][0]["chosen"]]["tokens"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_is_served_and_streams_its_answer(client, method):
    """Methods come from the registry: one registered later is served (and tested here) without a change."""
    options = {"align_decode": {"method": method, "rewards": ["short"]}}
    try:
        whole = chat(client, seed=8, max_tokens=4, extra_body=options).choices[0]
    except openai.BadRequestError as e:  # only acceptable: it needs a model folder this server was not given
        folders = [f for f in folder_flags() if f in METHODS[method].model_flags]
        assert any(f"align_decode.{f}" in e.body["message"] for f in folders), e.body
        return
    text, pieces, finish, _ = _streamed(client, seed=8, max_tokens=4, extra_body=options)
    assert text == whole.message.content and finish == [whole.finish_reason]
    if METHODS[method].n_is_candidates or method in ("qalign", "cd_blockwise"):
        assert len(pieces) <= 1  # a sequence method: the decided answer in one piece


# ------------------------------------------------------------------------------------ streaming
def _streamed(client, **kwargs):
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, pieces, finish, chunks


def test_streaming_token_level_is_token_by_token(client):
    options = {"align_decode": {"method": "genarm", "arm": ["kind"], "beta": 0.5}}
    whole = chat(client, seed=5, max_tokens=10, extra_body=options).choices[0]
    text, pieces, finish, chunks = _streamed(client, seed=5, max_tokens=10,
                                             extra_body={"align_decode": {**options["align_decode"], "report": True}})
    assert text == whole.message.content and finish == [whole.finish_reason]
    assert len(pieces) >= min(3, len(whole.message.content.split()))  # one piece per token, not one at the end
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(pieces)
    assert any(ext(c) for c in chunks)  # the report rides on the finish chunk


def test_streaming_a_sequence_method_sends_the_decided_answer(client):
    options = {"align_decode": {"method": "best_of_n", "n": 3, "rewards": "short"}}
    whole = chat(client, seed=6, extra_body=options).choices[0].message.content
    text, pieces, finish, _ = _streamed(client, seed=6, extra_body=options)
    assert text == whole and len(pieces) == (1 if whole else 0) and finish


# ------------------------------------------------------------------------------------ bad requests
BAD = [
    ({"method": "no_such_method"}, "unknown method 'no_such_method'"),
    ({"method": "qalign", "beta": -1, "rewards": "short"}, "align_decode.beta must be a finite number > 0, got -1"),
    ({"method": "qalign", "steps": 2, "burn_in": 5, "rewards": "short"}, "align_decode.burn_in 5 leaves no state"),
    ({"method": "best_of_n", "rewards": "no_such_reward"}, "unknown reward 'no_such_reward'"),
    ({"method": "sample", "steps": 3}, "align_decode.steps does not apply to method 'sample'"),
    ({"method": "genarm", "arm": ["nope"]}, "unknown arm 'nope'"),
    ({"method": "transfer_q", "importance_weights": "bogus", "rewards": "short"}, "align_decode.importance_weights must be"),
    ({"method": "best_of_n", "rewards": {"short": "heavy"}}, "the weight of 'short' must be a finite number"),
]


def test_bad_requests_are_400_with_the_reason_while_good_ones_succeed(client):
    def bad(case):
        body, reason = case
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, extra_body={"align_decode": body})
        assert caught.value.status_code == 400
        assert reason in caught.value.body["message"], caught.value.body
        return True

    def good(seed):
        return chat(client, seed=seed, extra_body={"align_decode": {"method": "best_of_n", "n": 2, "rewards": "short"}})

    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good, s) for s in range(4)]
        bads = [pool.submit(bad, case) for case in BAD]
        assert all(f.result(timeout=60) for f in bads)
        assert all(f.result(timeout=60).choices[0].finish_reason in ("stop", "length") for f in goods)
    # Malformed bodies and unsupported OpenAI options are 400 too; another model name is 404.
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, temperature="hot")
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        chat(client, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="temperature 0 does not work with best_of_n"):
        chat(client, temperature=0, extra_body={"align_decode": {"method": "best_of_n", "rewards": "short"}})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "w1"}])


# ------------------------------------------------------------------------------------ concurrency
def _blocker(server, timeout: float):
    """A slow request from its own client, which gives up (disconnects) after `timeout` seconds."""
    slow = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)

    def run():
        try:
            chat(slow, max_tokens=12, extra_body={"align_decode": SLOW})
        except openai.APITimeoutError:
            return "disconnected"
        return "finished"

    thread_result = {}
    thread = threading.Thread(target=lambda: thread_result.setdefault("r", run()))
    thread.start()
    return thread, thread_result


def test_requests_from_several_clients_are_batched_with_the_answers_they_get_alone(client, server):
    thread, _ = _blocker(server, timeout=1.5)  # occupies the worker while the others queue up
    wait_until(lambda: health(server)["running"] == 1, what="the blocker to run")
    options = {"align_decode": {"method": "genarm", "beta": 0.7, "report": True}}
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda s: chat(client, f"w{s} w9", seed=s, extra_body=options), range(4)))
    thread.join()
    sizes = [ext(r)["accounting"]["batch"]["requests"] for r in together]
    assert max(sizes) >= 2, sizes  # they waited together and ran as one batch
    alone = [chat(client, f"w{s} w9", seed=s, extra_body=options) for s in range(4)]
    assert [ext(r)["accounting"]["batch"]["requests"] for r in alone] == [1, 1, 1, 1]
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]


def test_a_disconnected_client_stops_its_work(client, server):
    before = health(server)["stats"]
    started = time.monotonic()
    thread, result = _blocker(server, timeout=1.0)
    # A second slow request (other settings: it waits) whose client also goes away while it waits.
    queued, queued_result = _blocker_other(server)
    thread.join()
    queued.join()
    assert result["r"] == "disconnected" and queued_result["r"] == "disconnected"
    stats = lambda: health(server)["stats"]  # noqa: E731
    wait_until(lambda: stats().get("cancelled_running", 0) > before.get("cancelled_running", 0), timeout=5,
               what="the running request to stop")
    wait_until(lambda: stats().get("dropped_waiting", 0) + stats().get("cancelled_running", 0)
               >= before.get("dropped_waiting", 0) + before.get("cancelled_running", 0) + 2, timeout=5,
               what="the queued request to be dropped")
    # The worker is free again long before the 5000-step chains could have finished (minutes).
    r = chat(client, seed=1)
    assert r.choices[0].message.content is not None and time.monotonic() - started < 15


def _blocker_other(server):
    slow = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=1.0)
    out = {}

    def run():
        try:
            chat(slow, max_tokens=11, extra_body={"align_decode": SLOW})
            out["r"] = "finished"
        except openai.APITimeoutError:
            out["r"] = "disconnected"

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_streaming_client_that_disconnects_stops_its_work(server):
    before = health(server)["stats"].get("cancelled_running", 0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "w1"}], "max_tokens": 200, "stream": True,
            "align_decode": {"method": "transfer_q", "candidate_tokens": 8, "rollout_len": 50, "rewards": "short"}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [next(lines) for _ in range(3)]  # the role chunk and the first tokens, then hang up
        assert any("content" in line for line in got)
    wait_until(lambda: health(server)["stats"].get("cancelled_running", 0) > before, timeout=5,
               what="the streamed request to stop")


def test_a_full_queue_is_answered_429(served):
    with BackgroundServer(create_app(served, max_queue=1)) as srv:
        thread, _ = _blocker(srv, timeout=3.0)
        wait_until(lambda: health(srv)["running"] == 1, what="the blocker to run")
        queued, _ = _blocker_other(srv)
        wait_until(lambda: health(srv)["queue"] == 1, what="one request waiting")
        c = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.RateLimitError) as caught:
            chat(c)
        assert caught.value.status_code == 429 and "queue is full" in caught.value.body["message"]
        thread.join()
        queued.join()
        assert health(srv)["stats"]["refused_queue_full"] == 1


def test_a_request_past_its_timeout_is_answered_504(client, server):
    before = health(server)["stats"].get("cancelled_running", 0)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client, max_tokens=12, extra_body={"align_decode": {**SLOW, "timeout": 0.5}})
    assert caught.value.status_code == 504 and "timeout" in caught.value.body["message"]
    assert time.monotonic() - started < 5
    # Its work stopped too: the worker is free at once.
    wait_until(lambda: health(server)["stats"].get("cancelled_running", 0) > before, timeout=5,
               what="the timed-out request to stop")
    chat(client)


# ------------------------------------------------------------------------------------ the command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command(folders):
    port = _free_port()
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-c", "from align_decode.cli import main; main()", "serve", "--model", folders["policy"],
         "--port", str(port), "--reward", "short=length:target=3", "--served-model-name", MODEL, "--threads", "1",
         "--guide", f"arm:kind={folders['arm']}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        until = time.monotonic() + 60
        while True:
            try:
                c.models.list()
                break
            except openai.APIConnectionError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < until, "the server did not start"
                time.sleep(0.2)
        r = chat(c, seed=0, extra_body={"align_decode": {"method": "best_of_n", "n": 2, "report": True}})
        assert ext(r)["rewards"] == ["short"]
        r = chat(c, seed=0, extra_body={"align_decode": {"method": "genarm", "arm": "kind", "report": True}})
        assert ext(r)["hyperparameters"]["arms"] == [folders["arm"]]
    finally:
        process.terminate()
        process.wait(10)
    # A bad start-up option is one error line, before anything loads.
    done = subprocess.run([sys.executable, "-c", "from align_decode.cli import main; main()", "serve", "--reward",
                           "no_such_reward", "--model", folders["policy"]], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "unknown reward 'no_such_reward'" in done.stderr, done.stderr
